"""Fork safety: GNU libgomp's thread pool does not survive fork() (a child
that opens a parallel region after the parent used the pool waits forever).
fastbn's pthread_atfork child handler (src_c/common/fork_guard.h) makes every
kernel serial in a forked child.  These tests run every kernel with several
threads in the parent, then call every kernel in 'fork' children (a Process,
a Pool, a grandchild); a child that hangs is killed after a timeout and the
test fails instead of blocking the suite.  Results must equal the parent's
bit for bit (the kernels are thread-count independent)."""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import sys

import numpy as np
import pytest

import fastbn
from fastbn import _core

from test_reliability_kernels import CASE_IDS, KERNEL_CASES, THREADED_SIZE, run_case

pytestmark = pytest.mark.skipif(sys.platform == "win32" or "fork" not in multiprocessing.get_all_start_methods(),
                                reason="needs the 'fork' start method")

TIMEOUT = 120  # seconds; a healthy child needs well under one
DTYPE = np.float32


def digest(outputs) -> str:
    h = hashlib.sha256()
    for name in sorted(outputs):
        value = outputs[name]
        h.update(name.encode())
        h.update(np.ascontiguousarray(value).tobytes() if isinstance(value, np.ndarray)
                 else np.float64(value).tobytes())
    return h.hexdigest()


def all_digests(threads: int) -> dict:
    fastbn.set_num_threads(threads)
    return {case.name: digest(run_case(case, THREADED_SIZE, DTYPE, seed=7)) for case in KERNEL_CASES}


def _child_report(threads: int) -> dict:
    return {"forked": _core.in_forked_child(), "threads": fastbn.get_num_threads(),
            "digests": all_digests(threads), "pid": os.getpid()}


def _child(queue, threads):
    try:
        queue.put(("ok", _child_report(threads)))
    except BaseException as error:  # report, do not hang the parent
        queue.put(("error", repr(error)))


def _grandchild_parent(queue, threads):
    try:
        context = multiprocessing.get_context("fork")
        inner = context.Queue()
        process = context.Process(target=_child, args=(inner, threads))
        process.start()
        status, report = inner.get(timeout=TIMEOUT)
        process.join(TIMEOUT)
        queue.put((status, report))
    except BaseException as error:
        queue.put(("error", repr(error)))


def _run_in_fork(target, threads=2):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=target, args=(queue, threads))
    process.start()
    try:
        status, report = queue.get(timeout=TIMEOUT)
    except Exception:
        process.kill()
        process.join()
        pytest.fail(f"the forked child produced nothing within {TIMEOUT} s (hung in a kernel?)")
    process.join(TIMEOUT)
    if process.is_alive():
        process.kill()
        pytest.fail("the forked child did not exit")
    assert status == "ok", report
    assert process.exitcode == 0
    return report


@pytest.fixture
def parent_used_threads():
    """The parent runs every kernel with 2 threads first (the libgomp pool exists)."""
    initial = fastbn.get_num_threads()
    expected = all_digests(2)
    yield expected
    fastbn.set_num_threads(initial)
    fastbn.set_num_threads(None)


def test_the_parent_is_not_marked_as_a_forked_child():
    assert _core.in_forked_child() is False


def test_forked_child_runs_every_kernel_serially_with_the_parents_results(parent_used_threads):
    report = _run_in_fork(_child, threads=2)
    assert report["forked"] is True
    assert report["threads"] == 1
    assert report["digests"] == parent_used_threads


def test_grandchild_forked_from_a_forked_child_also_works(parent_used_threads):
    report = _run_in_fork(_grandchild_parent, threads=3)
    assert report["forked"] is True and report["threads"] == 1
    assert report["digests"] == parent_used_threads


def _pool_task(name):
    case = next(c for c in KERNEL_CASES if c.name == name)
    fastbn.set_num_threads(2)
    return name, digest(run_case(case, THREADED_SIZE, DTYPE, seed=7)), fastbn.get_num_threads()


def test_fork_pool_workers_run_every_kernel(parent_used_threads):
    context = multiprocessing.get_context("fork")
    with context.Pool(2) as pool:
        result = pool.map_async(_pool_task, CASE_IDS)
        try:
            rows = result.get(timeout=TIMEOUT)
        except multiprocessing.TimeoutError:
            pool.terminate()
            pytest.fail(f"fork pool workers did not finish within {TIMEOUT} s")
    assert {name: value for name, value, _ in rows} == parent_used_threads
    assert {threads for _, _, threads in rows} == {1}


def test_parent_keeps_its_threads_and_results_after_forking(parent_used_threads):
    _run_in_fork(_child, threads=2)
    assert _core.in_forked_child() is False
    fastbn.set_num_threads(2)
    assert fastbn.get_num_threads() == 2
    assert all_digests(2) == parent_used_threads


def test_spawned_child_is_not_serialized():
    """The guard is for fork only: a fresh ('spawn') interpreter keeps its threads."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        forked, threads = pool.apply_async(_spawn_probe).get(timeout=TIMEOUT)
    assert forked is False
    assert threads >= 1


def _spawn_probe():
    fastbn.set_num_threads(2)
    return _core.in_forked_child(), fastbn.get_num_threads()
