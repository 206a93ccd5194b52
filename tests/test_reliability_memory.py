"""Memory: no leak over 100k calls of every public kernel (resident set size
stable), no Python-level growth (tracemalloc), no leak on error paths; and
64-bit indexing: arrays over 2**31 elements.

The > 2**31 checks that need no memory use a float32 gradient of 2**31 + 4099
elements that is never written: np.zeros gets fresh anonymous pages from the
kernel, which all map the shared zero page until written, so the 8.6 GB array
costs a few MB while the norm kernels really read every element (values
planted beyond index 2**31 must be found).  Tests that write that much
(batch norm, optimizer steps) need ~9 GB of RAM: they are marked slow and run
only with FASTBN_BIG_MEMORY=1 (``FASTBN_BIG_MEMORY=1 pytest -m slow
tests/test_reliability_memory.py``).
"""
from __future__ import annotations

import gc
import os
import sys
import tracemalloc

import numpy as np
import pytest

import fastbn
from fastbn import functional as F
from fastbn import optim
from fastbn.parameter import Parameter

from test_reliability_kernels import (CASE_IDS, KERNEL_CASES, bn_training_available)

CALLS = 100_000
WARM_UP = 2_000
# A leak of 16 bytes per call would add 1.6 MB over CALLS; allocator noise
# after the warm-up is a few hundred KB at most.
RSS_SLACK = 1 << 20
TRACEMALLOC_CALLS = 1_000
TRACEMALLOC_SLACK = 32 << 10

BIG = 2 ** 31 + 4099
big_memory = pytest.mark.skipif(os.environ.get("FASTBN_BIG_MEMORY", "") in ("", "0"),
                                reason="needs ~9 GB of RAM: set FASTBN_BIG_MEMORY=1")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def serial_kernels():
    initial = fastbn.get_num_threads()
    fastbn.set_num_threads(1)
    yield
    fastbn.set_num_threads(initial)
    fastbn.set_num_threads(None)


@linux_only
@pytest.mark.parametrize("case", KERNEL_CASES, ids=CASE_IDS)
def test_a_hundred_thousand_calls_do_not_grow_the_resident_set(case, serial_kernels):
    prepared = case.prepare(48, np.float32, 0)
    call = prepared.call
    with np.errstate(all="ignore"):
        for _ in range(WARM_UP):
            call()
        gc.collect()
        before = resident_bytes()
        for _ in range(CALLS):
            call()
        gc.collect()
        growth = resident_bytes() - before
    assert growth < RSS_SLACK, f"{case.name}: resident set grew by {growth} bytes over {CALLS} calls"


@pytest.mark.parametrize("case", KERNEL_CASES, ids=CASE_IDS)
def test_calls_allocate_no_lasting_python_memory(case, serial_kernels):
    """Traced Python allocations kept over three windows of calls: a leak
    shows in every window; a one-time cache fill inside NumPy (seen once per
    process around ``ndarray.__array_interface__``) in one window at most.
    (Snapshots, which are slow, are only taken to explain a failure.)"""
    prepared = case.prepare(48, np.float64, 1)
    growths = []
    details = ""
    with np.errstate(all="ignore"):
        for _ in range(200):
            prepared.call()
        gc.collect()
        tracemalloc.start(4)
        try:
            for _ in range(3):
                before, _ = tracemalloc.get_traced_memory()
                for _ in range(TRACEMALLOC_CALLS):
                    prepared.call()
                gc.collect()
                growths.append(tracemalloc.get_traced_memory()[0] - before)
            if min(growths) >= TRACEMALLOC_SLACK:
                start = tracemalloc.take_snapshot()
                for _ in range(TRACEMALLOC_CALLS):
                    prepared.call()
                gc.collect()
                sites = tracemalloc.take_snapshot().compare_to(start, "traceback")[:3]
                details = "\n".join(f"{stat}\n" + "\n".join(stat.traceback.format()) for stat in sites)
        finally:
            tracemalloc.stop()
    assert min(growths) < TRACEMALLOC_SLACK, f"{case.name}: {growths} bytes kept per window; largest:\n{details}"


def _failing_calls():
    x = np.ones((2, 3, 4), np.float32)
    mean, var = np.zeros(3, np.float32), np.ones(3, np.float32)
    bad_out = np.empty((2, 3, 4), np.float64)
    params = [Parameter(np.ones(5000, np.float32)), Parameter(np.ones(4, np.float32))]
    opt = optim.Adam(params)
    params[0].grad = np.ones(5000, np.float32)
    params[1].grad = np.ones(5, np.float32)  # wrong shape: fails after the first tensor is planned
    clip_params = [Parameter(np.ones(3), grad=np.ones(3)), Parameter(np.ones(3))]
    clip_params[1].grad = np.ones(6)[::2]
    return {
        "batch_norm_bad_out": lambda: F.batch_norm(x, mean, var, out=bad_out),
        "optimizer_step_bad_second_grad": opt.step,
        "clip_non_contiguous_grad": lambda: optim.clip_grad_norm_(clip_params, 1.0),
    }


@linux_only
@pytest.mark.parametrize("name", list(_failing_calls()))
def test_rejected_calls_do_not_leak(name):
    call = _failing_calls()[name]

    def attempt():
        try:
            call()
        except (TypeError, ValueError):
            return
        raise AssertionError(f"{name} did not fail")

    for _ in range(WARM_UP):
        attempt()
    gc.collect()
    before = resident_bytes()
    for _ in range(20_000):
        attempt()
    gc.collect()
    assert resident_bytes() - before < RSS_SLACK


# section: 64-bit indexing ------------------------------------------------------------


def _untouched_big_gradient():
    """A float32 gradient of BIG elements, zero except three planted values
    (two of them past index 2**31); only three pages are ever written."""
    grad = np.zeros(BIG, np.float32)
    grad[5] = 3.0
    grad[2 ** 31 + 7] = -12.0
    grad[-1] = 4.0
    param = Parameter(np.zeros(1, np.float32))
    param.data = grad  # a parameter needs data of the grad's shape; never written here
    param.grad = grad
    return param


@linux_only
@pytest.mark.parametrize("threads", [1, 2])
def test_gradient_norms_read_past_two_to_the_31_elements(threads):
    initial = fastbn.get_num_threads()
    fastbn.set_num_threads(threads)
    try:
        param = _untouched_big_gradient()
        before = resident_bytes()
        assert optim.clip_grad_norm_([param], max_norm=1e9) == 13.0
        assert optim.clip_grad_norm_([param], max_norm=1e9, norm_type=np.inf) == 12.0
        # the zero pages cost no memory: nothing was copied
        assert resident_bytes() - before < 256 << 20
    finally:
        fastbn.set_num_threads(initial)
        fastbn.set_num_threads(None)


def test_layout_sizes_of_a_huge_array_are_exact():
    """Python/Cython side: outer * channels * inner of a > 2**32-element view
    (zero strides, no memory) is computed without 32-bit truncation."""
    from fastbn._bn_validation import batch_norm_layout
    huge = np.broadcast_to(np.float32(0), (3, 5, 2 ** 16, 2 ** 15 + 1))
    layout = batch_norm_layout(huge, 1)
    assert (layout.outer, layout.channels, layout.inner) == (3, 5, 2 ** 16 * (2 ** 15 + 1))
    assert layout.outer * layout.channels * layout.inner == huge.size > 2 ** 32
    last = batch_norm_layout(np.broadcast_to(np.float32(0), (2 ** 16, 2 ** 15 + 1, 5)), -1)
    assert last.outer == 2 ** 16 * (2 ** 15 + 1) and last.inner == 1


@pytest.mark.slow
@big_memory
@pytest.mark.parametrize("axis", [1, -1])
def test_eval_batch_norm_on_more_than_two_to_the_31_elements(axis):
    channels = 3
    per_channel = BIG // channels + 1
    shape = (1, channels, per_channel) if axis == 1 else (per_channel, channels)
    x = np.zeros(shape, np.float32)
    mean = np.array([1.0, 2.0, 3.0], np.float32)
    var = np.array([4.0, 1.0, 0.25], np.float32)
    flat = x.reshape(-1)
    planted = [0, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 1, flat.size - 1]
    flat[planted] = 10.0
    F.batch_norm(x, mean, var, eps=0.0, axis=axis, out=x)
    channel_of = (lambda i: (i // per_channel) % channels) if axis == 1 else (lambda i: i % channels)
    for index in planted + [7, 2 ** 31 + 5, flat.size - 2]:
        c = channel_of(index)
        value = 10.0 if index in planted else 0.0
        assert flat[index] == np.float32((value - mean[c]) / np.sqrt(var[c])), index
    del x, flat


@pytest.mark.slow
@big_memory
def test_optimizer_step_and_clipping_on_more_than_two_to_the_31_elements():
    param = _untouched_big_gradient()
    param.data = np.zeros(BIG, np.float32)
    opt = optim.SGD([param], lr=1.0)
    opt.step()
    for index, value in ((5, -3.0), (2 ** 31 + 7, 12.0), (BIG - 1, -4.0), (2 ** 31 + 6, 0.0)):
        assert param.data[index] == value
    del opt, param.data
    norm = optim.clip_grad_norm_([param], max_norm=6.5)
    assert norm == 13.0
    assert param.grad[2 ** 31 + 7] == np.float32(-12.0 * 6.5 / (13.0 + 1e-6))


@pytest.mark.slow
@big_memory
@pytest.mark.skipif(not bn_training_available(), reason="training batch norm not implemented yet")
def test_training_batch_norm_on_more_than_two_to_the_31_elements():
    x = np.zeros((BIG // 2 + 1, 2), np.float32)
    x[-1] = (4.0, -4.0)
    mean, var = np.zeros(2, np.float32), np.ones(2, np.float32)
    y = F.batch_norm(x, mean, var, training=True, momentum=1.0, axis=-1)
    n = x.shape[0]
    np.testing.assert_allclose(mean, [4.0 / n, -4.0 / n], rtol=1e-5)
    assert y[-1, 0] > 1000 and y[-1, 1] < -1000
