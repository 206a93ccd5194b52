"""SyncBatchNorm's channel-block pipeline on P ranks: for several block sizes
(one block, a block smaller than one channel, blocks that do not divide the
channels) the outputs, dx, parameter gradients and running statistics are
bit-identical to the one-block (unblocked) run and equal to BatchNorm2d on
the concatenated batch; uneven per-rank batches with a rank holding one
image, and with a rank holding none (its pass is "whole": no ranged calls,
but it takes part in every block's exchange); float32 and float64, with and
without the fused ReLU."""
import numpy as np

from fastbn import nn
from fastbn.distributed import _pipeline

from _harness import run, tolerance

CHANNELS = 10
SPATIAL = (6, 5)


PATTERNS = ([3, 1, 4, 2], [0, 2, 1, 3])


def per_rank_batches(size, pattern=PATTERNS[0]):
    return [pattern[r % len(pattern)] for r in range(size)]


def one_run(comm, dtype, relu, block_bytes, seed, pattern):
    rank, size = comm.Get_rank(), comm.Get_size()
    batches = per_rank_batches(size, pattern)
    rng = np.random.default_rng(seed)
    shape = (sum(batches), CHANNELS) + SPATIAL
    x_full = (rng.standard_normal(shape) * 2.0 + 3.0).astype(dtype)
    dy_full = rng.standard_normal(shape).astype(dtype)
    weight = rng.uniform(0.5, 1.5, CHANNELS).astype(dtype)
    bias = (rng.standard_normal(CHANNELS) * 0.3).astype(dtype)
    start = sum(batches[:rank])
    stop = start + batches[rank]
    full = (nn.BatchNormReLU2d if relu else nn.BatchNorm2d)(CHANNELS, dtype=dtype)
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(
        (nn.BatchNormReLU2d if relu else nn.BatchNorm2d)(CHANNELS, dtype=dtype), comm)
    for layer in (full, sync):
        layer.weight.data[...] = weight
        layer.bias.data[...] = bias
    saved = _pipeline.BLOCK_BYTES
    _pipeline.BLOCK_BYTES = block_bytes
    try:
        results = []
        for step in range(2):
            y_expected = full(x_full)
            dx_expected = full.backward(dy_full)
            y = sync(x_full[start:stop])
            dx = sync.backward(dy_full[start:stop])
            where = (f"dtype={np.dtype(dtype)}, relu={relu}, block_bytes={block_bytes}, "
                     f"batches={batches}, step={step}")
            for name, got, want in (("y", y, y_expected[start:stop]),
                                    ("dx", dx, dx_expected[start:stop]),
                                    ("weight.grad", sync.weight.grad, full.weight.grad),
                                    ("bias.grad", sync.bias.grad, full.bias.grad),
                                    ("running_mean", sync.running_mean, full.running_mean),
                                    ("running_var", sync.running_var, full.running_var)):
                np.testing.assert_allclose(got, want, err_msg=f"{name}: {where}",
                                           **tolerance(dtype))
            results.extend([y, dx, sync.weight.grad.copy(), sync.bias.grad.copy(),
                            sync.running_mean.copy(), sync.running_var.copy()])
        return results
    finally:
        _pipeline.BLOCK_BYTES = saved


def main(comm):
    for pattern in PATTERNS:
        check_pattern(comm, pattern)


def check_pattern(comm, pattern):
    largest = max(per_rank_batches(comm.Get_size(), pattern)) * SPATIAL[0] * SPATIAL[1]
    for dtype in (np.float32, np.float64):
        channel_bytes = largest * np.dtype(dtype).itemsize
        sizes = [1 << 40,                  # one block: the unblocked composition
                 16,                       # smaller than one channel: 1 channel per block
                 3 * channel_bytes,        # forward 3, backward 1 channel(s) per block
                 8 * channel_bytes + 1]    # forward 8 (10 = 8 + 2), backward 4 (4 + 4 + 2)
        assert len(_pipeline.plan_blocks(CHANNELS, largest, np.dtype(dtype).itemsize, 1, True,
                                         sizes[1])) == CHANNELS
        for relu in (False, True):
            seed = 7 + relu + 10 * (dtype == np.float64)
            reference = one_run(comm, dtype, relu, sizes[0], seed, pattern)
            for block_bytes in sizes[1:]:
                got = one_run(comm, dtype, relu, block_bytes, seed, pattern)
                for a, b in zip(got, reference):
                    assert np.array_equal(a, b), (
                        f"blocks of {block_bytes} bytes differ from one block "
                        f"(dtype={np.dtype(dtype)}, relu={relu}, pattern={pattern})")


if __name__ == "__main__":
    run(main)
