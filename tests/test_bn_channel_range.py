"""The split phases over a channel sub-range (`channel_range`) and the
synchronized batch norms' channel-block pipeline (fastbn/distributed/_pipeline.py).

The ranged phases must give, channel for channel, the bits of the whole-array
call; the pipeline the bits of the unblocked composition whatever the blocks,
and the full-batch batch norm to rounding.  Several ranks are simulated here
by threads sharing an in-process all-gather; tests/mpi/check_syncbn_blocks.py
(under mpiexec) and tests/test_torch_syncbatchnorm.py (gloo) run the layers.
"""
import threading

import numpy as np
import pytest

from fastbn import functional as F
from fastbn._backend import kernels_for
from fastbn._bn_validation import batch_norm_layout
from fastbn.distributed import _pipeline
from _one_rank_comm import OneRankComm

FAST = kernels_for("fast")
REFERENCE = kernels_for("reference")
RANGES = [(0, 7), (0, 1), (6, 7), (2, 5), (3, 4)]


def planar(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 3 + 2).astype(dtype)


def phase_inputs(dtype, seed=0):
    x = planar((5, 7, 3, 6), dtype, seed)
    dy = planar((5, 7, 3, 6), dtype, seed + 1)
    rng = np.random.default_rng(seed + 2)
    mean = rng.standard_normal(7)
    invstd = rng.uniform(0.5, 2.0, 7)
    weight = rng.uniform(0.5, 1.5, 7).astype(dtype)
    bias = rng.standard_normal(7).astype(dtype)
    sums = rng.standard_normal(7), rng.standard_normal(7)
    return x, dy, mean, invstd, weight, bias, sums


# section: the phases over a channel range -------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ranged_stats_and_backward_reduce_equal_the_whole_call_bit_for_bit(dtype, simd_target,
                                                                          num_threads):
    x, dy, mean, invstd, weight, bias, _ = phase_inputs(dtype)
    for channel_range in RANGES:
        first, stop = channel_range
        whole = FAST.stats(x, 5, 7, 18)
        part = FAST.stats(x, 5, 7, 18, channel_range=channel_range)
        expected = REFERENCE.stats(x, 5, 7, 18, channel_range=channel_range)
        for a, b, c in zip(whole, part, expected):
            assert np.array_equal(a[first:stop], b)
            np.testing.assert_allclose(b, c, rtol=1e-6, atol=1e-6)
        for relu in (False, True):
            whole = FAST.backward_reduce(dy, x, 5, 7, 18, mean, invstd, weight, bias, relu)
            part = FAST.backward_reduce(dy, x, 5, 7, 18, mean, invstd, weight, bias, relu,
                                        channel_range=channel_range)
            expected = REFERENCE.backward_reduce(dy, x, 5, 7, 18, mean, invstd, weight, bias,
                                                 relu, channel_range=channel_range)
            for a, b, c in zip(whole, part, expected):
                assert np.array_equal(a[first:stop], b)
                np.testing.assert_allclose(b, c, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [False, True])
def test_ranged_apply_and_backward_apply_write_exactly_their_channels(dtype, relu,
                                                                       simd_target):
    x, dy, mean, invstd, weight, bias, (sum_dy, sum_dy_xhat) = phase_inputs(dtype, 3)
    y_whole = FAST.apply(x, None, 5, 7, 18, mean, invstd, weight, bias, relu)
    dx_whole = FAST.backward_apply(dy, x, None, 5, 7, 18, mean, invstd, weight, sum_dy,
                                   sum_dy_xhat, 90.0, weight, bias, relu)
    y_ref = REFERENCE.apply(x, None, 5, 7, 18, mean, invstd, weight, bias, relu)
    dx_ref = REFERENCE.backward_apply(dy, x, None, 5, 7, 18, mean, invstd, weight, sum_dy,
                                      sum_dy_xhat, 90.0, weight, bias, relu)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    for channel_range in RANGES:
        first, stop = channel_range
        y = np.full_like(x, np.nan)
        dx = np.full_like(x, np.nan)
        FAST.apply(x, y, 5, 7, 18, mean, invstd, weight, bias, relu,
                   channel_range=channel_range)
        FAST.backward_apply(dy, x, dx, 5, 7, 18, mean, invstd, weight, sum_dy, sum_dy_xhat,
                            90.0, weight, bias, relu, channel_range=channel_range)
        assert np.array_equal(y[:, first:stop], y_whole[:, first:stop])
        assert np.array_equal(dx[:, first:stop], dx_whole[:, first:stop])
        np.testing.assert_allclose(y[:, first:stop], y_ref[:, first:stop], **tol)
        np.testing.assert_allclose(dx[:, first:stop], dx_ref[:, first:stop], **tol)
        outside = np.ones(7, bool)
        outside[first:stop] = False
        assert np.isnan(y[:, outside]).all() and np.isnan(dx[:, outside]).all()


def test_ranged_phases_on_a_large_array_match_the_whole_call():
    # > 8 MB: the whole-array call streams its output; the ranges must too,
    # and still give the same bits
    x = planar((8, 40, 96, 96), np.float32, 5)
    mean, m2 = FAST.stats(x, 8, 40, 96 * 96)
    invstd = 1.0 / np.sqrt(m2 / (8 * 96 * 96) + 1e-5)
    y_whole = FAST.apply(x, None, 8, 40, 96 * 96, mean, invstd, None, None)
    y = np.empty_like(x)
    for first in range(0, 40, 3):
        channel_range = (first, min(40, first + 3))
        part = FAST.stats(x, 8, 40, 96 * 96, channel_range=channel_range)
        assert np.array_equal(part[0], mean[first:first + 3])
        assert np.array_equal(part[1], m2[first:first + 3])
        FAST.apply(x, y, 8, 40, 96 * 96, mean, invstd, None, None, channel_range=channel_range)
    assert np.array_equal(y, y_whole)


@pytest.mark.parametrize("channel_range", [(0, 16), (3, 19), (8, 24)])
def test_ranged_phases_in_owned_channel_blocks_match_the_whole_call(channel_range, simd_target,
                                                                    num_threads):
    # 16 channels of a 24-channel (8, 24, 40, 40) float32 array: threads own
    # channels (>= 4 each) and walk them in blocks of 8 neighbours row by row
    # (rows of 6.4 KB, 51 KB of input per channel), so the block walk must
    # step rows by all 24 channels, not by the 16 of the range
    first, stop = channel_range
    shape, n = (8, 24, 40, 40), 8 * 40 * 40
    x, dy = planar(shape, np.float32, 11), planar(shape, np.float32, 12)
    weight = np.linspace(0.5, 1.5, 24).astype(np.float32)
    bias = np.linspace(-1, 1, 24).astype(np.float32)
    mean, m2 = FAST.stats(x, 8, 24, 1600)
    invstd = 1.0 / np.sqrt(m2 / n + 1e-5)
    part_mean, part_m2 = FAST.stats(x, 8, 24, 1600, channel_range=channel_range)
    assert np.array_equal(part_mean, mean[first:stop]) and np.array_equal(part_m2, m2[first:stop])
    for relu in (False, True):
        sums = FAST.backward_reduce(dy, x, 8, 24, 1600, mean, invstd, weight, bias, relu)
        part = FAST.backward_reduce(dy, x, 8, 24, 1600, mean, invstd, weight, bias, relu,
                                    channel_range=channel_range)
        for whole, ranged in zip(sums, part):
            assert np.array_equal(ranged, whole[first:stop])
        y_whole = FAST.apply(x, None, 8, 24, 1600, mean, invstd, weight, bias, relu)
        dx_whole = FAST.backward_apply(dy, x, None, 8, 24, 1600, mean, invstd, weight, *sums,
                                       float(n), weight, bias, relu)
        y, dx = np.full_like(x, np.nan), np.full_like(x, np.nan)
        FAST.apply(x, y, 8, 24, 1600, mean, invstd, weight, bias, relu,
                   channel_range=channel_range)
        FAST.backward_apply(dy, x, dx, 8, 24, 1600, mean, invstd, weight, *sums, float(n),
                            weight, bias, relu, channel_range=channel_range)
        assert np.array_equal(y[:, first:stop], y_whole[:, first:stop])
        assert np.array_equal(dx[:, first:stop], dx_whole[:, first:stop])
        assert np.isnan(np.delete(y, np.s_[first:stop], axis=1)).all()
        assert np.isnan(np.delete(dx, np.s_[first:stop], axis=1)).all()


@pytest.mark.parametrize("kernels", [FAST, REFERENCE], ids=["fast", "reference"])
def test_a_bad_channel_range_raises_and_writes_nothing(kernels):
    x, dy, mean, invstd, weight, bias, (sum_dy, sum_dy_xhat) = phase_inputs(np.float32)
    y = np.full_like(x, 7.0)
    for bad in [(0, 8), (-1, 3), (3, 3), (5, 2)]:
        with pytest.raises(ValueError, match="channel_range"):
            kernels.apply(x, y, 5, 7, 18, mean, invstd, weight, bias, channel_range=bad)
        with pytest.raises(ValueError, match="channel_range"):
            kernels.stats(x, 5, 7, 18, channel_range=bad)
        with pytest.raises(ValueError, match="channel_range"):
            kernels.backward_apply(dy, x, y, 5, 7, 18, mean, invstd, weight, sum_dy,
                                   sum_dy_xhat, 90.0, channel_range=bad)
    # channels-last / 2-D (inner == 1): no sub-range (row pieces too short)
    flat = np.ascontiguousarray(x.reshape(90, 7))
    flat_out = np.full_like(flat, 7.0)
    with pytest.raises(ValueError, match="inner"):
        kernels.apply(flat, flat_out, 90, 7, 1, mean, invstd, weight, bias, channel_range=(1, 3))
    assert (flat_out == 7.0).all()
    assert (y == 7.0).all()


def test_bridge_refuses_arrays_a_channel_range_cannot_use_and_writes_nothing():
    x, dy, mean, invstd, weight, bias, (sum_dy, sum_dy_xhat) = phase_inputs(np.float32)
    y = np.full_like(x, 7.0)
    strided = np.asfortranarray(x)
    with pytest.raises(ValueError, match="x: with channel_range"):
        FAST.apply(strided, y, 5, 7, 18, mean, invstd, weight, bias, channel_range=(1, 3))
    with pytest.raises(ValueError, match="y: with channel_range"):
        FAST.apply(x, None, 5, 7, 18, mean, invstd, weight, bias, channel_range=(1, 3))
    readonly = y.copy()
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="y: with channel_range"):
        FAST.apply(x, readonly, 5, 7, 18, mean, invstd, weight, bias, channel_range=(1, 3))
    with pytest.raises(ValueError, match="mean: with channel_range"):
        FAST.apply(x, y, 5, 7, 18, mean[:3], invstd, weight, bias, channel_range=(1, 3))
    with pytest.raises(ValueError, match="weight: with channel_range"):
        FAST.apply(x, y, 5, 7, 18, mean, invstd, weight[:3], bias, channel_range=(1, 3))
    with pytest.raises(ValueError, match="dy: with channel_range"):
        FAST.backward_apply(dy.astype(np.float64), x, y, 5, 7, 18, mean, invstd, weight,
                            sum_dy, sum_dy_xhat, 90.0, channel_range=(1, 3))
    with pytest.raises(ValueError, match="sum_dy: with channel_range"):
        FAST.backward_apply(dy, x, y, 5, 7, 18, mean, invstd, weight, sum_dy[:2], sum_dy_xhat,
                            90.0, channel_range=(1, 3))
    with pytest.raises(TypeError, match="channel_range"):
        FAST.stats(x, 5, 7, 18, channel_range=[1, 3])
    assert (y == 7.0).all()


# section: the pipeline on simulated ranks ------------------------------------------


class _Hub:
    """An all-gather shared by `size` threads (one per simulated rank)."""

    def __init__(self, size):
        self.size = size
        self.rows = {}
        self.lock = threading.Condition()
        self.sequence = [0] * size

    def exchange(self, rank):
        hub = self

        class ThreadExchange(_pipeline.Exchange):
            def allgather(self, row):
                with hub.lock:
                    key = hub.sequence[rank]
                    hub.sequence[rank] += 1
                    hub.rows.setdefault(key, {})[rank] = row.copy()
                    hub.lock.notify_all()
                    hub.lock.wait_for(lambda: len(hub.rows[key]) == hub.size, timeout=60)
                    return np.stack([hub.rows[key][r] for r in range(hub.size)])

        return ThreadExchange()


def _fail(statuses, error):
    raise ValueError(f"failed: {list(statuses)}") from error


def simulate(parts, block_bytes, relu=False, dy_parts=None, weight=None, bias=None):
    """The pipeline's forward and backward on every part, one thread per rank."""
    hub = _Hub(len(parts))
    results = [None] * len(parts)
    counts = [p.shape[0] * p.shape[2] * p.shape[3] for p in parts]
    errors = []

    def rank_main(rank):
        try:
            x = parts[rank]
            layout = batch_norm_layout(x, 1)
            blocks = _pipeline.plan_blocks(x.shape[1], max(counts), x.dtype.itemsize, 1,
                                           True, block_bytes)
            y, total, mean, m2, invstd = _pipeline.forward_blocks(
                FAST, x, layout, counts, weight, bias, 1e-5, relu, blocks, hub.exchange(rank),
                _fail)
            blocks = _pipeline.plan_blocks(x.shape[1], max(counts), x.dtype.itemsize, 2,
                                           True, block_bytes)
            relu_from = (weight, bias) if relu else None
            dx, sum_dy, sum_dy_xhat, _, _ = _pipeline.backward_blocks(
                FAST, dy_parts[rank], x, layout, mean, invstd, weight, relu_from, total, blocks,
                hub.exchange(rank), _fail)
            results[rank] = (y, mean, m2, dx, sum_dy, sum_dy_xhat)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(len(parts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    return results


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [False, True])
def test_pipeline_blocks_give_the_unblocked_bits_and_the_full_batch_norm(dtype, relu):
    channels, spatial = 11, (5, 6)
    batches = [3, 1, 4]            # uneven, a rank with a batch of 1
    x_full = planar((sum(batches), channels) + spatial, dtype, 11)
    dy_full = planar((sum(batches), channels) + spatial, dtype, 12)
    rng = np.random.default_rng(13)
    weight = rng.uniform(0.5, 1.5, channels).astype(dtype)
    bias = (rng.standard_normal(channels) * 0.3).astype(dtype)
    starts = np.cumsum([0] + batches)
    parts = [x_full[a:b] for a, b in zip(starts[:-1], starts[1:])]
    dy_parts = [dy_full[a:b] for a, b in zip(starts[:-1], starts[1:])]
    channel_bytes = 4 * 30 * np.dtype(dtype).itemsize     # largest rank: 4 images
    # one block; a block smaller than one channel (1 channel per block); 3 and
    # 4 channels per block (11 is a multiple of neither)
    sizes = [1 << 30, 8, 3 * channel_bytes, 4 * channel_bytes + 5]
    runs = [simulate(parts, size, relu, dy_parts, weight, bias) for size in sizes]
    assert len(_pipeline.plan_blocks(channels, 120, np.dtype(dtype).itemsize, 1, True,
                                     sizes[2])) == 4
    for run in runs[1:]:
        for rank_got, rank_want in zip(run, runs[0]):
            for got, want in zip(rank_got, rank_want):
                assert np.array_equal(got, want)
    # the full batch in one process
    y_full, mean, invstd = F.batch_norm_forward_train(x_full, weight, bias, 1e-5) \
        if not relu else (None, None, None)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-11)
    y_got = np.concatenate([r[0] for r in runs[0]])
    mean_ref = x_full.astype(np.float64).mean(axis=(0, 2, 3))
    var_ref = x_full.astype(np.float64).var(axis=(0, 2, 3))
    pre = ((x_full - mean_ref[None, :, None, None]) / np.sqrt(var_ref + 1e-5)[None, :, None, None]
           * weight[None, :, None, None] + bias[None, :, None, None])
    expected_y = np.maximum(pre, 0) if relu else pre
    np.testing.assert_allclose(y_got, expected_y, **tol)
    if y_full is not None:
        np.testing.assert_allclose(y_got, y_full, **tol)
        dx_full, dweight, dbias = F.batch_norm_backward(dy_full, x_full, mean, invstd, weight)
        np.testing.assert_allclose(np.concatenate([r[3] for r in runs[0]]), dx_full, **tol)
        np.testing.assert_allclose(runs[0][0][5], dweight, **tol)
        np.testing.assert_allclose(runs[0][0][4], dbias, **tol)
    for rank_result in runs[0][1:]:   # every rank holds the same statistics and sums
        for got, want in zip(rank_result[1:3] + rank_result[4:], runs[0][0][1:3] + runs[0][0][4:]):
            assert np.array_equal(got, want)


def test_plan_blocks_covers_every_channel_once():
    for channels in (1, 7, 128):
        for block_bytes in (1, 100, 4 << 20, 1 << 40):
            blocks = _pipeline.plan_blocks(channels, 3136 * 32, 4, 2, True, block_bytes)
            assert blocks[0][0] == 0 and blocks[-1][1] == channels
            assert all(a < b for a, b in blocks)
            assert all(blocks[i][1] == blocks[i + 1][0] for i in range(len(blocks) - 1))
    assert _pipeline.plan_blocks(128, 3136 * 32, 4, 1, False, 1) == [(0, 128)]


@pytest.mark.parametrize("phase", ["reduce", "rewrite"])
@pytest.mark.parametrize("failing_block", [0, 3, 4, 5])
def test_an_error_in_any_block_raises_on_every_rank(failing_block, phase):
    # rank 0's reduction or rewrite of one block raises (e.g. out of memory);
    # the last rewrite runs after its exchange, so the loop ends with one
    # more status word: every rank must raise, none may return normally or hang
    blocks = [(c, c + 1) for c in range(6)]
    hub = _Hub(2)
    outcomes = [None, None]
    calls = [[], []]

    def rank_main(rank):
        def reduce(first, stop):
            calls[rank].append(("reduce", first))
            if phase == "reduce" and rank == 0 and first == failing_block:
                raise MemoryError("simulated")
            return np.zeros(2 * (stop - first))

        def rewrite(first, stop):
            calls[rank].append(("rewrite", first))
            if phase == "rewrite" and rank == 0 and first == failing_block:
                raise MemoryError("simulated")

        try:
            _pipeline._run(blocks, hub.exchange(rank), reduce,
                           lambda a, b, table: None, rewrite, _fail)
            outcomes[rank] = "returned"
        except ValueError as error:
            outcomes[rank] = f"ValueError: {error}"

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(outcome is not None and outcome.startswith("ValueError") for outcome in outcomes), \
        outcomes
    # the failing rank stops reducing and rewriting after its error
    failed_at = calls[0].index((phase, failing_block))
    assert not any(name == "rewrite" for name, _ in calls[0][failed_at + 1:])
    # the other rank raises at the first exchange that carries the error:
    # block k's for a reduction of block k, block k + 1's for a rewrite of
    # block k, or the last status word; until then it reduces and rewrites
    # each block before reading the next
    want = [(name, c) for c in range(6) for name in ("reduce", "rewrite")]
    seen = failing_block if phase == "reduce" else failing_block + 1
    called = 2 * seen + 1
    assert calls[1] == want[:called if seen <= 5 else len(want)], calls[1]


@pytest.mark.parametrize("block_bytes", [None, 1])
def test_sync_batchnorm_takes_an_input_at_an_odd_byte_offset(block_bytes, monkeypatch):
    # the channel-range phases need aligned arrays: an unaligned (but valid)
    # input is copied once, never refused
    from fastbn import nn
    monkeypatch.setattr(_pipeline, "BLOCK_BYTES", block_bytes)
    x_aligned = planar((4, 6, 5, 5), np.float32, 21)
    raw = np.empty(x_aligned.nbytes + 64, np.uint8)
    start = (-raw.ctypes.data) % 32 + 1
    x = raw[start:start + x_aligned.nbytes].view(np.float32).reshape(x_aligned.shape)
    x[...] = x_aligned
    assert not x.flags.aligned
    local, sync = nn.BatchNorm2d(6), nn.SyncBatchNorm(6, comm=OneRankComm())
    np.testing.assert_allclose(sync(x), local(x_aligned), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sync.backward(x), local.backward(x_aligned), rtol=1e-5, atol=1e-5)


def _mixed_parts(dtype, channels, seed):
    # a rank with no values, an uneven planar batch, one value per channel
    # (1, C, 1, 1: not planar, one "whole" pass), one image
    shapes = [(0, channels, 5, 6), (3, channels, 5, 6), (1, channels, 1, 1), (1, channels, 5, 6)]
    parts = [planar(shape, dtype, seed + i) for i, shape in enumerate(shapes)]
    dy_parts = [planar(shape, dtype, seed + 10 + i) for i, shape in enumerate(shapes)]
    return parts, dy_parts


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [False, True])
def test_pipeline_with_empty_and_single_value_ranks_gives_the_unblocked_bits(dtype, relu):
    channels = 11
    parts, dy_parts = _mixed_parts(dtype, channels, 31)
    rng = np.random.default_rng(33)
    weight = rng.uniform(0.5, 1.5, channels).astype(dtype)
    bias = (rng.standard_normal(channels) * 0.3).astype(dtype)
    channel_bytes = 3 * 30 * np.dtype(dtype).itemsize     # largest rank: 3 images
    runs = []
    for size in [1 << 30, 8, 3 * channel_bytes, 4 * channel_bytes + 5]:
        runs.append(simulate(parts, size, relu, dy_parts, weight, bias))
    for run in runs[1:]:
        for rank_got, rank_want in zip(run, runs[0]):
            for got, want in zip(rank_got, rank_want):
                assert np.array_equal(got, want)
    # the merged statistics against float64 over every rank's values
    values = np.concatenate([p.transpose(1, 0, 2, 3).reshape(channels, -1) for p in parts],
                            axis=1).astype(np.float64)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-11)
    for rank_result in runs[0]:
        np.testing.assert_allclose(rank_result[1], values.mean(axis=1), **tol)
        np.testing.assert_allclose(rank_result[2] / values.shape[1], values.var(axis=1), **tol)
        for got, want in zip(rank_result[1:3] + rank_result[4:], runs[0][0][1:3] + runs[0][0][4:]):
            assert np.array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [False, True])
def test_one_rank_sync_batchnorm_blocks_give_the_unblocked_bits(dtype, relu, monkeypatch):
    # the layer (running statistics, gradients) on the stand-in communicator:
    # every output and mutated buffer equal to the one-block run's, bit for bit
    from fastbn import nn
    x = planar((3, 9, 7, 5), dtype, 41)
    dy = planar((3, 9, 7, 5), dtype, 42)
    channel_bytes = 3 * 35 * np.dtype(dtype).itemsize
    runs = []
    for block_bytes in [None, 1, 2 * channel_bytes, 4 * channel_bytes + 1]:
        monkeypatch.setattr(_pipeline, "BLOCK_BYTES", block_bytes)
        layer_type = nn.BatchNormReLU2d if relu else nn.BatchNorm2d
        layer = nn.SyncBatchNorm.convert_sync_batchnorm(layer_type(9, dtype=dtype),
                                                        OneRankComm())
        layer.weight.data[...] = np.linspace(0.5, 1.5, 9).astype(dtype)
        layer.bias.data[...] = np.linspace(-0.4, 0.4, 9).astype(dtype)
        got = []
        for step in range(2):
            got.append(layer(x * (step + 1)))
            got.append(layer.backward(dy))
        got += [layer.weight.grad, layer.bias.grad, layer.running_mean, layer.running_var]
        runs.append(got)
    for run in runs[1:]:
        for got, want in zip(run, runs[0]):
            assert got.dtype == want.dtype and np.array_equal(got, want)


class _FailingKernels:
    """The fast kernels, except that the `at`-th call (0-based) of `phase`
    raises ValueError, as a kernel's status would."""

    def __init__(self, phase, at):
        self.phase, self.at, self.calls = phase, at, 0

    def __getattr__(self, name):
        method = getattr(FAST, name)
        if name != self.phase:
            return method

        def counted(*args, **kwargs):
            self.calls += 1
            if self.calls - 1 == self.at:
                raise ValueError(f"injected failure in {name} call {self.at}")
            return method(*args, **kwargs)
        return counted


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("phase", ["stats", "apply", "backward_reduce", "backward_apply"])
@pytest.mark.parametrize("failing_call", [0, 2, 4])
def test_a_failed_blocked_pass_leaves_the_sync_layer_unchanged_and_the_next_step_works(
        phase, failing_call, relu, monkeypatch):
    # nine channels of 420 bytes: forward blocks of two channels (five
    # blocks), backward blocks of one (x and dy: nine blocks); the failure in
    # the first, a middle or the last forward block.  After the error the
    # running statistics, num_batches_tracked and weight/bias grads are those
    # of before the failed call, and the next forward+backward gives the bits
    # of a layer that never failed
    from fastbn import nn
    from fastbn.nn import syncbatchnorm
    from _state_snapshot import assert_same_state, snapshot
    x, dy = planar((3, 9, 7, 5), np.float32, 51), planar((3, 9, 7, 5), np.float32, 52)
    monkeypatch.setattr(_pipeline, "BLOCK_BYTES", 2 * 3 * 35 * 4)

    def make_layer():
        layer_type = nn.BatchNormReLU2d if relu else nn.BatchNorm2d
        layer = nn.SyncBatchNorm.convert_sync_batchnorm(layer_type(9), OneRankComm())
        layer.weight.data[...] = np.linspace(0.5, 1.5, 9, dtype=np.float32)
        layer.bias.data[...] = np.linspace(-0.4, 0.4, 9, dtype=np.float32)
        layer(x * 0.5)                  # a step first: stats and grads not at their initial values
        layer.backward(dy)
        return layer

    layer, clean = make_layer(), make_layer()
    failing = _FailingKernels(phase, failing_call)
    monkeypatch.setattr(syncbatchnorm, "current_kernels", lambda: failing)
    backward = phase.startswith("backward")
    if backward:
        layer(x)                        # the forward succeeds and updates its state
        clean(x)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="injected failure"):
        layer.backward(dy) if backward else layer(x)
    assert failing.calls == failing_call + 1     # the failure was reached
    assert_same_state(before, snapshot(layer), f"after a failure in {phase}")
    monkeypatch.setattr(syncbatchnorm, "current_kernels", lambda: FAST)
    got = [layer(x), layer.backward(dy)]
    want = [clean(x), clean.backward(dy)]
    for a, b in zip(got + [layer.weight.grad, layer.bias.grad, layer.running_mean,
                           layer.running_var, layer.num_batches_tracked],
                    want + [clean.weight.grad, clean.bias.grad, clean.running_mean,
                            clean.running_var, clean.num_batches_tracked]):
        assert a.dtype == b.dtype and np.array_equal(a, b)
