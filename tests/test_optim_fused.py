"""The fused multi-tensor kernels against the NumPy reference: every
optimizer x option x dtype, every SIMD target, 1 vs 2 threads bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

import fastbn
from fastbn import optim
from fastbn.optim import _fused

from test_optim_cases import (CASES, DTYPES, SHAPES, assert_snapshots_close, assert_snapshots_equal,
                              make_params, run_case, snapshot, train)

# Large enough (> 2 x 32768 elements) that the kernels really use two threads,
# with tensors smaller than, equal to and larger than one 4096-element chunk.
THREADED_SHAPES = ((1,), (7,), (4096,), (4097,), (70001,), (300, 301), (64,), (12289,))
MANY_SMALL_SHAPES = tuple((37 + (i % 5),) for i in range(1000))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_fused_step_matches_reference_for_params_and_every_state_buffer(case, dtype):
    assert_snapshots_close(run_case(case, dtype, backend="fast"),
                           run_case(case, dtype, backend="reference"), dtype)


@pytest.mark.parametrize("target", fastbn.available_simd_targets())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["sgd_nesterov_weight_decay", "momentum", "rmsprop_all_options",
                                  "adam_all_options", "adamw", "adagrad_lr_decay_weight_decay",
                                  "lion_weight_decay_maximize", "nadam_decoupled_maximize",
                                  "radam_weight_decay_early_rectification",
                                  "adadelta_weight_decay_maximize", "adamax_weight_decay_maximize"])
def test_every_simd_target_matches_reference(case, dtype, target, restore_config):
    fastbn.set_simd_target(target)
    assert_snapshots_close(run_case(case, dtype, THREADED_SHAPES, backend="fast"),
                           run_case(case, dtype, THREADED_SHAPES, backend="reference"), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_one_and_two_threads_give_identical_bits(case, dtype, restore_config):
    if fastbn.get_num_threads() < 2:
        pytest.skip("needs 2 threads")
    fastbn.set_num_threads(1)
    single = run_case(case, dtype, THREADED_SHAPES)
    fastbn.set_num_threads(2)
    double = run_case(case, dtype, THREADED_SHAPES)
    assert_snapshots_equal(double, single)


@pytest.mark.parametrize("case", ["adam_amsgrad", "sgd_momentum", "rmsprop_centered"])
def test_a_thousand_small_tensors_match_reference_and_are_thread_independent(case, restore_config):
    expected = run_case(case, np.float32, MANY_SMALL_SHAPES, backend="reference")
    threads = restore_config
    fastbn.set_num_threads(1)
    single = run_case(case, np.float32, MANY_SMALL_SHAPES)
    fastbn.set_num_threads(threads)
    default = run_case(case, np.float32, MANY_SMALL_SHAPES)
    assert_snapshots_close(default, expected, np.float32)
    assert_snapshots_equal(default, single)


def test_group_mixing_float32_and_float64_matches_reference():
    shapes = SHAPES

    def run(backend):
        params = make_params(shapes, np.float32) + make_params(shapes, np.float64, seed=5)
        with fastbn.use_backend(backend):
            opt = train("adam_all_options", params)
        return snapshot(params, opt)

    fast, reference = run("fast"), run("reference")
    for name in reference:
        tol = dict(rtol=2e-5, atol=2e-6) if reference[name].dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(fast[name], reference[name], err_msg=name, **tol)


def test_flag_bits_agree_with_the_c_header():
    from fastbn.optim import _optim
    assert _optim.FLAGS == {"maximize": _fused.FLAG_MAXIMIZE, "weight_decay": _fused.FLAG_WEIGHT_DECAY,
                            "momentum": _fused.FLAG_MOMENTUM, "nesterov": _fused.FLAG_NESTEROV,
                            "centered": _fused.FLAG_CENTERED, "amsgrad": _fused.FLAG_AMSGRAD,
                            "decoupled": _fused.FLAG_DECOUPLED}


def test_state_replaced_by_a_wrong_array_is_rejected_naming_the_parameter():
    a, b = make_params([(3,), (5,)], np.float32)
    opt = optim.Adam([a, b])
    a.grad, b.grad = np.ones(3, np.float32), np.ones(5, np.float32)
    opt.step()
    opt.state[b]["exp_avg_sq"] = np.zeros(5, np.float64)
    before = a.data.copy()
    with pytest.raises(ValueError, match=r"state 'exp_avg_sq' of param_groups\[0\]\['params'\]\[1\]"):
        opt.step()
    np.testing.assert_array_equal(a.data, before)
    assert opt.state[a]["step"] == 1


def test_empty_and_zero_size_parameters_are_fine():
    params = make_params([(0,), (3, 0), (5,)], np.float32)
    for param in params:
        param.grad = np.ones(param.shape, np.float32)
    opt = optim.Adam(params, lr=0.1)
    opt.step()
    assert opt.state[params[0]]["step"] == 1 and opt.state[params[0]]["exp_avg"].shape == (0,)
    np.testing.assert_allclose(params[2].data, make_params([(0,), (3, 0), (5,)], np.float32)[2].data - 0.1,
                               atol=1e-6)
