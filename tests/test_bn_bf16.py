"""Batch norm on bfloat16 activations (ml_dtypes.bfloat16): the FB_DTYPE_BF16
kernels through the bridge (fastbn._bn), on every SIMD target the CPU has,
both layouts, with and without the fused ReLU, against

- the NumPy twin (fastbn.reference._bf16_bn), which performs the same
  float32/float64 operations: bit for bit on data whose float64 sums are exact
  (small dyadic values, a power-of-two count per channel), where the order of
  the sums cannot matter;
- the float32 kernels on the same (widened) values: every bfloat16 output
  within 1 bfloat16 ulp of the float32 output, statistics to 1e-6 relative;
- themselves on 1, 2 and 3 threads: bit-identical;

and the float32 -> bfloat16 conversion (portable, and the AVX512_BF16
instruction where the CPU has it) against NumPy's nearest-even rounding."""
import os
import subprocess
import sys

import numpy as np
import pytest

import fastbn
from fastbn import _bn
from fastbn import functional as F

ml_dtypes = pytest.importorskip("ml_dtypes")
from fastbn.reference import _bf16_bn as R  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
EPS = 1e-5
MOMENTUM = 0.1


def geometry(shape, channels_last):
    if channels_last:
        return int(np.prod(shape[:-1])), shape[-1], 1
    return shape[0], shape[1], int(np.prod(shape[2:]))


def channel_count(shape, channels_last):
    return shape[-1] if channels_last else shape[1]


def symmetric_offsets(rng, shape, channels_last):
    """Multiples of 1/8 in [-5, 5) whose values in every channel come in
    pairs v, -v (one 0 when the count is odd), shuffled: every channel's
    mean is exactly 0, whatever its count of values."""
    C = channel_count(shape, channels_last)
    count = int(np.prod(shape)) // C
    half = rng.integers(-40, 40, (count // 2, C)) / 8
    columns = np.concatenate([half, -half, np.zeros((count % 2, C))])
    columns = rng.permuted(columns, axis=0)
    if channels_last:
        return columns.reshape(shape)
    return columns.reshape(shape[0], -1, C).transpose(0, 2, 1).reshape(shape)


def make(rng, shape, channels_last, dyadic):
    """x, dy (bfloat16) and the float32 per-channel vectors.  `dyadic`:
    multiples of 1/8 (x, about an exact per-channel mean of 2) and 1/16 (dy)
    in a small range, so every sum the kernels and the twin take is exact:
    the statistics' float64 sums, and the backwards' float32 short sums of
    g and g * (x - mean) (few significant bits, as x - mean is a multiple
    of 1/8) as well as their float64 totals."""
    C = channel_count(shape, channels_last)
    if dyadic:
        x = (symmetric_offsets(rng, shape, channels_last) + 2).astype(BF16)
        dy = (rng.integers(-24, 24, shape) / 16).astype(BF16)
        running_mean = (rng.integers(-8, 8, C) / 4).astype(np.float32)
    else:
        x = (rng.standard_normal(shape) * 2 + 3).astype(BF16)
        dy = rng.standard_normal(shape).astype(BF16)
        running_mean = rng.normal(3.0, 0.5, C).astype(np.float32)
    weight = rng.normal(1.0, 0.5, C).astype(np.float32)
    bias = rng.normal(0.0, 0.5, C).astype(np.float32)
    running_var = (np.abs(rng.standard_normal(C)) + 0.5).astype(np.float32)
    return x, dy, weight, bias, running_mean, running_var


def run_all(module, x, dy, weight, bias, running_mean, running_var, geo, relu):
    """Every fused kernel: training forward (with running statistics), eval
    forward, training backward and eval backward (with parameter gradients,
    accumulated onto nonzero starting values).  Returns every output and every
    mutated buffer, as arrays."""
    outer, C, inner = geo
    rm, rv = running_mean.copy(), running_var.copy()
    if module is _bn:
        y, mean, invstd, _ = _bn.train_forward(x, None, outer, C, inner, weight, bias, EPS, rm,
                                               rv, MOMENTUM, relu)
        y_eval, _ = _bn.eval_forward(x, None, outer, C, inner, running_mean, running_var,
                                     weight, bias, EPS, relu)
    else:
        y, mean, invstd = R.train_forward(x, None, outer, C, inner, weight, bias, EPS, rm, rv,
                                          MOMENTUM, relu)
        y_eval = R.eval_forward(x, None, outer, C, inner, running_mean, running_var, weight,
                                bias, EPS, relu)
    dweight, dbias = np.full(C, 0.5, np.float32), np.full(C, -0.25, np.float32)
    dx = module.backward(dy, x, None, outer, C, inner, mean, invstd, weight, dweight, dbias,
                         True, bias, relu)
    dweight_eval, dbias_eval = np.zeros(C, np.float32), np.zeros(C, np.float32)
    dx_eval = module.backward_eval(dy, x, None, outer, C, inner, running_mean, running_var,
                                   weight, EPS, dweight_eval, dbias_eval, False, bias, relu)
    # without parameter gradients (and without relu) x is not read: a pass
    # with no reduction, walked in memory order
    dx_eval_only = module.backward_eval(dy, x if relu else None, None, outer, C, inner,
                                        running_mean, running_var, weight, EPS, None, None,
                                        False, bias, relu)
    return dict(y=y, mean=mean, invstd=invstd, running_mean=rm, running_var=rv, y_eval=y_eval,
                dx=dx, dweight=dweight, dbias=dbias, dx_eval=dx_eval,
                dweight_eval=dweight_eval, dbias_eval=dbias_eval, dx_eval_only=dx_eval_only)


def assert_same_bits(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        got, want = np.asarray(actual[name]), np.asarray(expected[name])
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        bits = np.uint16 if got.dtype == BF16 else np.uint32
        mismatch = np.flatnonzero(got.view(bits) != want.view(bits))
        assert mismatch.size == 0, (
            f"{name}: {mismatch.size} of {got.size} differ, first at {mismatch[0]}: "
            f"{got.ravel()[mismatch[0]]} != {want.ravel()[mismatch[0]]}")


@pytest.fixture
def threads():
    yield fastbn.set_num_threads
    fastbn.set_num_threads(None)


# (shape, channels_last)
DYADIC_CASES = [((2, 3, 4, 4), False), ((4, 1, 8), False), ((2, 17, 2, 4), False),
                ((1, 5, 2), False), ((2, 4, 4, 3), True), ((16, 33), True), ((2, 65), True),
                ((8, 2, 2, 17), True), ((64, 3, 16, 16), False), ((4, 16, 16, 19), True), ((4, 16, 16, 8), True),
                # channels walked in blocks, row by row (bn_bf16_owned_block): rows of 8192
                # values cut by 4096-value chunks; rows of 2048, two per chunk
                ((4, 10, 8192), False), ((16, 10, 32, 64), False)]


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape,channels_last", DYADIC_CASES)
def test_every_bf16_kernel_equals_the_numpy_twin_bit_for_bit_on_exact_sums(
        simd_target, shape, channels_last, relu, rng):
    inputs = make(rng, shape, channels_last, dyadic=True)
    geo = geometry(shape, channels_last)
    expected = run_all(R, *inputs, geo, relu)
    assert_same_bits(run_all(_bn, *inputs, geo, relu), expected)



@pytest.mark.parametrize("relu", [False, True])
def test_outputs_large_enough_for_streaming_stores_equal_the_twin_bit_for_bit(
        simd_target, relu, rng):
    """Outputs of 8 MB and more are written with non-temporal stores (on the
    AVX-512 target with AVX512_BF16): the same bits as the twin, for every
    kernel on exact sums, and for the eval kernels on any data with channel
    runs that start off the 32-byte boundary (odd spatial size)."""
    shape = (2, 8, 512, 512)  # 2**19 values per channel: exact means
    inputs = make(rng, shape, False, dyadic=True)
    geo = geometry(shape, False)
    assert_same_bits(run_all(_bn, *inputs, geo, relu), run_all(R, *inputs, geo, relu))
    shape = (3, 7, 401, 501)
    x, dy, weight, bias, running_mean, running_var = make(rng, shape, False, False)
    geo = geometry(shape, False)
    y, _ = _bn.eval_forward(x, None, *geo, running_mean, running_var, weight, bias, EPS, relu)
    y_twin = R.eval_forward(x, None, *geo, running_mean, running_var, weight, bias, EPS, relu)
    dx = _bn.backward_eval(dy, x, None, *geo, running_mean, running_var, weight, EPS, None,
                           None, False, bias, relu)
    dx_twin = R.backward_eval(dy, x, None, *geo, running_mean, running_var, weight, EPS, None,
                              None, False, bias, relu)
    assert np.array_equal(y.view(np.uint16), y_twin.view(np.uint16))
    assert np.array_equal(dx.view(np.uint16), dx_twin.view(np.uint16))


@pytest.mark.parametrize("relu", [False, True])
def test_channels_last_statistics_of_16_mib_and_more_equal_the_twin_bit_for_bit(
        simd_target, relu, rng):
    """A channels-last x of 16 MiB and more, where the training forward's
    reduction fetches rows ahead into L2 (FB_BN_FWD_PREFETCH_MIN_BYTES):
    every kernel gives the twin's bits on exact sums (2**16 rows).  A
    prefetch changes no value, so this guards the walk at that size (its
    index arithmetic, the rows near the end), not the prefetch itself."""
    shape = (4, 64, 256, 128)  # 2**23 values: 16 MiB of bfloat16
    inputs = make(rng, shape, True, dyadic=True)
    assert inputs[0].nbytes >= 16 << 20
    geo = geometry(shape, True)
    assert_same_bits(run_all(_bn, *inputs, geo, relu), run_all(R, *inputs, geo, relu))


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape,channels_last", [((3, 5, 7, 9), False), ((2, 9, 7, 33), True),
                                                  ((64, 3, 8, 8), False), ((999, 17), True)])
def test_eval_kernels_equal_the_twin_bit_for_bit_on_any_data(
        simd_target, shape, channels_last, relu, rng):
    """The eval kernels' coefficients come from the running statistics alone
    (no sums), so on any data every value is the same float32 fused
    multiply-add: the instruction on FMA targets, the exact emulation on the
    baseline and in NumPy -- bit-identical outputs."""
    x, dy, weight, bias, running_mean, running_var = make(rng, shape, channels_last, False)
    geo = geometry(shape, channels_last)
    y, _ = _bn.eval_forward(x, None, *geo, running_mean, running_var, weight, bias, EPS, relu)
    y_twin = R.eval_forward(x, None, *geo, running_mean, running_var, weight, bias, EPS, relu)
    dx = _bn.backward_eval(dy, x, None, *geo, running_mean, running_var, weight, EPS, None,
                           None, False, bias, relu)
    dx_twin = R.backward_eval(dy, x, None, *geo, running_mean, running_var, weight, EPS, None,
                              None, False, bias, relu)
    assert np.array_equal(y.view(np.uint16), y_twin.view(np.uint16))
    assert np.array_equal(dx.view(np.uint16), dx_twin.view(np.uint16))


def test_twin_fma_rounds_once_where_two_roundings_differ():
    """fma32 against exact rational arithmetic on cases where rounding the
    float64 sum to float32 (a second rounding) would be wrong."""
    from fractions import Fraction
    rng = np.random.default_rng(3)
    a = rng.standard_normal(20000).astype(np.float32)
    b = rng.standard_normal(20000).astype(np.float32)
    # c cancels most of a * b, leaving a few bits: ties are frequent
    c = (-(a.astype(np.float64) * b) * (1 + 2.0 ** -20)).astype(np.float32)
    got = R.fma32(a, b, c)
    for i in range(0, 20000, 7):
        exact = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
        below = np.float32(float(exact))
        # the float32 nearest the exact value (ties to even) by comparing neighbours
        candidates = [np.nextafter(below, np.float32(-np.inf)), below,
                      np.nextafter(below, np.float32(np.inf))]
        best = min(candidates, key=lambda v: (abs(Fraction(float(v)) - exact),
                                              int(np.float32(v).view(np.uint32)) & 1))
        assert got[i] == best, (a[i], b[i], c[i])


def bf16_order(values):
    """bfloat16 bit patterns mapped to integers in the order of the values
    (adjacent representable values differ by 1; +0 and -0 coincide)."""
    bits = np.asarray(values).view(np.uint16).astype(np.int64)
    return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)


def assert_within_one_ulp(actual_bf16, expected_f32, name, scale):
    """Within 1 bfloat16 ulp of the float32 result rounded, except where
    that result is itself cancellation noise: |difference| <= 1e-5 * scale
    (the size of the terms that cancelled, e.g. max |dy| * |weight * invstd|
    for dx; with 2 values per channel dx is 0 up to rounding)."""
    expected = R.round_bf16(np.asarray(expected_f32, np.float32))
    distance = np.abs(bf16_order(actual_bf16).ravel() - bf16_order(expected).ravel())
    difference = np.abs(actual_bf16.astype(np.float64).ravel()
                        - np.asarray(expected_f32, np.float64).ravel())
    bad = (distance > 1) & (difference > 1e-5 * scale)
    assert not bad.any(), (f"{name}: {bad.sum()} values more than 1 bfloat16 ulp apart, "
                           f"worst {distance[bad].max()} ulp")


# odd shapes, odd channel counts, tiny batches; both layouts
ODD_CASES = [((2, 3, 5, 7), False), ((1, 1, 3), False), ((3, 5), True), ((2, 1), True),
             ((2, 7, 5, 3), True), ((5, 13, 9, 11), False), ((3, 9, 9, 63), True),
             ((7, 129), True), ((2, 2, 3, 4, 33), True), ((2, 4, 3, 3, 3), False)]


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape,channels_last", ODD_CASES)
def test_bf16_outputs_are_within_one_ulp_of_the_float32_kernels_on_the_same_values(
        simd_target, shape, channels_last, relu, rng):
    x, dy, weight, bias, running_mean, running_var = make(rng, shape, channels_last, False)
    geo = geometry(shape, channels_last)
    got = run_all(_bn, x, dy, weight, bias, running_mean, running_var, geo, relu)
    x32, dy32 = x.astype(np.float32), dy.astype(np.float32)
    want = run_all(_bn, x32, dy32, weight, bias, running_mean, running_var, geo, relu)
    gain = np.abs(weight).max() * max(want["invstd"].max(), (1 / np.sqrt(running_var + EPS)).max())
    scales = dict(y=np.abs(want["y"]).max(), y_eval=np.abs(want["y_eval"]).max(),
                  dx=np.abs(dy32).max() * gain, dx_eval=np.abs(dy32).max() * gain,
                  dx_eval_only=np.abs(dy32).max() * gain)
    for name, scale in scales.items():
        assert got[name].dtype == BF16 and got[name].shape == x.shape
        assert_within_one_ulp(got[name], want[name], name, scale)
    for name in ("mean", "invstd", "running_mean", "running_var"):
        assert got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=name)
    # parameter gradients: sums whose terms cancel; relative to the sum of |terms|
    outer, C, inner = geo
    g = np.abs(dy32.reshape(outer, C, inner)).sum(axis=(0, 2))
    for name in ("dweight", "dbias", "dweight_eval", "dbias_eval"):
        assert got[name].dtype == np.float32
        np.testing.assert_array_less(np.abs(got[name] - want[name]), 1e-5 * (4 * g + 1),
                                     err_msg=name)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_bf16_statistics_match_float64_statistics_of_the_same_values(
        simd_target, channels_last, offset, rng):
    shape = (8, 5, 33, 31) if not channels_last else (8, 33, 31, 5)
    x = (rng.standard_normal(shape) + offset).astype(BF16)
    C = channel_count(shape, channels_last)
    outer, C, inner = geometry(shape, channels_last)
    _, mean, invstd, _ = _bn.train_forward(x, None, outer, C, inner, None, None, EPS, None,
                                           None, MOMENTUM)
    v = x.astype(np.float64).reshape(outer, C, inner)
    np.testing.assert_allclose(mean, v.mean(axis=(0, 2)), rtol=1e-6)
    var = v.var(axis=(0, 2))
    np.testing.assert_allclose(1.0 / invstd.astype(np.float64) ** 2 - EPS, var, rtol=1e-6)


# above the serial threshold, so 2 and 3 threads really split the work
THREADED_CASES = [((4, 3, 64, 65), False), ((2, 40, 31, 33), False), ((3, 1, 130, 129), False),
                  ((2, 60, 61, 21), True), ((6, 47, 41, 200), True), ((5000, 7), True),
                  ((3, 41, 61, 24), True),  # pair-order channels-last sums
                  # channel blocks walked row by row: 19 channels split 8+8+3 (1 thread),
                  # 8+2 / 8+1 (2), 7 / 6 / 6 (3); rows of 3080 values cut by 4096-value
                  # chunks; 10 channels: owned on 1 and 2 threads, shared blocks on 3
                  ((6, 19, 40, 77), False), ((6, 10, 40, 77), False)]


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape,channels_last", THREADED_CASES)
def test_bf16_kernels_are_bit_identical_for_1_2_and_3_threads(
        simd_target, threads, shape, channels_last, relu, rng):
    inputs = make(rng, shape, channels_last, dyadic=False)
    geo = geometry(shape, channels_last)
    threads(1)
    one = run_all(_bn, *inputs, geo, relu)
    for count in (2, 3):
        threads(count)
        assert_same_bits(run_all(_bn, *inputs, geo, relu), one)


def test_bf16_kernels_write_in_place_like_the_out_of_place_call(simd_target, rng):
    x, dy, weight, bias, running_mean, running_var = make(rng, (3, 4, 9, 7), False, False)
    geo = geometry(x.shape, False)
    expected, _ = _bn.eval_forward(x, None, *geo, running_mean, running_var, weight, bias, EPS)
    buffer = x.copy()
    _bn.eval_forward(buffer, buffer, *geo, running_mean, running_var, weight, bias, EPS)
    assert np.array_equal(buffer.view(np.uint16), expected.view(np.uint16))


def odd_address_like(array):
    """An uninitialized array of `array`'s shape and dtype whose data starts
    1 byte past a 32-byte boundary (a caller's out= may be any view)."""
    raw = np.empty(array.nbytes + 64, np.uint8)
    start = (-raw.ctypes.data) % 32 + 1
    odd = raw[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    assert odd.ctypes.data % 2 == 1
    return odd


@pytest.mark.parametrize("shape,channels_last", [((2, 3, 9, 17), False), ((4, 5, 5, 64), True)])
def test_an_output_at_an_odd_address_is_refused_and_left_unwritten(shape, channels_last, rng):
    # the kernels store whole 2-byte elements: an unaligned out= view is a
    # ValueError naming out, raised before any write, on every kernel
    x, dy, weight, bias, running_mean, running_var = make(rng, shape, channels_last, False)
    geo = geometry(shape, channels_last)
    _, mean, invstd, _ = _bn.train_forward(x, None, *geo, weight, bias, EPS, None, None,
                                           MOMENTUM, False)
    out = odd_address_like(x)
    out.view(np.uint16)[...] = 0x7777
    rm, rv = running_mean.copy(), running_var.copy()
    calls = [
        lambda: _bn.train_forward(x, out, *geo, weight, bias, EPS, rm, rv, MOMENTUM, False),
        lambda: _bn.eval_forward(x, out, *geo, running_mean, running_var, weight, bias, EPS),
        lambda: _bn.backward(dy, x, out, *geo, mean, invstd, weight, None, None, False, bias),
        lambda: _bn.backward_eval(dy, x, out, *geo, running_mean, running_var, weight, EPS,
                                  None, None, False, bias),
        lambda: F.batch_norm(x, rm, rv, weight, bias, training=True, out=out,
                             axis=-1 if channels_last else 1),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="out: expected an aligned array"):
            call()
    assert (out.view(np.uint16) == 0x7777).all()
    np.testing.assert_array_equal(rm, running_mean)
    np.testing.assert_array_equal(rv, running_var)


# ---- vector paths: tails, special values, every target, the shift narrowing ------

# sizes that leave a tail after the 16-lane vectors, runs that start off the
# 32-byte boundary, channel counts not a multiple of 16 (channels-last rows)
TAIL_CASES = [((3, 5, 7, 9), False), ((2, 3, 1, 33), False), ((5, 2, 3, 11), False),
              ((7, 3, 5, 37), True), ((9, 17), True), ((4, 3, 3, 129), True),
              ((6, 19, 40, 77), False),  # channel blocks walked row by row
              # channels-last backward sums in pair order (a multiple of 8 channels)
              ((5, 3, 3, 24), True), ((9, 8), True)]


def with_special_values(x, dy):
    """x and dy with NaN, infinities, subnormals, signed zeros and the
    largest finite bfloat16 sprinkled in at fixed places (a few channels get
    NaN statistics, the rest stay finite)."""
    x, dy = x.copy(), dy.copy()
    fx, fdy = x.reshape(-1), dy.reshape(-1)
    specials = np.array([np.nan, np.inf, -np.inf, 1e-39, -1e-39, 0.0, -0.0, 3.3895314e38],
                        np.float32).astype(BF16)
    step = max(1, fx.size // 23)
    for i, position in enumerate(range(1, fx.size, step)):
        fdy[position] = specials[i % specials.size]
        if i % 3 == 0:
            fx[position] = specials[(i + 3) % specials.size]
    return x, dy


def assert_same_bits_nan_aware(actual, expected):
    """Bit-identical except NaN lanes, which must be NaN in both: the sign of
    a NaN made from infinities (inf - inf) differs between the hardware FMA
    and the baseline's exact emulation (already so before the vector paths)."""
    assert actual.keys() == expected.keys()
    for name in expected:
        got, want = np.asarray(actual[name]), np.asarray(expected[name])
        assert got.dtype == want.dtype and got.shape == want.shape, name
        wide_got, wide_want = got.astype(np.float32), want.astype(np.float32)
        nan = np.isnan(wide_want)
        assert np.array_equal(np.isnan(wide_got), nan), name
        bits = np.uint16 if got.dtype == BF16 else np.uint32
        assert np.array_equal(got.view(bits)[~nan], want.view(bits)[~nan]), name


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape,channels_last", TAIL_CASES)
def test_bf16_kernels_give_the_same_bits_on_every_target_and_thread_count_with_tails_and_specials(
        threads, shape, channels_last, relu, rng):
    x, dy, weight, bias, running_mean, running_var = make(rng, shape, channels_last, False)
    x, dy = with_special_values(x, dy)
    geo = geometry(shape, channels_last)
    previous = fastbn.get_simd_target()
    results = {}
    try:
        for target in fastbn.available_simd_targets():
            fastbn.set_simd_target(target)
            for count in (1, 2):
                threads(count)
                results[target, count] = run_all(_bn, x, dy, weight, bias, running_mean,
                                                 running_var, geo, relu)
    finally:
        fastbn.set_simd_target(previous)
    first = next(iter(results.values()))
    for key, result in results.items():
        assert_same_bits_nan_aware(result, first)
    # the eval kernels use no sums: bit-identical to the twin on these values too
    y_twin = R.eval_forward(x, None, *geo, running_mean, running_var, weight, bias, EPS, relu)
    assert np.array_equal(first["y_eval"].view(np.uint16), y_twin.view(np.uint16))
    dx_twin = R.backward_eval(dy, x if relu else None, None, *geo, running_mean, running_var,
                              weight, EPS, None, None, False, bias, relu)
    assert np.array_equal(first["dx_eval_only"].view(np.uint16), dx_twin.view(np.uint16))


@pytest.mark.parametrize("shape,seed", [((3, 520), 0), ((3, 520), 2), ((7, 512), 3),
                                        ((11, 200), 0), ((4, 3, 3, 129), 1)])
def test_bf16_running_statistics_have_the_same_bits_on_every_target(shape, seed):
    """The per-channel finalize (statistics, running statistics, the
    rewrite's coefficients) is scalar float64 code compiled per target: with
    the compiler free to fuse a * b + c on FMA targets, these inputs gave
    running_mean / running_var one float32 ulp apart between baseline and
    AVX2 (seeds and shapes found by a search; with specials sprinkled in)."""
    targets = fastbn.available_simd_targets()
    if len(targets) < 2:
        pytest.skip("one SIMD target on this CPU")
    x, dy, weight, bias, running_mean, running_var = make(
        np.random.default_rng(seed), shape, True, False)
    x, dy = with_special_values(x, dy)
    geo = geometry(shape, True)
    previous = fastbn.get_simd_target()
    results = {}
    try:
        for target in targets:
            fastbn.set_simd_target(target)
            results[target] = run_all(_bn, x, dy, weight, bias, running_mean, running_var,
                                      geo, False)
    finally:
        fastbn.set_simd_target(previous)
    first = results[targets[0]]
    for target in targets[1:]:
        assert_same_bits_nan_aware(results[target], first)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape,channels_last", DYADIC_CASES[:4] + [
    ((8, 17), True), ((4, 2, 2, 37), True), ((2, 2, 4, 129), True), ((4, 2, 1, 8), False)])
def test_every_bf16_kernel_equals_the_twin_with_tails_on_exact_sums(
        simd_target, shape, channels_last, relu, rng):
    inputs = make(rng, shape, channels_last, dyadic=True)
    geo = geometry(shape, channels_last)
    assert_same_bits(run_all(_bn, *inputs, geo, relu), run_all(R, *inputs, geo, relu))


def test_kernels_without_the_conversion_instruction_give_the_same_bits(tmp_path, rng):
    """FASTBN_BF16_INSTRUCTION=0 makes the AVX-512 build narrow by shift and
    add instead of the AVX512_BF16 instruction (and is a no-op elsewhere):
    every kernel, both layouts, large enough for streaming stores, with
    special values -- the same bits as this process's (default) run."""
    cases = [((2, 3, 5, 33), False), ((7, 3, 5, 37), True), ((2, 4, 1024, 1030), False),
             ((2, 512, 64, 40), True)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastbn.__file__)))
    saved = {}
    for k, (shape, channels_last) in enumerate(cases):
        x, dy, weight, bias, running_mean, running_var = make(rng, shape, channels_last, False)
        x, dy = with_special_values(x, dy)
        for name, value in dict(x=x.view(np.uint16), dy=dy.view(np.uint16), weight=weight,
                                bias=bias, running_mean=running_mean,
                                running_var=running_var).items():
            saved[f"{k}_{name}"] = value
    np.savez(tmp_path / "inputs.npz", **saved)
    code = f"""
import numpy as np, fastbn, ml_dtypes, sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from test_bn_bf16 import run_all, geometry, BF16
from fastbn import _bn
data = np.load("inputs.npz")
out = {{}}
for target in fastbn.available_simd_targets():
    fastbn.set_simd_target(target)
    for k, (shape, cl) in enumerate({cases!r}):
        args = [data[f"{{k}}_x"].view(BF16), data[f"{{k}}_dy"].view(BF16)]
        args += [data[f"{{k}}_{{n}}"] for n in ("weight", "bias", "running_mean", "running_var")]
        for relu in (False, True):
            for name, value in run_all(_bn, *args, geometry(shape, cl), relu).items():
                value = np.asarray(value)
                out[f"{{target}}_{{k}}_{{relu}}_{{name}}"] = (
                    value.view(np.uint16) if value.dtype == BF16 else value.view(np.uint32))
np.savez("outputs.npz", **out)
"""
    outputs = {}
    for flag in ("0", "1"):
        env = dict(os.environ, PYTHONPATH=root, FASTBN_BF16_INSTRUCTION=flag)
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        outputs[flag] = dict(np.load(tmp_path / "outputs.npz"))
    assert outputs["0"].keys() == outputs["1"].keys() and outputs["0"]
    for key, value in outputs["1"].items():
        assert np.array_equal(outputs["0"][key], value), key


# ---- the conversion ------------------------------------------------------------

def special_floats():
    f32 = np.float32
    finfo = np.finfo(np.float32)
    values = [0.0, -0.0, np.inf, -np.inf, finfo.max, -finfo.max, finfo.tiny, -finfo.tiny,
              finfo.smallest_subnormal, -finfo.smallest_subnormal, finfo.tiny / 2,
              1.0, -1.0, 3.3895314e38, 3.3961776e38, -3.3961776e38]
    bits = [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FBFFFFF, 0x7F80FFFF,
            0x7FFF8000, 0x007FFFFF, 0x807FFFFF, 0x00800000, 0x7F7FFFFF, 0x7F7F8000,
            0x7F7F7FFF, 0x7F7E8000]
    # halfway cases: the dropped half exactly 0x8000, kept lowest bit even/odd
    for kept in (0x3F80, 0x3F81, 0x4000, 0x4001, 0xBF80, 0xBF81, 0x0080, 0x0081, 0x7F7E, 0x7F7F):
        for low in (0x7FFF, 0x8000, 0x8001, 0x0000, 0xFFFF):
            bits.append((kept << 16) | low)
    out = np.array(values, f32)
    return np.concatenate([out, np.array(bits, np.uint32).view(f32)])


def cpu_has_avx512_bf16():
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512_bf16" in f.read()
    except OSError:
        return False


def test_bf16_conversion_matches_numpy_nearest_even_on_every_path(simd_target):
    rng = np.random.default_rng(7)
    sample = np.concatenate([
        special_floats(),
        rng.integers(0, 2 ** 32, 2_000_003, dtype=np.uint64).astype(np.uint32).view(np.float32),
        rng.standard_normal(100_001).astype(np.float32)])
    expected = R.round_bf16(sample).view(np.uint16)
    portable, used = _bn.round_bf16(sample, allow_instruction=False)
    assert not used
    assert np.array_equal(portable, expected)
    fast, used = _bn.round_bf16(sample, allow_instruction=True)
    if simd_target == "avx512" and cpu_has_avx512_bf16():
        assert used, "the AVX512_BF16 instruction was not used on a CPU that has it"
    assert np.array_equal(fast, expected)
    # every tail length of the instruction's masked last vector
    for n in range(1, 33):
        assert np.array_equal(_bn.round_bf16(sample[:n])[0], expected[:n])


def test_twin_rounding_is_numpy_nearest_even_except_subnormals_and_nan():
    values = np.array([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -8 + 2 ** -20,
                       np.finfo(np.float32).max], np.float32)
    got = R.round_bf16(values).astype(np.float64)
    assert got.tolist() == [1.0, 1.0 + 4 * 2 ** -8, 1.0 + 2 ** -7, np.inf]
    sub = np.array([1e-40, -1e-40], np.float32)
    assert R.round_bf16(sub).view(np.uint16).tolist() == [0x0000, 0x8000]
    nan = np.array([0x7F800001], np.uint32).view(np.float32)
    assert R.round_bf16(nan).view(np.uint16).tolist() == [0x7FC0]


def test_split_phases_refuse_bf16_with_a_type_error(rng):
    x = rng.standard_normal((4, 3, 5)).astype(BF16)
    with pytest.raises(TypeError, match="bfloat16"):
        _bn.stats(x, 4, 3, 5)


def test_fastbn_imports_without_ml_dtypes(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastbn.__file__)))
    code = ("import sys; sys.modules['ml_dtypes'] = None\n"
            "import numpy as np, fastbn\n"
            "from fastbn import _bn\n"
            "from fastbn.reference import _bf16_bn\n"
            "assert not _bf16_bn.is_bfloat16(np.zeros(3, np.float32))\n"
            "y, _ = _bn.eval_forward(np.ones((2, 3), np.float32), None, 2, 3, 1,"
            " np.zeros(3, np.float32), np.ones(3, np.float32), None, None, 1e-5)\n"
            "print('ok', y.dtype)\n")
    env = dict(os.environ, PYTHONPATH=root)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok float32"


# ---- the Python API: functional, layers, validation --------------------------------

def layer_run(layer_class, x, dy, channels_last):
    """A float32 layer on bfloat16 activations: two training steps (forward,
    backward), then eval forward and backward.  Returns every output and
    every buffer and gradient the layer holds.  Momentum 0.5 keeps the
    running mean of `make`'s dyadic x (batch mean exactly 2) a multiple of
    1/4 (1, then 1.5), so the eval backward's sums of g * (x - running_mean)
    are exact too."""
    layer = layer_class(channel_count(x.shape, channels_last), momentum=0.5,
                        axis=-1 if channels_last else 1)
    results = []
    for _ in range(2):
        results += [layer(x), layer.backward(dy)]
    layer.eval()
    results += [layer(x), layer.backward(dy)]
    results += [layer.running_mean, layer.running_var, layer.weight.grad, layer.bias.grad,
                layer.num_batches_tracked]
    return results


@pytest.mark.parametrize("layer_class", [fastbn.nn.BatchNorm2d, fastbn.nn.BatchNormReLU2d])
@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_layer_takes_bf16_activations_like_the_reference_backend(
        simd_target, layer_class, channels_last, rng):
    shape = (4, 8, 4, 5) if channels_last else (4, 5, 8, 4)
    x, dy = make(rng, shape, channels_last, dyadic=True)[:2]
    fast = layer_run(layer_class, x, dy, channels_last)
    with fastbn.use_backend("reference"):
        reference = layer_run(layer_class, x, dy, channels_last)
    for got, want in zip(fast, reference):
        assert got.dtype == want.dtype
        assert np.array_equal(np.ravel(got).view(np.uint8), np.ravel(want).view(np.uint8))
    assert [a.dtype for a in fast[:6]] == [BF16] * 6
    assert {a.dtype for a in fast[6:10]} == {np.dtype(np.float32)}
    assert int(fast[10]) == 2


@pytest.mark.parametrize("channels_last", [False, True])
def test_functional_bf16_calls_match_the_reference_backend(simd_target, channels_last, rng):
    shape = (2, 4, 4, 3) if channels_last else (2, 3, 4, 4)
    axis = -1 if channels_last else 1
    x, dy, weight, bias, running_mean, running_var = make(rng, shape, channels_last, True)

    def calls():
        rm, rv = running_mean.copy(), running_var.copy()
        y = F.batch_norm(x, rm, rv, weight, bias, training=True, axis=axis)
        y_eval = F.batch_norm_relu(x, running_mean, running_var, weight, bias, axis=axis)
        y2, mean, invstd = F.batch_norm_forward_train(x, weight, bias, axis=axis)
        dx, dw, db = F.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis)
        dxe, dwe, dbe = F.batch_norm_relu_backward_eval(dy, x, running_mean, running_var,
                                                        weight, bias, axis=axis)
        return [y, rm, rv, y_eval, y2, mean, invstd, dx, dw, db, dxe, dwe, dbe]

    fast = calls()
    with fastbn.use_backend("reference"):
        reference = calls()
    for got, want in zip(fast, reference):
        assert got.dtype == want.dtype
        assert np.array_equal(np.ravel(got).view(np.uint8), np.ravel(want).view(np.uint8))


def test_mixed_bf16_and_float_arguments_raise_type_errors_naming_the_argument():
    x = np.ones((4, 3, 5), BF16)
    f32, f64 = np.ones(3, np.float32), np.ones(3, np.float64)
    with pytest.raises(TypeError, match=r"running_mean: expected dtype float32 .*got float64"):
        F.batch_norm(x, f64, f64, training=False)
    with pytest.raises(TypeError, match=r"weight: expected dtype float32 .*got bfloat16"):
        F.batch_norm(x, f32, f32, weight=np.ones(3, BF16), training=False)
    with pytest.raises(TypeError, match=r"dy: expected dtype bfloat16 .*got float32"):
        F.batch_norm_backward(x.astype(np.float32), x, f32, f32)
    with pytest.raises(TypeError, match=r"input: expected dtype float64 .*got bfloat16"):
        fastbn.nn.BatchNorm1d(3, dtype=np.float64)(x)
    with pytest.raises(TypeError, match="input"):
        F.batch_norm_stats(x)


def test_a_refused_bf16_call_changes_no_state():
    layer = fastbn.nn.BatchNorm1d(3)
    before = [layer.running_mean.copy(), layer.running_var.copy(),
              int(layer.num_batches_tracked)]
    layer.running_var = layer.running_var.astype(np.float64)
    with pytest.raises(TypeError, match="running_var"):
        layer(np.ones((4, 3), BF16))
    assert np.array_equal(layer.running_mean, before[0])
    assert int(layer.num_batches_tracked) == before[2]
