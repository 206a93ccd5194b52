"""bfloat16 optimizer state (state_dtype="bfloat16"): the fused kernels
against the NumPy reference on every SIMD target, thread-count independence,
the statistics of stochastic rounding, accuracy against float32 state,
state_dict / checkpoint round trips and argument errors."""
import os
import sys

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes")

import fastbn  # noqa: E402
from fastbn import optim  # noqa: E402
from fastbn.optim import _bf16, _fused, _optim  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)

# Chunk-sized, odd-sized and > 2 x 32768-element tensors, so two and three
# threads really split the work.
SHAPES = ((1,), (7,), (4096,), (4097,), (70001,), (300, 301), (513,))

CASES = {
    "sgd_nesterov_weight_decay": (optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "sgd_dampening_maximize": (optim.SGD, dict(lr=0.05, momentum=0.8, dampening=0.3, maximize=True)),
    "momentum_weight_decay": (optim.Momentum, dict(lr=0.1, momentum=0.95, weight_decay=0.02)),
    "rmsprop_centered_momentum": (optim.RMSprop, dict(lr=0.01, centered=True, momentum=0.5, weight_decay=0.01)),
    "rmsprop_plain": (optim.RMSprop, dict(lr=0.01)),
    "adam": (optim.Adam, dict(lr=0.01)),
    "adam_amsgrad_l2": (optim.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.05)),
    "adamw_maximize": (optim.AdamW, dict(lr=0.01, maximize=True)),
    "lion_weight_decay": (optim.Lion, dict(lr=0.001, weight_decay=0.1)),
}


def bits(array):
    return np.ascontiguousarray(array).view(np.uint16).astype(np.int64)


def run_case(case, shapes=SHAPES, backend="fast", steps=4, stochastic_rounding=True, seed=None):
    """Steps of a case on seeded data; returns (params, state arrays) as copies."""
    cls, kwargs = CASES[case]
    rng = np.random.default_rng(1234)
    params = [fastbn.Parameter(rng.standard_normal(shape).astype(np.float32)) for shape in shapes]
    opt = cls(params, state_dtype="bfloat16", stochastic_rounding=stochastic_rounding, **kwargs)
    if seed is not None:
        opt.param_groups[0]["rounding_seed"] = seed
    with fastbn.use_backend(backend):
        for _ in range(steps):
            for param in params:
                param.grad = rng.standard_normal(param.data.shape).astype(np.float32)
            opt.step()
    state = {(index, key): value.copy() for index, param in enumerate(params)
             for key, value in opt.state[param].items() if isinstance(value, np.ndarray)}
    return [param.data.copy() for param in params], state


# section: the rounding itself ------------------------------------------------------

def special_values():
    finite = np.random.default_rng(5).standard_normal(5000).astype(np.float32)
    patterns = np.array([0x7FC00000, 0xFFC00001, 0x7F800001, 0x7F807FFF, 0xFF800001,  # NaNs
                         0x7F800000, 0xFF800000,  # infinities
                         0x00000001, 0x807FFFFF, 0x00008000, 0x00018000,  # subnormals, ties
                         0x7F7FFFFF, 0xFF7F8000, 0x3F808000, 0x3F818000, 0x00000000, 0x80000000],
                        dtype=np.uint32).view(np.float32)
    return np.concatenate([patterns, finite, finite * np.float32(1e-38), finite * np.float32(1e30)])


@pytest.mark.parametrize("target", fastbn.available_simd_targets())
@pytest.mark.parametrize("stochastic", [True, False])
def test_kernel_rounding_equals_numpy_reference_bitwise_on_every_target(target, stochastic, restore_config):
    fastbn.set_simd_target(target)
    values = special_values()
    for slot in range(4):  # three state slots and the parameter's
        for key in (0, 1, 0xDEADBEEFCAFEF00D, _bf16.tensor_key(3, 17, 2)):
            out = np.empty(values.shape, BF16)
            _optim.round_to_bf16(values, out, key, slot, stochastic)
            expected = _bf16.round_to_bf16(values, key, slot, stochastic)
            np.testing.assert_array_equal(bits(out), bits(expected), err_msg=f"slot {slot} key {key}")


def test_tensor_keys_of_kernels_and_reference_agree():
    for seed, step, position in [(0, 1, 0), (0, 2, 0), (0, 1, 1), (2 ** 64 - 1, 2 ** 53, 10 ** 6), (42, 7, 3)]:
        assert _optim.tensor_key(seed, step, position) == _bf16.tensor_key(seed, step, position)
    assert len({_bf16.tensor_key(0, step, 0) for step in range(1, 1000)}) == 999


def test_nearest_even_rounding_matches_ml_dtypes_conversion():
    values = special_values()
    finite = np.isfinite(values)
    ours = _bf16.round_to_bf16(values, 0, 0, stochastic=False)
    np.testing.assert_array_equal(bits(ours[finite]), bits(values[finite].astype(BF16)))


@pytest.mark.parametrize("stochastic", [True, False])
def test_nan_stays_nan_and_infinity_stays_infinity(stochastic):
    values = np.array([np.nan, -np.nan, np.inf, -np.inf], np.float32)
    values = np.concatenate([values, np.array([0x7F800001, 0xFF80FFFF], np.uint32).view(np.float32)])
    out = np.empty(values.shape, BF16)
    _optim.round_to_bf16(values, out, 99, 1, stochastic)
    widened = out.astype(np.float32)
    assert np.isnan(widened[[0, 1, 4, 5]]).all()
    np.testing.assert_array_equal(widened[2:4], [np.inf, -np.inf])


def test_nan_gradient_gives_nan_state_and_inf_state_stays_inf():
    param = fastbn.Parameter(np.zeros(6, np.float32))
    opt = optim.Momentum([param], lr=0.1, momentum=0.5, state_dtype="bfloat16")
    param.grad = np.array([np.nan, 1, np.inf, -np.inf, 1, 1], np.float32)
    opt.step()
    buffer = opt.state[param]["momentum_buffer"].astype(np.float32)
    assert np.isnan(buffer[0]) and buffer[2] == np.inf and buffer[3] == -np.inf
    assert np.isfinite(buffer[[1, 4, 5]]).all()


@pytest.mark.parametrize("target", fastbn.available_simd_targets())
@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("cls, kwargs", [(optim.Adam, {}), (optim.AdamW, dict(maximize=True))])
def test_nan_gradient_payload_in_the_low_half_keeps_its_kept_half_in_the_adam_state(target, stochastic, cls,
                                                                                  kwargs, restore_config):
    # The first step from zero state gives m and v the gradient's NaN,
    # quieted, payload and all; rounding must keep its top half with the
    # quiet bit.  An increment added to a payload whose low half is nearly
    # full would carry into the kept half (the AVX2 loop takes the plain
    # add unless the gradient holds a NaN; so does the AVX-512 one).  64
    # elements reach the vectorized loops; the NaNs sit in every 16-element
    # block.
    fastbn.set_simd_target(target)
    patterns = np.array([0x7FC0FFFF, 0xFFC0FFFF, 0x7F80FFFF, 0x7FFFFFFF, 0x7FC08000, 0xFFBFFFFF],
                        np.uint32)
    where = np.array([0, 5, 17, 30, 33, 62])
    grad_bits = np.full(64, np.float32(0.25)).view(np.uint32)
    grad_bits[where] = patterns
    param = fastbn.Parameter(np.zeros(64, np.float32))
    opt = cls([param], lr=0.01, state_dtype="bfloat16", stochastic_rounding=stochastic, **kwargs)
    param.grad = grad_bits.view(np.float32).copy()
    opt.step()
    expected = ((patterns | 0x00400000) >> 16).astype(np.int64)
    for key in ("exp_avg", "exp_avg_sq"):
        np.testing.assert_array_equal(bits(opt.state[param][key])[where], expected, err_msg=key)


@pytest.mark.parametrize("value", [1.0 + 1.0 / 3.0 * 2.0 ** -7, 0.1234567, -3.3e-5, 7.77e20])
def test_stochastic_rounding_is_unbiased_over_1e5_roundings(value):
    n = 100_000
    values = np.full(n, value, np.float32)
    exact = float(np.float32(value))
    out = np.empty(n, BF16)
    _optim.round_to_bf16(values, out, _bf16.tensor_key(11, 1, 0), 0, True)
    mean = out.astype(np.float64).mean()
    assert abs(mean - exact) <= 1e-3 * abs(exact)
    # Nearest-even lands on one neighbour for every copy: a bias that the
    # mean cannot remove (unless the value is a bfloat16 already).
    nearest = float(np.float32(values[:1].astype(BF16)[0]))
    assert nearest != exact
    assert abs(mean - exact) < abs(nearest - exact)
    np.testing.assert_array_equal(bits(out), bits(_bf16.round_to_bf16(values, _bf16.tensor_key(11, 1, 0), 0, True)))


# section: independence of the random bits -------------------------------------------

def _max_lag_bit_correlation(a, b):
    """Largest |correlation| over every (bit of a[k], bit of b[k]) pair of
    16-bit draws, in units of its null standard deviation 1/sqrt(n)."""
    n = a.size
    abits = ((a[:, None] >> np.arange(16, dtype=np.uint32)) & 1).astype(np.float32)
    bbits = ((b[:, None] >> np.arange(16, dtype=np.uint32)) & 1).astype(np.float32)
    abits = (abits - abits.mean(0)) / abits.std(0)
    bbits = (bbits - bbits.mean(0)) / bbits.std(0)
    return np.abs(abits.T @ bbits / n).max() * np.sqrt(n)


def _pair_chi_square(a, b, shift):
    """Chi-square (255 degrees of freedom) of the 256 joint values of four
    bits (from bit `shift`) of a[k] and of b[k]."""
    cells = (((a >> shift) & 15) << 4) | ((b >> shift) & 15)
    counts = np.bincount(cells.astype(np.int64), minlength=256)
    expected = a.size / 256
    return float(((counts - expected) ** 2 / expected).sum())


# chi-square with 255 degrees of freedom: mean 255, sd sqrt(510) = 22.6; the
# bound is 6.5 sd above the mean (a false alarm about once in 10**10).
_CHI_SQUARE_BOUND = 255 + 6.5 * np.sqrt(510)
# largest of 256 standard normals: 6 sd is a false alarm about once in 10**6.
_CORRELATION_BOUND = 6.0


def _neighbour_pairs(key, n):
    """(a, b) pairs of 16-bit draws that share a counter or sit next to
    each other: consecutive elements of each slot, the two halves of one
    word (slots 0 and 1 of an element; slot 2 or 3 of elements 2j, 2j+1),
    and the same element in different words."""
    streams = [_bf16.random_bits(key, n, slot) for slot in range(4)]
    pairs = {}
    for slot, stream in enumerate(streams):
        pairs[f"slot {slot} lag 1"] = (stream[:-1], stream[1:])
        pairs[f"slot {slot} lag 2"] = (stream[:-2], stream[2:])
        pairs[f"slot {slot} even-odd"] = (stream[0::2], stream[1::2])
    pairs["slots 0 and 1"] = (streams[0], streams[1])
    pairs["slots 1 and 3"] = (streams[1], streams[3])
    pairs["slots 2 and 3"] = (streams[2], streams[3])
    pairs["slot 0 and next slot 1"] = (streams[0][1:], streams[1][:-1])
    return pairs


@pytest.mark.parametrize("key", [0, _bf16.tensor_key(5, 123, 7)])
def test_random_bits_of_consecutive_counters_are_uncorrelated(key):
    # 200k draws per stream: every bit pair between neighbouring draws
    # uncorrelated, and the joint distribution of four low, middle and high
    # bits of neighbours uniform.
    for name, (a, b) in _neighbour_pairs(key, 200_000).items():
        assert _max_lag_bit_correlation(a, b) < _CORRELATION_BOUND, name
        for shift in (0, 6, 12):
            assert _pair_chi_square(a, b, shift) < _CHI_SQUARE_BOUND, (name, shift)


def test_independence_checks_reject_a_correlated_generator():
    # The checks above can fail: a one-multiply hash of consecutive counters
    # (x ^ x >> 16) * c is caught by both (its low bits follow the counter).
    counter = np.arange(300_000, dtype=np.uint32) + np.uint32(12345)
    words = (counter ^ (counter >> np.uint32(16))) * np.uint32(0x7FEB352D)
    low = words & np.uint32(0xFFFF)
    assert _max_lag_bit_correlation(low[:-1], low[1:]) > _CORRELATION_BOUND
    assert _pair_chi_square(low[:-1], low[1:], 0) > _CHI_SQUARE_BOUND


@pytest.mark.parametrize("slot", range(4))
def test_kernel_rounding_decisions_of_neighbouring_elements_are_uncorrelated(slot):
    # A value one third of the way between two bfloat16s rounds up with
    # probability 1/3; the decisions of elements k and k+1 (and of the two
    # elements of one pair) must be independent: lag-1 correlation within
    # 6 / sqrt(n), and P(both up) = 1/9.
    n = 300_000
    low = np.float32(1.0)
    values = np.full(n, np.float32(1.0 + (1.0 / 3.0) * 2.0 ** -7))
    out = np.empty(n, BF16)
    _optim.round_to_bf16(values, out, _bf16.tensor_key(9, 4, 1), slot, True)
    up = (out.astype(np.float32) > low).astype(np.float64)
    assert abs(up.mean() - 1 / 3) < 6 * np.sqrt(2 / 9 / n)
    for a, b in ((up[:-1], up[1:]), (up[0::2], up[1::2]), (up[1:-1:2], up[2::2])):
        assert abs(np.corrcoef(a, b)[0, 1]) < 6 / np.sqrt(a.size)
        assert abs(np.mean(a * b) - 1 / 9) < 6 * np.sqrt((1 / 9) * (8 / 9) / a.size)


# section: optimizer steps -------------------------------------------------------------

def assert_within_one_bf16_ulp(fast, reference):
    fast_params, fast_state = fast
    ref_params, ref_state = reference
    assert fast_state.keys() == ref_state.keys()
    for key in fast_state:
        assert fast_state[key].dtype == BF16 and ref_state[key].dtype == BF16, key
        # The float32 updates differ by float32 rounding (FMA contraction,
        # Adam's refactored bias correction), which can move a value across
        # a rounding threshold: one bfloat16 ulp (2**-7 relative at most),
        # plus float32 cancellation error where terms of size ~1 cancel.
        # The rounding itself is bitwise identical (tests above), and one
        # step is bitwise identical to the float32 kernel's update rounded
        # by the reference (test_one_step_equals_float32_kernel_rounded_...).
        # A state element rounded one ulp apart at one step feeds the next
        # steps, so a few in 10**4 may drift further: by a few ulps, or by
        # an ulp of the terms where the terms cancel (beta1 m + (1 - beta1) g
        # near zero).
        fast_values = fast_state[key].astype(np.float64)
        ref_values = ref_state[key].astype(np.float64)
        scale = np.maximum(np.abs(fast_values), np.abs(ref_values))
        difference = np.abs(fast_values - ref_values)
        assert np.mean(difference <= 2.0 ** -7 * scale + 1e-6) >= 1 - 1e-4, key
        assert np.all(difference <= 2.0 ** -5 * scale + 2e-3), key
        assert np.mean(bits(fast_state[key]) == bits(ref_state[key])) >= 0.999, key
    # A state element one bfloat16 ulp (2**-8 relative) apart moves its
    # parameter by lr * 2**-8 * |state| at the next step; all others agree
    # to float32 rounding.
    for fast_param, ref_param in zip(fast_params, ref_params):
        close = np.isclose(fast_param, ref_param, rtol=1e-4, atol=1e-5)
        assert np.mean(close) >= 0.999
        np.testing.assert_allclose(fast_param, ref_param, rtol=0, atol=2e-3)


@pytest.mark.parametrize("target", fastbn.available_simd_targets())
@pytest.mark.parametrize("case", list(CASES))
def test_bf16_state_step_matches_reference_on_every_target(case, target, restore_config):
    fastbn.set_simd_target(target)
    assert_within_one_bf16_ulp(run_case(case), run_case(case, backend="reference"))


@pytest.mark.parametrize("case", ["adam_amsgrad_l2", "rmsprop_centered_momentum", "sgd_nesterov_weight_decay"])
def test_nearest_even_state_matches_reference(case):
    assert_within_one_bf16_ulp(run_case(case, stochastic_rounding=False),
                               run_case(case, backend="reference", stochastic_rounding=False))


@pytest.mark.parametrize("case", list(CASES))
def test_one_two_and_three_threads_give_identical_bits(case, restore_config):
    results = []
    for threads in (1, 2, 3):
        fastbn.set_num_threads(threads)
        results.append(run_case(case))
    for params, state in results[1:]:
        for mine, first in zip(params, results[0][0]):
            np.testing.assert_array_equal(mine.view(np.uint32), first.view(np.uint32))
        for key in state:
            np.testing.assert_array_equal(bits(state[key]), bits(results[0][1][key]), err_msg=str(key))


def test_rounding_seed_changes_the_rounding_draws_not_the_values_beyond_rounding():
    _, state_a = run_case("adam", shapes=((5000,),), seed=0)
    _, state_b = run_case("adam", shapes=((5000,),), seed=1)
    a, b = state_a[0, "exp_avg"], state_b[0, "exp_avg"]
    assert 0.05 < np.mean(bits(a) != bits(b)) < 0.95
    np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=2.0 ** -5, atol=5e-3)


def test_nearest_rounding_stalls_where_stochastic_rounding_does_not():
    # v = 0.999 v + 0.001 g with g = 1: the increment 0.001 (1 - v) falls
    # below half a bfloat16 step long before v approaches 1.
    steps, n = 3000, 4096
    exact = 1 - 0.999 ** steps
    results = {}
    for stochastic in (False, True):
        param = fastbn.Parameter(np.zeros(n, np.float32))
        opt = optim.Momentum([param], lr=0.0, momentum=0.999, state_dtype="bfloat16",
                             stochastic_rounding=stochastic)
        param.grad = np.ones(n, np.float32)
        for step in range(steps):
            if step == steps - 100:
                before = opt.state[param]["momentum_buffer"].copy()
            opt.step()
        results[stochastic] = (before, opt.state[param]["momentum_buffer"].astype(np.float64))
    stalled_before, stalled = results[False]
    assert np.array_equal(bits(stalled_before), bits(stalled.astype(np.float32).astype(BF16)))
    assert stalled.max() < 0.6 * exact  # nearest-even lost every update for the last 100 steps
    stochastic_mean = results[True][1].mean()
    assert abs(stochastic_mean - exact) < 0.01 * exact


def test_bf16_state_adam_tracks_float32_state_adam_over_100_steps():
    rng = np.random.default_rng(7)
    start = rng.standard_normal(20000).astype(np.float32)
    target = rng.standard_normal(20000).astype(np.float32)
    noise = [rng.standard_normal(20000).astype(np.float32) * 0.1 for _ in range(100)]
    finals = {}
    for state_dtype in ("float32", "bfloat16"):
        param = fastbn.Parameter(start.copy())
        opt = optim.Adam([param], lr=1e-2, state_dtype=state_dtype)
        for step in range(100):
            param.grad = (param.data - target) + noise[step]
            opt.step()
        finals[state_dtype] = param.data.astype(np.float64)
    moved = np.linalg.norm(finals["float32"] - start)
    error = np.linalg.norm(finals["bfloat16"] - finals["float32"])
    assert moved > 0.5
    assert error <= 5e-3 * moved


# section: state dict, checkpoints, resume ------------------------------------------

def make_adam(seed_params=3, **kwargs):
    rng = np.random.default_rng(seed_params)
    params = [fastbn.Parameter(rng.standard_normal(shape).astype(np.float32)) for shape in ((300, 7), (5000,))]
    return params, optim.Adam(params, lr=1e-2, amsgrad=True, state_dtype="bfloat16", **kwargs)


def grads_for(step, params):
    rng = np.random.default_rng(100 + step)
    return [rng.standard_normal(p.data.shape).astype(np.float32) for p in params]


def run_steps(params, opt, first, last):
    for step in range(first, last):
        for param, grad in zip(params, grads_for(step, params)):
            param.grad = grad
        opt.step()


def assert_same_run(params_a, opt_a, params_b, opt_b):
    for a, b in zip(params_a, params_b):
        np.testing.assert_array_equal(a.data.view(np.uint32), b.data.view(np.uint32))
        for key, value in opt_a.state[a].items():
            if isinstance(value, np.ndarray):
                assert opt_b.state[b][key].dtype == BF16
                np.testing.assert_array_equal(bits(value), bits(opt_b.state[b][key]), err_msg=key)
            else:
                assert opt_b.state[b][key] == value


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_state_dict_keeps_bf16_and_resume_is_bit_exact(backend):
    with fastbn.use_backend(backend):
        params, opt = make_adam()
        opt.param_groups[0]["rounding_seed"] = 12345
        run_steps(params, opt, 0, 3)
        saved = opt.state_dict()
        assert saved["param_groups"][0]["rounding_seed"] == 12345
        assert all(value.dtype == BF16 for entry in saved["state"].values()
                   for value in entry.values() if isinstance(value, np.ndarray))
        saved_params = [p.data.copy() for p in params]
        run_steps(params, opt, 3, 6)

        resumed_params, resumed = make_adam(seed_params=99)
        for param, data in zip(resumed_params, saved_params):
            param.data[...] = data
        resumed.load_state_dict(saved)
        run_steps(resumed_params, resumed, 3, 6)
    assert_same_run(params, opt, resumed_params, resumed)


def test_checkpoint_file_keeps_bf16_state_and_resume_is_bit_exact(tmp_path):
    params, opt = make_adam()
    run_steps(params, opt, 0, 2)
    path = os.fspath(tmp_path / "run.fbk")
    fastbn.save(path, {"params": [p.data for p in params], "optimizer": opt})
    run_steps(params, opt, 2, 4)

    resumed_params, resumed = make_adam(seed_params=99)
    loaded = fastbn.load(path)
    for param, data in zip(resumed_params, loaded["params"]):
        param.data[...] = data
    fastbn.load_into(path, {"optimizer": resumed}, strict=False)
    assert all(value.dtype == BF16 for entry in resumed.state.values()
               for value in entry.values() if isinstance(value, np.ndarray))
    run_steps(resumed_params, resumed, 2, 4)
    assert_same_run(params, opt, resumed_params, resumed)


def test_bf16_state_does_not_load_into_a_float32_state_optimizer_and_back():
    params, opt = make_adam()
    run_steps(params, opt, 0, 1)
    plain = optim.Adam([fastbn.Parameter(p.data.copy()) for p in params], lr=1e-2, amsgrad=True)
    with pytest.raises(ValueError, match=r"state_dtype.*'float32'.*got 'bfloat16'"):
        plain.load_state_dict(opt.state_dict())
    for param in plain.param_groups[0]["params"]:
        param.grad = np.ones_like(param.data)
    plain.step()
    _, bf16_opt = make_adam()
    state = plain.state_dict()
    for key in ("state_dtype", "stochastic_rounding", "rounding_seed"):
        state["param_groups"][0][key] = bf16_opt.param_groups[0][key]
    with pytest.raises(TypeError, match=r"expected dtype bfloat16.*got float32"):
        bf16_opt.load_state_dict(state)


# section: arguments --------------------------------------------------------------------

def one_param(dtype=np.float32):
    return [fastbn.Parameter(np.zeros(4, dtype))]


@pytest.mark.parametrize("cls", [optim.SGD, optim.Momentum, optim.RMSprop, optim.Adam, optim.AdamW, optim.Lion])
def test_every_covered_optimizer_defaults_to_float32_state_and_accepts_bf16(cls):
    params = one_param()
    opt = cls(params)
    assert "state_dtype" not in opt.param_groups[0]
    bf16_opt = cls(one_param(), state_dtype="bfloat16", stochastic_rounding=False)
    assert bf16_opt.param_groups[0]["state_dtype"] == "bfloat16"
    assert bf16_opt.param_groups[0]["stochastic_rounding"] is False


def test_bad_state_options_raise_naming_the_argument():
    with pytest.raises(ValueError, match=r"state_dtype: expected one of \('float32', 'bfloat16'\), got 'float16'"):
        optim.Adam(one_param(), state_dtype="float16")
    with pytest.raises(TypeError, match=r"state_dtype: expected one of .*a str.*got"):
        optim.Adam(one_param(), state_dtype=np.float32)
    with pytest.raises(TypeError, match=r"stochastic_rounding: expected a bool, got"):
        optim.SGD(one_param(), momentum=0.9, state_dtype="bfloat16", stochastic_rounding="yes")
    with pytest.raises(TypeError, match=r"\['params'\]\[0\]\.data: expected dtype float32 .*got float64"):
        optim.Lion(one_param(np.float64), state_dtype="bfloat16")
    opt = optim.Momentum(one_param(), state_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['state_dtype'\]: expected 'bfloat16'"):
        opt.add_param_group({"params": one_param(), "state_dtype": "float32"})
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['rounding_seed'\]: expected an int in \[0, 2\*\*64\)"):
        opt.add_param_group({"params": one_param(), "rounding_seed": -1})
    assert len(opt.param_groups) == 1


def test_step_with_a_replaced_float64_parameter_raises_and_changes_nothing():
    params = one_param()
    opt = optim.Adam(params, state_dtype="bfloat16")
    params[0].grad = np.ones(4, np.float32)
    opt.step()
    before = {key: (value.copy() if isinstance(value, np.ndarray) else value)
              for key, value in opt.state[params[0]].items()}
    params[0].data = np.zeros(4, np.float64)
    params[0].grad = np.ones(4, np.float64)
    with pytest.raises(TypeError, match=r"expected dtype float32"):
        opt.step()
    assert opt.state[params[0]]["step"] == before["step"]
    np.testing.assert_array_equal(bits(opt.state[params[0]]["exp_avg"]), bits(before["exp_avg"]))


def test_missing_ml_dtypes_raises_import_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    with pytest.raises(ImportError, match=r"fastbn\[bf16\]"):
        optim.Adam(one_param(), state_dtype="bfloat16")
    optim.Adam(one_param())  # float32 state never needs it


def test_stochastic_rounding_flag_bit_agrees_with_the_c_header():
    assert _optim.STOCHASTIC_ROUNDING_FLAG == _fused.FLAG_STOCHASTIC_ROUNDING
