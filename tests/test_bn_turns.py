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

from test_bn_plans import (DTYPES, assert_bits_do_not_depend_on_the_thread_count,  # noqa: F401
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
