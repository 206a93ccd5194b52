"""Thread safety: kernels called concurrently from several Python threads
(the GIL is released inside them) return exactly the results of serial calls;
the backend choice is per thread; the GIL really is released."""
from __future__ import annotations

import concurrent.futures
import threading

import numpy as np
import pytest

import fastbn
from fastbn import functional as F

from test_reliability_kernels import KERNEL_CASES, THREADED_SIZE, assert_identical, run_case

WORKERS = 4


@pytest.fixture
def two_threads_each():
    initial = fastbn.get_num_threads()
    fastbn.set_num_threads(2)
    yield
    fastbn.set_num_threads(initial)
    fastbn.set_num_threads(None)


def _jobs(size, dtypes, repeats):
    return [(case, size, dtype, seed) for seed in range(repeats) for dtype in dtypes for case in KERNEL_CASES]


def _run_concurrently(jobs):
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        futures = [pool.submit(run_case, case, size, dtype, seed) for case, size, dtype, seed in jobs]
        return [future.result(timeout=300) for future in futures]


def test_concurrent_threaded_kernel_calls_equal_serial_calls(two_threads_each):
    """Each Python thread opens its own OpenMP team on large inputs."""
    jobs = _jobs(THREADED_SIZE, (np.float32, np.float64), repeats=2)
    serial = [run_case(case, size, dtype, seed) for case, size, dtype, seed in jobs]
    concurrent_results = _run_concurrently(jobs)
    for (case, _, dtype, seed), got, expected in zip(jobs, concurrent_results, serial):
        assert_identical(got, expected, f"{case.name} {np.dtype(dtype)} seed {seed}")


def test_many_small_concurrent_calls_equal_serial_calls():
    """Small inputs (serial kernels) from four threads, many times over."""
    jobs = _jobs(300, (np.float32, np.float64), repeats=12)
    serial = [run_case(case, size, dtype, seed) for case, size, dtype, seed in jobs]
    for (case, _, dtype, seed), got, expected in zip(jobs, _run_concurrently(jobs), serial):
        assert_identical(got, expected, f"{case.name} {np.dtype(dtype)} seed {seed}")


def test_the_same_inputs_read_by_several_threads_at_once():
    """Shared read-only inputs (x, running stats) with one output buffer per thread."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 16, 40, 40)).astype(np.float32)
    mean, var = rng.standard_normal(16).astype(np.float32), rng.random(16).astype(np.float32) + 0.5
    x.flags.writeable = False
    expected = F.batch_norm(x, mean, var)
    outs = [np.empty_like(x) for _ in range(WORKERS)]
    barrier = threading.Barrier(WORKERS)

    def work(out):
        barrier.wait()
        for _ in range(20):
            F.batch_norm(x, mean, var, out=out)
            if out.tobytes() != expected.tobytes():
                return False
        return True

    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        assert all(pool.map(work, outs))


def test_backend_choice_is_per_thread():
    barrier = threading.Barrier(2)
    seen = {}

    def worker(name):
        with fastbn.use_backend(name):
            barrier.wait()
            seen[name] = [fastbn.get_backend() for _ in range(1000)]
            barrier.wait()

    threads = [threading.Thread(target=worker, args=(name,)) for name in ("fast", "reference")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert set(seen["fast"]) == {"fast"} and set(seen["reference"]) == {"reference"}
    assert fastbn.get_backend() == "fast"


def test_kernels_release_the_gil():
    """While one thread is inside a long kernel call, another Python thread runs."""
    x = np.ones((4, 8, 512, 512), np.float32)  # 32 MiB: milliseconds per call
    mean, var = np.zeros(8, np.float32), np.ones(8, np.float32)
    out = np.empty_like(x)
    progress = []
    inside = threading.Event()
    done = threading.Event()

    def counter():
        inside.wait()
        while not done.is_set():
            progress.append(1)

    initial = fastbn.get_num_threads()
    fastbn.set_num_threads(1)
    thread = threading.Thread(target=counter)
    thread.start()
    try:
        before = 0
        for _ in range(50):
            before = len(progress)
            inside.set()
            F.batch_norm(x, mean, var, out=out)  # holds the GIL only around the kernel
            if len(progress) > before:
                break
    finally:
        done.set()
        inside.set()
        thread.join(60)
        fastbn.set_num_threads(initial)
        fastbn.set_num_threads(None)
    assert len(progress) > 0


def test_set_num_threads_none_restores_the_default():
    default = fastbn.get_num_threads()
    fastbn.set_num_threads(1)
    fastbn.set_num_threads(None)
    restored = fastbn.get_num_threads()
    fastbn.set_num_threads(default)
    fastbn.set_num_threads(None)
    assert restored == default
