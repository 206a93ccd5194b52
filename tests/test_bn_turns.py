"""Planar statistics that read several runs in turns (bn_train_impl.h,
"several runs at once": four chunks of a channel, or four channels of an
owned block, once a row holds FB_BN_STREAM_ROW_BYTES = 8 KiB).  Only the
order of the memory reads changes, so every kernel must still match the
NumPy reference, and give the same bits for 1, 2 and 3 threads (which take
different walkers: owned blocks, owned channels chunk by chunk, shared
chunks).  Shapes: rows from 2048 float32 / 1024 float64 values (at and past
the threshold), odd row lengths (runs that end inside a short sum), chunks
of 4096 values cut inside rows and rows longer than a chunk, 1..9 chunks
per channel (every remainder of four), N = 1, 2, 3, 5, channel counts that
leave a last group of 1..3 channels in an owned block."""
import numpy as np
import pytest
from conftest import assert_close

from fastbn import functional as F
from fastbn import reference as R
from test_bn_plans import (DTYPES, assert_bits_do_not_depend_on_the_thread_count,  # noqa: F401
                           assert_planar_split_phases_compose,
                           assert_kernels_match_the_reference, make, threads)

SHAPES = [
    (1, 3, 48, 48),      # one chunk per channel, shared plan
    (2, 5, 45, 47),      # odd rows, the second chunk starts inside row 0
    (3, 9, 64, 64),      # chunks end with rows
    (5, 4, 61, 67),      # five chunks, odd rows
    (2, 12, 100, 101),   # rows longer than a chunk, owned blocks of two channels
    (8, 13, 56, 56),     # owned blocks of four channels, a last block of one
    (4, 7, 40, 52),
    (2, 17, 90, 90),
    (1, 2, 9000),
    (3, 1, 70, 70),      # one channel: one contiguous sequence
    (1, 6, 2100), (2, 6, 2100), (4, 6, 2100), (6, 6, 2100), (8, 6, 2100), (11, 6, 2100),
    (16, 6, 2100),       # 1, 2, 3, 4, 5, 6, 9 chunks per channel
    (2, 6, 1030),        # float64 rows just past 8 KiB, float32 below (one-run walk)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_planar_kernels_with_long_rows_match_the_reference(simd_target, threads, shape, dtype,
                                                           rng):
    assert_kernels_match_the_reference(threads, make(rng, shape, dtype, axis=1), dtype, axis=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_planar_kernels_with_long_rows_are_bit_identical_for_1_2_3_threads(simd_target, threads,
                                                                           shape, dtype, rng):
    assert_bits_do_not_depend_on_the_thread_count(threads, make(rng, shape, dtype, axis=1),
                                                  axis=1)


# ---- the paced walk (bn_owned_paced) -----------------------------------------
# A training forward whose output is streamed (at least 8 MiB, rows a whole
# number of 64-byte lines) reduces owned channel c while it rewrites channel c -
# 1 a few KiB at a time (plain and fused with ReLU): in the reduction's turns
# for rows of 8 KiB and more, after each chunk for shorter ones. The backwards
# do not pace; they are checked here too, on the same DRAM-sized, misaligned
# outputs. Shapes: rows longer than a chunk (76,800 values; 38 chunks of 4096
# per channel, the last one short, so the last group of turns has two chunks),
# chunks that end inside rows (6,144-value rows), float32 rows under 8 KiB
# (1,920 values; float64 takes turns there), 14, 9 and 11 channels (owned by 1,
# 2 and 3 threads; for 9 and 11 channels on 3 threads shared chunks: another
# walker, the same bits). Outputs 0 bytes, one element and 16 bytes past a
# 64-byte line move where the paced steps end (at the output's line boundaries).
SHAPES_PACED = [(2, 14, 300, 256), (40, 9, 96, 64), (110, 11, 40, 48)]


def paced_passes(module, x, dy, weight, bias, running_mean, running_var, out_offset=0):
    """Every kernel that reduces and rewrites (training forward with running
    statistics, training and eval backward, the fused ReLU forms), written
    into outputs `out_offset` bytes past a 64-byte line (the reference
    allocates its own); returns every output and mutated buffer."""
    def out():
        if module is R:
            return None
        raw = np.empty(x.nbytes + 128, np.uint8)
        start = (-raw.ctypes.data) % 64 + out_offset
        return raw[start:start + x.nbytes].view(x.dtype).reshape(x.shape)
    rm, rv = running_mean.copy(), running_var.copy()
    y, mean, invstd = module.batch_norm_forward_train(x, weight, bias, 1e-5, axis=1,
                                                      running_mean=rm, running_var=rv,
                                                      out=out())
    yr, mean_r, invstd_r = module.batch_norm_relu_forward_train(x, weight, bias, axis=1,
                                                                out=out())
    dx, dweight, dbias = module.batch_norm_backward(dy, x, mean, invstd, weight, axis=1,
                                                    out=out())
    dxr = module.batch_norm_relu_backward(dy, x, mean_r, invstd_r, weight, bias, axis=1,
                                          out=out())
    dx_eval = module.batch_norm_backward_eval(dy, x, running_mean, running_var, weight, axis=1,
                                              out=out())
    dxr_eval = module.batch_norm_relu_backward_eval(dy, x, running_mean, running_var, weight,
                                                    bias, axis=1, out=out())
    flat = [y, mean, invstd, rm, rv, yr, mean_r, invstd_r, dx, dweight, dbias]
    for result in (dxr, dx_eval, dxr_eval):
        flat.extend(result if isinstance(result, tuple) else (result,))
    return [np.asarray(a) for a in flat if a is not None]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_PACED)
def test_paced_passes_match_the_reference_with_the_same_bits_at_any_thread_count(
        simd_target, threads, shape, dtype, rng):
    inputs = make(rng, shape, dtype, axis=1)
    expected = paced_passes(R, *inputs)
    first = None
    for count in (1, 2, 3):
        threads(count)
        for offset in (0, inputs[0].itemsize, 16):
            got = paced_passes(F, *inputs, out_offset=offset)
            assert len(got) == len(expected)
            if first is None:
                for actual, want in zip(got, expected):
                    assert_close(actual, want, dtype, scale=10)
                first = got
                continue
            for actual, want in zip(got, first):
                np.testing.assert_array_equal(actual, want,
                                              err_msg=f"{count} threads, offset {offset}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_PACED)
def test_paced_passes_equal_the_split_phases_bit_for_bit(simd_target, threads, shape, dtype,
                                                         rng):
    """The split phases do not pace (stats and backward_reduce rewrite
    nothing; apply and backward_apply reduce nothing): the same sums and
    rewrites.  In place (out=x: channel c - 1 is rewritten while c is read),
    the paced forwards give the same bits as out of place."""
    x, dy, weight, bias, _, _ = make(rng, shape, dtype, axis=1)
    for count in (1, 2):
        threads(count)
        for forward in (F.batch_norm_forward_train, F.batch_norm_relu_forward_train):
            inplace = x.copy()
            want = forward(x, weight, bias, 1e-5, axis=1)
            got = forward(inplace, weight, bias, 1e-5, axis=1, out=inplace)
            assert got[0] is inplace or np.shares_memory(got[0], inplace)
            for actual, expected in zip(got, want):
                np.testing.assert_array_equal(actual, expected)
        assert_planar_split_phases_compose(x, dy, weight, bias)
