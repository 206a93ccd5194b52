"""The channel-block pipeline of the synchronized batch norms
(`fastbn.nn.SyncBatchNorm` over MPI, `fastbn.torch.SyncBatchNorm` over
torch.distributed): one implementation, given the communicator's
blocking all-gather as an `Exchange`.

Why blocks: the split phases (stats, exchange, apply) read x twice, and for
an activation larger than the caches both reads come from DRAM, while the
fused local kernel rewrites each channel right after reducing it.  So for
planar inputs (channels-first with spatial values, inner > 1), when
`BLOCK_BYTES` is set (it is not by default: see the measurements there),
the channels are cut into blocks of about that many bytes of input per
rank, and::

    for k: stats(k); allgather(k); merge(k); apply(k)

block k's apply reads x right after its stats did, so only one block has to
stay cached (as in the fused local kernels, which rewrite each channel right
after reducing it).  The backward does the same with
backward_reduce/backward_apply.  This is the only loop order: an
overlapped one (``stats(0); start(0); for k: stats(k + 1); wait(k);
merge(k); start(k + 1); apply(k)``, a non-blocking all-gather of block k
behind block k + 1's reduction) was measured and removed, see BLOCK_BYTES.

Determinism: every per-channel statistic is the one of the whole-array
phase call (the kernels' chunks depend on the values per channel only), the
merge is per channel in rank order, so the results are bit-identical to the
unblocked composition whatever the block size.

The block partition must be the same on every rank (the all-gathers must
match), so it is computed from gathered values only: the largest count of
values per channel of any rank and the dtype (`plan_blocks`).  A rank whose
own input is not planar (channels-last, 2-D, or no values) takes part in
every block's all-gather but reduces and rewrites its whole array at once.

One block (the default, `BLOCK_BYTES` None) skips the loop's machinery
(`_forward_one_block`, `_backward_one_block`: the same kernel calls and
arithmetic, so the same bits).  The MPI layer (fastbn/nn/syncbatchnorm.py)
does not call `forward_blocks` then: it folds its header into the one
statistics exchange with `local_stats_into` and `merged_stats`, so its
one-block forward is one Allgather instead of two; the torch layer keeps
its header exchange.

Errors: every block's message starts with a status word.  A rank whose
reduction or rewrite raises keeps taking part with status 1; at the next
exchange every rank sees it and raises the same ValueError (`fail`), so
none is left blocked in a collective.  With several blocks, one last status
word after the loop covers the rewrite of the last block.  With one block
(the default) the rewrite runs after the only exchange, on data every rank
has checked, so only an out-of-memory error can stop it, and that one stays
on its rank.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from .._output_cache import new_array
from ._comm import sum_in_rank_order

__all__ = ["BLOCK_BYTES", "plan_blocks", "Exchange", "CommExchange", "forward_blocks",
           "backward_blocks"]

#: Input bytes per block and rank (x in the forward; dy and x in the
#: backward), or None: one block (the unblocked phases).  None by default:
#: blocks were not faster on the 2-core AMD EPYC (Zen 3, AVX2; 512 KiB L2
#: per core, 32 MiB L3 shared with other tenants) of session 7 once two
#: ranks must meet at every block.  (32, 128, 56, 56) float32, 1 thread per
#: rank, forward+backward with the fresh y and dx the layers return,
#: interleaved rounds, all under load average 4.6-6.3 from other jobs
#: (7-9 where said):
#:
#: - 1 process (benchmarks/syncbn_blocks.py, one-rank stand-in
#:   communicator, CPU time median (min) ms, 31 rounds): local BatchNorm2d
#:   41.5 (36.3), one block 50.8 (43.1); sequential order (the block loop
#:   of `_run`) 2/4/8 MiB 48.6/49.9/50.3 (43.2/42.5/43.3), overlapped order
#:   (see below) 53.4/55.0/54.4 (45.9/46.7/45.4).  Another run (21 rounds):
#:   one block 60.1, sequential 0.5/1/2/4 MiB 68.5/63.0/56.8/56.6,
#:   overlapped 68.6/66.6/61.5/62.9.  So alone, the sequential order at
#:   2-4 MiB is even with or a few % under one block, and 4-5 ms under the
#:   overlapped order (one cached block instead of two, see below).
#: - 2 ranks (examples/distributed_mlp.py --bn-cost --block-bytes ..., then
#:   with an option timing both orders, 15 rounds, slowest rank, median ratio
#:   to the local layer): one block 1.51 and 1.27 in two runs; sequential
#:   1/2/4 MiB 2.52/2.08/1.68, overlapped 2.39/1.90/1.70; sequential
#:   4/8/16 MiB 1.70/1.42/1.30, overlapped 1.62/1.42/1.34; a third run
#:   (load 6.3): one block 1.18, sequential 1/2/4 MiB 2.40/1.59/1.46,
#:   overlapped 2.36/1.66/1.48 (1 MiB: 192 blocks, ~0.9 ms each against
#:   16.5 us of Python: the cost is the meeting).  At load 7-9:
#:   one block 0.19-0.23 s, 2/4/8 MiB blocks 5.3-6.6/1.8-3.0/0.8-1.0 s.
#:   Every block is a meeting of the ranks: when the machine is
#:   oversubscribed, a rank waits there for its peer to be scheduled again,
#:   up to a time slice per block, which no order removes (MPICH's
#:   Iallgather progresses only inside the wait, so the overlapped order
#:   hides nothing either; polling with Test and sched_yield instead of one
#:   Wait made no difference).  A quiet machine may tell otherwise:
#:   re-measure there before setting this.
#:
#: The overlapped order (until session 7 the `OVERLAP` flag: stats(0);
#: Iallgather(0); for k: stats(k + 1); wait(k); merge(k); Iallgather(k + 1);
#: apply(k)) was removed after these figures: alone it was 4-5 ms slower
#: (two blocks cached); with two ranks it was within the run-to-run spread
#: of the sequential order (a little under it in one run, over it in
#: another), and MPICH does not progress the Iallgather between start and
#: wait, so it hid nothing.
#:
#: Other costs of blocks: (1) a fresh 51 MB output costs 7-9 ms of page
#: faults (the OS maps and zeroes its pages: a strided one-byte-per-page
#: touch takes 8.4-9.0 ms; filling a fresh array 11.3 ms against 4.3 ms for
#: an existing one) whoever touches it first, the fused local kernels
#: included.  Writing one byte per page of the fresh y / dx before the loop
#: (so the zeroing does not evict the block about to be read again) moved
#: that cost without removing it: blocked runs with and without it were
#: within noise, so it was removed (session 8).  (2) each block costs about 16.5 us of
#: Python (loop, exchange, merge, kernel calls; min over 300 rounds of
#: 2x128x2x2 in one-channel blocks; 18.0 us before the reused message row
#: and table): 90 blocks at 2 MiB, 1.5 ms.  (3) the removed overlapped
#: order read block k + 1 before it rewrote block k, so two blocks had to
#: stay cached: more than the 512 KiB L2 even for one channel (401 KB here).
#:
#: Where one block's time goes (session 9, issue #15; 2 ranks x 1 thread,
#: (32, 128, 56, 56) float32, both ranks timed after a barrier, slowest rank,
#: min of 20 rounds, load 3): the split kernels are not slower than the
#: fused ones when both ranks run them at once -- stats 2.69 + apply 15.41
#: ms against train_forward 20.99, backward_reduce 5.07 + backward_apply
#: 18.53 against backward 23.00 (fresh outputs; outputs allocated before:
#: apply 2.99, train_forward 7.88, backward_apply 6.62, backward 12.26).
#: Timed as whole sequences instead (stats, apply, backward_reduce,
#: backward_apply with fresh outputs and no exchange, against the local
#: layer's forward+backward, 15-25 rounds), the split kernels were 5-17 %
#: slower (min; 33.80 / 30.60 ms at load 1.5, 38.62 / 32.83 at load 3.4),
#: so how much of the gap the second read costs with two ranks is not
#: settled.
#: Much of a call is the fresh output's page faults (NumPy asks for huge
#: pages: zeroing, and compaction when two ranks fault at once), about half
#: of both layers' time (fused forward+backward: 44 ms with fresh outputs,
#: 20 ms without); with freed outputs reused by malloc
#: (MALLOC_MMAP_THRESHOLD_=1073741824) the --bn-cost local layer took
#: 27-31 ms instead of 51-52 (min of 10 rounds, load 6).  A one-block call
#: also costs ~0.2 ms of Python and exchanges the local layer does not:
#: forward+backward of (2, 128, 2, 2), 232 against 26 us (min of 1500; one
#: Allgather of a 257-double row 4.4 us).  The rest of the gap the --bn-cost
#: ratio shows is, as far as measured, the meetings: a rank waits at every
#: exchange for the slower one, so the variance of each segment (page faults
#: mostly) adds up segment by segment instead of once per call (not proven
#: apart).  The ratio moved by +-0.05 between runs of the same build minutes
#: apart (1.08-1.18 min, 1.04-1.14 median, load 5-6).
#: Session 10: the MPI layer's one-block forward folds its header into the
#: statistics exchange (one meeting less per forward) and the per-call
#: Python was cut: forward+backward of (2, 8, 3, 3) on 2 ranks 199-204 ->
#: 99-100 us (min of 3000, medians 227-272 -> 107-115; (2, 128, 2, 2),
#: min of 1500: 238-240 -> 131 us, one earlier launch of the old build
#: read 638; load 2.7-4.4, builds alternated by launch), forward alone
#: 135 -> 61 us, backward 68 -> 44.  The --bn-cost ratio did not move
#: measurably (0.1 ms of a 45-60 ms call; load 3.7-4.7, 7 launches of
#: each build alternated, 15-30 rounds: before 1.16-1.27 min / 1.18-1.23
#: median, after 1.07-1.27 / 1.11-1.23; folded against a header exchange plus one
#: block in the same launch, 25 rounds: medians 1.203 / 1.211 and
#: 1.224 / 1.238): what remains is the second read of x and dy and the
#: meetings' waits under load.
#: Session 11: y and dx come from the output cache (fastbn._output_cache),
#: so the page faults above are gone from both layers (--bn-cost, quiet,
#: load 0.7-1.0, 15 rounds, min: local 35.7 -> 19.3 ms, one block 42.7 ->
#: 24.9 ms); the ratio rose to 1.29-1.43, and blocks now pay: 6-8 MiB
#: 1.20-1.25, 4 MiB 1.21-1.24, 2 and 12-16 MiB 1.28-1.38.  With a third
#: process on one of the two cores, 4 and 16 MiB blocks were 1.5-1.8 where
#: one block was 1.24-1.39: the default stays one block.
BLOCK_BYTES: Optional[int] = None

Blocks = List[Tuple[int, int]]

def plan_blocks(channels: int, max_count: int, itemsize: int, streams: int, planar: bool,
                block_bytes: Optional[int] = None) -> Blocks:
    """The channel blocks [(first, stop), ...] of a pipelined pass, the same
    on every rank given the same (gathered) arguments: about `block_bytes`
    (None: `BLOCK_BYTES`) of `streams` input arrays per block, at least one
    channel; one block when that is None or no rank's input is planar."""
    if block_bytes is None:
        block_bytes = BLOCK_BYTES
    channel_bytes = max_count * itemsize * streams
    if block_bytes is None or not planar or channel_bytes <= 0:
        return [(0, channels)]
    per_block = max(1, min(channels, block_bytes // channel_bytes))
    return [(first, min(channels, first + per_block)) for first in range(0, channels, per_block)]


class Exchange:
    """A communicator's blocking all-gather of one float64 row per rank."""

    def allgather(self, row: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        """The (ranks, len) table of every rank's `row`, in rank order, valid
        until the next call (an implementation may reuse its memory)."""
        raise NotImplementedError


class CommExchange(Exchange):
    """An mpi4py communicator's Allgather."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.size = int(comm.Get_size())
        self._buffer: Optional[np.ndarray] = None

    def allgather(self, row: np.ndarray) -> np.ndarray:
        """A blocking Allgather into one table buffer reused by the next
        call (the block loop copies what it keeps out of each table)."""
        width = row.size
        if self._buffer is None or self._buffer.size < self.size * width:
            self._buffer = np.empty(self.size * width)
        table = self._buffer[:self.size * width].reshape(self.size, width)
        self.comm.Allgather(row, table)
        return table


def _run(blocks: Blocks, exchange: Exchange, reduce: Callable, combine: Callable,
         rewrite: Callable, fail: Callable, local_error: Optional[BaseException] = None) -> None:
    """The block loop: each block is reduced, exchanged (a blocking
    all-gather), merged and rewritten before the next one is read, so only
    one block has to stay cached and the rewrite follows its reduction as in
    the fused local kernels.  reduce(first, stop) -> this rank's payload of
    the block (a float64 row, or a tuple of parts that make it up);
    combine(first, stop, table) with the (ranks, payload) table;
    rewrite(first, stop).  fail(statuses, local_error) raises on every rank:
    every block's message starts with this rank's status (1: its reduction
    or an earlier rewrite raised), and with several blocks one last status
    exchange covers the last rewrite; with one block, a rank's own rewrite
    error after the only exchange is raised here, on that rank."""
    error = local_error
    # one message buffer for every block (the exchange is blocking, the row
    # is free again when it returns)
    buffer = np.zeros(1 + 2 * max(stop - first for first, stop in blocks))
    for first, stop in blocks:
        row = buffer[:1 + 2 * (stop - first)]
        if error is None:
            try:
                _fill(row, reduce(first, stop))
            except Exception as caught:  # reported to every rank by the status
                error = caught
        row[0] = 0.0 if error is None else 1.0
        table = exchange.allgather(row)
        if np.count_nonzero(table[:, 0]):
            fail(table[:, 0], error)
        combine(first, stop, table[:, 1:])
        if error is None:
            try:
                rewrite(first, stop)
            except Exception as caught:
                error = caught
    _finish(blocks, exchange, fail, error)


def _fill(row: np.ndarray, payload) -> None:
    """Write a payload (a row or a tuple of parts) after the status word."""
    if isinstance(payload, tuple):
        at = 1
        for part in payload:
            row[at:at + part.size] = part
            at += part.size
    else:
        row[1:] = payload


def _finish(blocks: Blocks, exchange: Exchange, fail: Callable,
            error: Optional[BaseException]) -> None:
    if len(blocks) > 1:
        # the last rewrite ran after its exchange: one more status
        # word, so an error there also raises on every rank
        table = exchange.allgather(np.array([0.0 if error is None else 1.0]))
        if np.count_nonzero(table[:, 0]):
            fail(table[:, 0], error)
    if error is not None:
        raise error


class _Pass:
    """Per-rank geometry of a pipelined pass: the kernels' channel-range
    calls on a planar array, or (`whole`) the whole array at the first
    block and its rewrite after the last."""

    def __init__(self, kernels, x: np.ndarray, layout, blocks: Blocks) -> None:
        self.kernels = kernels
        self.geometry = (layout.outer, layout.channels, layout.inner)
        self.empty = x.size == 0
        self.whole = len(blocks) == 1 or layout.inner <= 1 or self.empty
        self.last = blocks[-1]
        self.cache = None

    def reduce(self, first: int, stop: int, compute: Callable) -> np.ndarray:
        """The payload [a, b] of channels [first, stop): compute(range) ->
        (a, b) for those channels (range None: all of them)."""
        if not self.whole:
            return tuple(compute((first, stop)))
        if self.cache is None:
            self.cache = compute(None)
        a, b = self.cache
        return a[first:stop], b[first:stop]

    def rewrite(self, first: int, stop: int, compute: Callable) -> None:
        if self.empty:
            return
        if not self.whole:
            compute((first, stop))
        elif (first, stop) == self.last:
            compute(None)


def _addresses(*arrays) -> Tuple[int, ...]:
    """Where the arrays among `arrays` start, for new_array's placement; a
    rank whose own checks failed may hold None or a non-array in their place
    (it must still reach the exchanges, not raise here)."""
    return tuple(a.ctypes.data for a in arrays if isinstance(a, np.ndarray))


def forward_blocks(kernels, x: np.ndarray, layout, counts: Sequence[int], weight, bias,
                   eps: float, relu: bool, blocks: Blocks, exchange: Exchange,
                   fail: Callable
                   ) -> Tuple[np.ndarray, int, np.ndarray, np.ndarray, np.ndarray]:
    """The synchronized training forward of this rank's `x` (C-contiguous,
    already checked), given the ranks' values per channel `counts`
    (gathered, total >= 2): (y, total, mean, m2, invstd), the merged
    statistics float64 with ``invstd = 1 / sqrt(m2 / total + eps)``."""
    outer, channels, inner = layout.outer, layout.channels, layout.inner
    counts = [int(c) for c in counts]
    total = sum(counts)
    if len(blocks) == 1:
        return _forward_one_block(kernels, x, layout, counts, total, weight, bias, eps, relu,
                                  exchange, fail)
    state = _Pass(kernels, x, layout, blocks)
    y = new_array(x.shape, x.dtype, _addresses(x))
    mean, m2, invstd = np.zeros(channels), np.zeros(channels), np.zeros(channels)

    def stats(channel_range):
        if state.empty:
            width = channels if channel_range is None else channel_range[1] - channel_range[0]
            return np.zeros(width), np.zeros(width)
        if channel_range is None:
            return kernels.stats(x, outer, channels, inner)
        return kernels.stats(x, outer, channels, inner, channel_range=channel_range)

    def combine(first, stop, table):
        width = stop - first
        _, mean[first:stop], m2[first:stop] = kernels.merge_stats(
            counts, table[:, :width], table[:, width:])
        invstd_into(invstd[first:stop], m2[first:stop], total, eps)

    def apply(channel_range):
        if channel_range is None:
            kernels.apply(x, y, outer, channels, inner, mean, invstd, weight, bias, relu)
        else:
            kernels.apply(x, y, outer, channels, inner, mean, invstd, weight, bias, relu,
                          channel_range=channel_range)

    _run(blocks, exchange, lambda a, b: state.reduce(a, b, stats), combine,
         lambda a, b: state.rewrite(a, b, apply), fail)
    return y, total, mean, m2, invstd


def backward_blocks(kernels, dy: np.ndarray, x: np.ndarray, layout, mean: np.ndarray,
                    invstd: np.ndarray, weight, relu_from, total: int, blocks: Blocks,
                    exchange: Exchange, fail: Callable,
                    local_error: Optional[BaseException] = None
                    ) -> Tuple[np.ndarray, ...]:
    """The synchronized training backward of this rank's (dy, x) (both
    C-contiguous when planar, checked; `local_error`: this rank's checks
    failed, it only takes part in the exchanges): (dx, sum_dy, sum_dy_xhat,
    local_sum_dy, local_sum_dy_xhat), the sums float64, over all ranks
    (added in rank order) and this rank's own."""
    if len(blocks) == 1:
        return _backward_one_block(kernels, dy, x, layout, mean, invstd, weight, relu_from,
                                   total, exchange, fail, local_error)
    outer, channels, inner = layout.outer, layout.channels, layout.inner
    state = _Pass(kernels, x, layout, blocks)
    mask_weight, mask_bias = relu_from or (None, None)
    relu = relu_from is not None
    dx = new_array(x.shape, x.dtype, _addresses(x, dy))
    sum_dy, sum_dy_xhat = np.zeros(channels), np.zeros(channels)
    local_dy, local_dy_xhat = np.zeros(channels), np.zeros(channels)

    def reduce(channel_range):
        first, stop = (0, channels) if channel_range is None else channel_range
        if not state.empty:
            extra = {} if channel_range is None else {"channel_range": channel_range}
            local_dy[first:stop], local_dy_xhat[first:stop] = kernels.backward_reduce(
                dy, x, outer, channels, inner, mean, invstd, mask_weight, mask_bias, relu,
                **extra)
        return local_dy[first:stop], local_dy_xhat[first:stop]

    def combine(first, stop, table):
        width = stop - first
        # rank order, on every rank: the same sums bit for bit
        sums = sum_in_rank_order(table)
        sum_dy[first:stop], sum_dy_xhat[first:stop] = sums[:width], sums[width:]

    def apply(channel_range):
        extra = {} if channel_range is None else {"channel_range": channel_range}
        kernels.backward_apply(dy, x, dx, outer, channels, inner, mean, invstd, weight, sum_dy,
                               sum_dy_xhat, float(total), mask_weight, mask_bias, relu, **extra)

    _run(blocks, exchange, lambda a, b: state.reduce(a, b, reduce), combine,
         lambda a, b: state.rewrite(a, b, apply), fail, local_error)
    return dx, sum_dy, sum_dy_xhat, local_dy, local_dy_xhat


# section: one block (the default) -------------------------------------------------
# The same kernel calls and arithmetic as the block loop with one block (so
# the same bits), without its per-call machinery (closures, the _Pass state,
# the payload copies): about 40 us of Python less per forward+backward on a
# tiny input (session 10, see fastbn/nn/syncbatchnorm.py).


def invstd_into(out: np.ndarray, m2: np.ndarray, total: int, eps: float) -> np.ndarray:
    """``1 / sqrt(m2 / total + eps)`` written into `out` (float64) with no
    temporaries: the same operations, so the same bits, for any slice."""
    np.divide(m2, total, out=out)
    out += eps
    np.sqrt(out, out=out)
    np.divide(1.0, out, out=out)
    return out


def local_stats_into(kernels, x: np.ndarray, layout, row: np.ndarray) -> None:
    """This rank's per-channel (mean, m2) written into `row` (2 * channels
    float64: the means, then the m2s); zeros when it holds no values (its
    count 0 drops it from the merge)."""
    channels = layout.channels
    if x.size == 0:
        row[:] = 0.0
        return
    mean, m2 = kernels.stats(x, layout.outer, channels, layout.inner)
    row[:channels] = mean
    row[channels:] = m2


def merged_stats(kernels, counts: List[int], total: int, table: np.ndarray, eps: float
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, m2, invstd) of all ranks, float64, from the gathered (ranks,
    2 * channels) table of `local_stats_into` rows, merged in rank order."""
    channels = table.shape[1] // 2
    _, mean, m2 = kernels.merge_stats(counts, table[:, :channels], table[:, channels:])
    return mean, m2, invstd_into(np.empty(channels), m2, total, eps)


def normalize_merged(kernels, x: np.ndarray, layout, counts: List[int], total: int,
                     table: np.ndarray, weight, bias, eps: float, relu: bool):
    """The one-block forward after its exchange: the gathered statistics
    (`local_stats_into` rows) merged in rank order, then x normalized into a
    new y.  Returns (y, mean, m2, invstd).  It runs on data every rank has
    checked: only an out-of-memory error can stop it, and that one stays on
    its rank."""
    mean, m2, invstd = merged_stats(kernels, counts, total, table, eps)
    y = new_array(x.shape, x.dtype, _addresses(x))
    if x.size:
        kernels.apply(x, y, layout.outer, layout.channels, layout.inner, mean, invstd, weight,
                      bias, relu)
    return y, mean, m2, invstd


def _forward_one_block(kernels, x, layout, counts, total, weight, bias, eps, relu, exchange,
                       fail):
    channels = layout.channels
    row = np.empty(1 + 2 * channels)
    error = None
    try:
        local_stats_into(kernels, x, layout, row[1:])
        row[0] = 0.0
    except Exception as caught:  # reported to every rank by the status
        error = caught
        row[0] = 1.0
    table = exchange.allgather(row)
    if np.count_nonzero(table[:, 0]):
        fail(table[:, 0], error)
    y, mean, m2, invstd = normalize_merged(kernels, x, layout, counts, total, table[:, 1:],
                                           weight, bias, eps, relu)
    return y, total, mean, m2, invstd


def _backward_one_block(kernels, dy, x, layout, mean, invstd, weight, relu_from, total,
                        exchange, fail, local_error):
    outer, channels, inner = layout.outer, layout.channels, layout.inner
    mask_weight, mask_bias = relu_from or (None, None)
    relu = relu_from is not None
    row = np.zeros(1 + 2 * channels)
    error = local_error
    if error is None:
        try:
            if x.size:
                row[1:1 + channels], row[1 + channels:] = kernels.backward_reduce(
                    dy, x, outer, channels, inner, mean, invstd, mask_weight, mask_bias, relu)
        except Exception as caught:  # reported to every rank by the status
            error = caught
    row[0] = 0.0 if error is None else 1.0
    local_dy, local_dy_xhat = row[1:1 + channels], row[1 + channels:]   # the row is not reused
    table = exchange.allgather(row)
    if np.count_nonzero(table[:, 0]):
        fail(table[:, 0], error)
    # rank order, on every rank: the same sums bit for bit
    sums = sum_in_rank_order(table[:, 1:])
    sum_dy, sum_dy_xhat = sums[:channels], sums[channels:]
    dx = new_array(x.shape, x.dtype, _addresses(x, dy))
    if x.size:
        kernels.backward_apply(dy, x, dx, outer, channels, inner, mean, invstd, weight, sum_dy,
                               sum_dy_xhat, float(total), mask_weight, mask_bias, relu)
    return dx, sum_dy, sum_dy_xhat, local_dy, local_dy_xhat
