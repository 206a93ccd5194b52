"""Determinism: every kernel gives bit-identical outputs (and mutated buffers)
for 1, 2 and 3 threads, on every SIMD target this CPU runs, at sizes above the
serial threshold; and repeated runs with the same thread count agree."""
from __future__ import annotations

import numpy as np
import pytest

import fastbn

from test_reliability_kernels import (CASE_IDS, DTYPES, KERNEL_CASES, THREADED_SIZE, assert_identical,
                                      run_case)


@pytest.fixture
def restore_threads():
    yield
    fastbn.set_num_threads(None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=CASE_IDS)
def test_one_two_and_three_threads_give_identical_bits(case, dtype, simd_target, restore_threads):
    results = {}
    for threads in (1, 2, 3):
        fastbn.set_num_threads(threads)
        assert fastbn.get_num_threads() == threads
        results[threads] = run_case(case, THREADED_SIZE, dtype, seed=3, calls=3)
    assert_identical(results[2], results[1], f"{case.name} {simd_target}: 2 vs 1 threads")
    assert_identical(results[3], results[1], f"{case.name} {simd_target}: 3 vs 1 threads")


@pytest.mark.parametrize("case", KERNEL_CASES, ids=CASE_IDS)
def test_repeated_runs_with_two_threads_give_identical_bits(case, restore_threads):
    fastbn.set_num_threads(2)
    first = run_case(case, THREADED_SIZE, np.float32, seed=5)
    second = run_case(case, THREADED_SIZE, np.float32, seed=5)
    assert_identical(second, first, case.name)


@pytest.mark.parametrize("size", [32767, 32768, 32769, 65537, 2 * 4096 * 3 + 1])
def test_sizes_around_the_serial_threshold_are_thread_independent(size, restore_threads):
    for case in KERNEL_CASES:
        fastbn.set_num_threads(1)
        serial = run_case(case, size, np.float64, seed=size)
        fastbn.set_num_threads(3)
        assert_identical(run_case(case, size, np.float64, seed=size), serial, f"{case.name} n={size}")
