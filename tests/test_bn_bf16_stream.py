"""bfloat16 batch norm where the output is written with non-temporal stores
(fb_bn_stream_output: at least 8 MiB of output, every row a whole number of
64-byte lines) and where it is not, around both conditions: planar rows of
whole lines and of partial lines, just under and at the size threshold,
arrays starting at even offsets within a 64-byte line (0, 2, 30, 48: only
whole lines are streamed; the AVX2 rewrite streams 32-byte pieces across
row ends, staging a piece that straddles two rows), on 1, 2 and 3 threads,
on every SIMD target the CPU has.  Every output
is compared bit for bit with the NumPy twin: all kernels where the float64
sums are exact (dyadic values, a power-of-two count per channel), the eval
kernels (no sums) on any data."""
import numpy as np
import pytest

import fastbn
from fastbn import _bn

ml_dtypes = pytest.importorskip("ml_dtypes")
from fastbn.reference import _bf16_bn as R  # noqa: E402

from test_bn_bf16 import (BF16, EPS, MOMENTUM, assert_same_bits, geometry, make,  # noqa: E402
                          run_all)

STREAM_BYTES = 8 << 20


@pytest.fixture
def threads():
    yield fastbn.set_num_threads
    fastbn.set_num_threads(None)


def at_offset(array, offset):
    """A copy of `array` whose data starts `offset` bytes past a 64-byte
    boundary."""
    raw = np.empty(array.nbytes + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    moved = raw[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    moved[...] = array
    assert moved.ctypes.data % 64 == offset
    return moved


def streamed(shape):
    """Whether the kernels stream this planar output (bn_plan.h's rule)."""
    inner = int(np.prod(shape[2:]))
    return np.prod(shape) * 2 >= STREAM_BYTES and inner * 2 % 64 == 0


# (shape, streamed?).  Exact sums: 2**22 values (8 MiB) with rows of whole
# lines (inner 512: 16 lines; inner 32: one line), one channel fewer (just
# under the threshold), 4 channels (fewer than 4 per thread from 2 threads:
# chunks shared by the threads), and rows of 2 KiB and 16 KiB (the AVX-512
# build's training forward and backward walk each thread's channels paced
# there where two channels fit in the L2: row r of channel c reduced, then
# row r of channel c - 1 rewritten, bn_bf16_owned_paced; the sums, and so
# the expected bits, are the same in either walk).  Any data: rows of half a line more (inner
# 528, just under 8 MiB) and of a partial last line (inner 520 and 1000) at
# 8 MiB and more, and whole lines over a non-power-of-two count.
EXACT_CASES = [((64, 128, 16, 32), True), ((2048, 64, 32), True), ((64, 127, 16, 32), False),
               ((16, 4, 256, 256), True), ((64, 64, 32, 32), True), ((32, 16, 64, 128), True)]
ANY_CASES = [((62, 128, 16, 33), False), ((65, 126, 520), False), ((65, 128, 512), True),
             ((65, 64, 1000), False)]


def test_the_cases_cover_both_sides_of_the_rule():
    assert [streamed(s) for s, _ in EXACT_CASES] == [e for _, e in EXACT_CASES]
    assert [streamed(s) for s, _ in ANY_CASES] == [e for _, e in ANY_CASES]
    assert any(e for _, e in ANY_CASES) and not all(e for _, e in ANY_CASES)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape,_", EXACT_CASES)
def test_every_kernel_equals_the_twin_around_the_streaming_rule(simd_target, threads, shape, _,
                                                               relu, rng):
    inputs = make(rng, shape, False, dyadic=True)
    geo = geometry(shape, False)
    expected = run_all(R, *inputs, geo, relu)
    for count in (1, 2, 3):
        threads(count)
        assert_same_bits(run_all(_bn, *inputs, geo, relu), expected)


def eval_outputs(x, dy, weight, bias, running_mean, running_var, geo, relu, y=None, dx=None):
    y, _ = _bn.eval_forward(x, y, *geo, running_mean, running_var, weight, bias, EPS, relu)
    dx = _bn.backward_eval(dy, x, dx, *geo, running_mean, running_var, weight, EPS, None, None,
                           False, bias, relu)
    return dict(y=y, dx=dx)


def eval_twin(x, dy, weight, bias, running_mean, running_var, geo, relu):
    return dict(y=R.eval_forward(x, None, *geo, running_mean, running_var, weight, bias, EPS, relu),
                dx=R.backward_eval(dy, x, None, *geo, running_mean, running_var, weight, EPS, None,
                                   None, False, bias, relu))


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape,_", ANY_CASES)
def test_eval_kernels_equal_the_twin_on_any_data_around_the_streaming_rule(
        simd_target, threads, shape, _, relu, rng):
    x, dy, weight, bias, running_mean, running_var = make(rng, shape, False, dyadic=False)
    geo = geometry(shape, False)
    expected = eval_twin(x, dy, weight, bias, running_mean, running_var, geo, relu)
    for count in (1, 2, 3):
        threads(count)
        assert_same_bits(eval_outputs(x, dy, weight, bias, running_mean, running_var, geo, relu),
                         expected)


@pytest.mark.parametrize("shape", [(64, 128, 16, 32), (64, 64, 32, 32)])
@pytest.mark.parametrize("offset", [0, 2, 30, 48])
def test_streamed_outputs_at_every_even_offset_in_a_line_equal_the_twin(simd_target, threads,
                                                                        offset, shape, rng):
    """Inputs and outputs off the line boundary: the lines a run or a row of
    channels shares with its neighbours are written with normal stores, the
    whole lines between streamed (the AVX2 build: 32-byte pieces, also
    across row ends); 2 KiB rows are walked paced in the AVX-512 build."""
    inputs = make(rng, shape, False, dyadic=True)
    x, dy = at_offset(inputs[0], offset), at_offset(inputs[1], (offset + 16) % 64)
    geo = geometry(shape, False)
    expected = run_all(R, *inputs, geo, False)
    twin_eval = eval_twin(*inputs, geo, True)
    for count in (1, 2):
        threads(count)
        assert_same_bits(run_all(_bn, x, dy, *inputs[2:], geo, False), expected)
        y = at_offset(np.zeros(shape, BF16), offset)
        dx = at_offset(np.zeros(shape, BF16), (offset + 34) % 64)
        got = eval_outputs(x, dy, *inputs[2:], geo, True, y=y, dx=dx)
        assert got["y"] is y or np.shares_memory(got["y"], y)
        assert_same_bits(got, twin_eval)


def train_outputs(x, dy, weight, bias, running_mean, running_var, geo, y, dx):
    """run_all's training forward and backward (no ReLU), into `y` and `dx`."""
    C = geo[1]
    rm, rv = running_mean.copy(), running_var.copy()
    y, mean, invstd, _ = _bn.train_forward(x, y, *geo, weight, bias, EPS, rm, rv, MOMENTUM, False)
    dweight, dbias = np.full(C, 0.5, np.float32), np.full(C, -0.25, np.float32)
    dx = _bn.backward(dy, x, dx, *geo, mean, invstd, weight, dweight, dbias, True, bias, False)
    return dict(y=y, mean=mean, invstd=invstd, running_mean=rm, running_var=rv, dx=dx,
                dweight=dweight, dbias=dbias)


@pytest.mark.parametrize("shape", [(64, 64, 32, 32), (16, 4, 256, 256)])
@pytest.mark.parametrize("offset", [2, 30, 48])
def test_streamed_training_outputs_off_a_line_equal_the_twin(simd_target, threads, shape, offset,
                                                             rng):
    """The training kernels into `out=` buffers off the line boundary (their
    own outputs come from the output cache, always on a line): the owned
    walks (paced in the AVX-512 build where rows are 2 KiB) and, with 4
    channels, the run-by-run rewrites, whose runs start and end inside lines
    (a vector sharing a line with a run's head or tail is stored normally)."""
    inputs = make(rng, shape, False, dyadic=True)
    geo = geometry(shape, False)
    twin = run_all(R, *inputs, geo, False)
    for count in (1, 2):
        threads(count)
        y = at_offset(np.zeros(shape, BF16), offset)
        dx = at_offset(np.zeros(shape, BF16), (offset + 34) % 64)
        got = train_outputs(*inputs, geo, y, dx)
        assert np.shares_memory(got["y"], y) and np.shares_memory(got["dx"], dx)
        assert_same_bits(got, {name: twin[name] for name in got})


@pytest.mark.parametrize("offset", [2, 48])
def test_streamed_eval_stretches_ending_inside_rows_equal_the_twin(simd_target, threads, offset,
                                                                  rng):
    """Rows of 96 values (three lines, 8 MiB in all): the eval passes walk
    stretches of 16384 values, which end inside rows, so a vector across a
    row end falls next to a stretch's head or tail (stored normally)."""
    shape = (64, 683, 96)
    x, dy, weight, bias, running_mean, running_var = make(rng, shape, False, dyadic=False)
    geo = geometry(shape, False)
    expected = eval_twin(x, dy, weight, bias, running_mean, running_var, geo, False)
    for count in (1, 2):
        threads(count)
        y = at_offset(np.zeros(shape, BF16), offset)
        dx = at_offset(np.zeros(shape, BF16), (offset + 18) % 64)
        got = eval_outputs(x, dy, weight, bias, running_mean, running_var, geo, False, y=y, dx=dx)
        assert np.shares_memory(got["y"], y) and np.shares_memory(got["dx"], dx)
        assert_same_bits(got, expected)


# ---- channels-last (N, H, W, C) --------------------------------------------
# The rule for an interleaved output (fb_bn_stream_output): at least 8 MiB,
# any row length -- the array is one contiguous stream.  Both vector builds
# rewrite each work item as one flat walk whose channel index wraps at row
# ends (16 values per vector; the AVX2 build's pair tables, the AVX-512
# build's wrapped coefficient arrays), streamed over the whole 64-byte lines
# between the first and the last boundary, so rows of whole lines (C 128),
# of partial lines (C 65, 40), C under 16 (several row ends in one vector)
# and odd C are all covered, each with a power-of-two count per channel
# (exact sums), at, over and just under the threshold.

def streamed_channels_last(shape):
    return np.prod(shape) * 2 >= STREAM_BYTES


CL_CASES = [((32, 32, 32, 128), True), ((32, 32, 32, 127), False), ((64, 32, 32, 65), True),
            ((128, 32, 32, 40), True), ((1024, 32, 32, 5), True), ((16, 32, 32, 200), False)]


def test_the_channels_last_cases_cover_both_sides_of_the_rule():
    assert [streamed_channels_last(s) for s, _ in CL_CASES] == [e for _, e in CL_CASES]


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape,_", CL_CASES)
def test_channels_last_kernels_equal_the_twin_around_the_streaming_rule(simd_target, threads, shape,
                                                                       _, relu, rng):
    inputs = make(rng, shape, True, dyadic=True)
    geo = geometry(shape, True)
    expected = run_all(R, *inputs, geo, relu)
    for count in (1, 2, 3):
        threads(count)
        assert_same_bits(run_all(_bn, *inputs, geo, relu), expected)


@pytest.mark.parametrize("shape", [(64, 32, 32, 65), (32, 32, 32, 128)])
def test_channels_last_eval_kernels_equal_the_twin_on_any_data_when_streamed(simd_target, threads,
                                                                            shape, rng):
    x, dy, weight, bias, running_mean, running_var = make(rng, shape, True, dyadic=False)
    geo = geometry(shape, True)
    for relu in (False, True):
        expected = eval_twin(x, dy, weight, bias, running_mean, running_var, geo, relu)
        for count in (1, 2, 3):
            threads(count)
            assert_same_bits(eval_outputs(x, dy, weight, bias, running_mean, running_var, geo,
                                          relu), expected)


@pytest.mark.parametrize("offset", [0, 2, 30, 48])
@pytest.mark.parametrize("shape", [(128, 32, 32, 40), (64, 32, 32, 65)])
def test_channels_last_streamed_outputs_at_every_even_offset_in_a_line_equal_the_twin(
        simd_target, threads, shape, offset, rng):
    """Outputs off the line boundary: the piece before the first 32-byte
    boundary of each work item, its tail, and a vector sharing a line with
    either are written with normal stores, the whole lines between
    streamed."""
    inputs = make(rng, shape, True, dyadic=True)
    x, dy = at_offset(inputs[0], offset), at_offset(inputs[1], (offset + 16) % 64)
    geo = geometry(shape, True)
    expected = run_all(R, *inputs, geo, True)
    twin_eval = eval_twin(*inputs, geo, True)
    for count in (1, 2, 3):
        threads(count)
        assert_same_bits(run_all(_bn, x, dy, *inputs[2:], geo, True), expected)
        y = at_offset(np.zeros(shape, BF16), offset)
        dx = at_offset(np.zeros(shape, BF16), (offset + 34) % 64)
        got = eval_outputs(x, dy, *inputs[2:], geo, True, y=y, dx=dx)
        assert np.shares_memory(got["y"], y) and np.shares_memory(got["dx"], dx)
        assert_same_bits(got, twin_eval)


# ---- cached outputs of short runs ---------------------------------------------
# Outputs under the streaming size: every full vector is an unaligned store
# and a run's last values (fewer than a vector: runs of 1-40 values leave
# tails of most lengths, and runs shorter than one vector) take one vector
# step on staged copies in the AVX2 build (masked pieces in the AVX-512 one),
# planar and channels-last, with inputs and outputs at even offsets off the
# 32-byte vector boundary.

CACHED_CASES = [((3, 5, 1, 7), False), ((2, 3, 37), False), ((4, 6, 2, 9), False),
                ((5, 2, 40), False), ((3, 4, 5, 3), True), ((7, 21), True), ((2, 3, 3, 37), True)]


@pytest.mark.parametrize("offset", [2, 14, 30])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape,channels_last", CACHED_CASES)
def test_cached_outputs_of_short_runs_at_any_offset_equal_the_twin(simd_target, threads, shape,
                                                                   channels_last, relu, offset,
                                                                   rng):
    inputs = make(rng, shape, channels_last, dyadic=True)
    x, dy, weight, bias, running_mean, running_var = inputs
    geo = geometry(shape, channels_last)
    expected = run_all(R, *inputs, geo, relu)
    moved_x, moved_dy = at_offset(x, offset), at_offset(dy, (offset + 6) % 64)
    for count in (1, 2):
        threads(count)
        assert_same_bits(run_all(_bn, moved_x, moved_dy, *inputs[2:], geo, relu), expected)
        y = at_offset(np.zeros(shape, BF16), (offset + 10) % 64)
        dx = at_offset(np.zeros(shape, BF16), (offset + 22) % 64)
        rm, rv = running_mean.copy(), running_var.copy()
        _, mean, invstd, _ = _bn.train_forward(moved_x, y, *geo, weight, bias, EPS, rm, rv,
                                               MOMENTUM, relu)
        _bn.backward(moved_dy, moved_x, dx, *geo, mean, invstd, weight, None, None, False, bias,
                     relu)
        assert_same_bits(dict(y=y, dx=dx), dict(y=expected["y"], dx=expected["dx"]))
        y_eval = at_offset(np.zeros(shape, BF16), (offset + 42) % 64)
        dx_eval = at_offset(np.zeros(shape, BF16), (offset + 50) % 64)
        got = eval_outputs(moved_x, moved_dy, *inputs[2:], geo, relu, y=y_eval, dx=dx_eval)
        assert np.shares_memory(got["y"], y_eval) and np.shares_memory(got["dx"], dx_eval)
        assert_same_bits(got, eval_twin(*inputs, geo, relu))
