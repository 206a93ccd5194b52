"""`SyncBatchNorm`: batch norm whose training statistics span every rank of
an MPI communicator (mpi4py), for data-parallel training on CPU clusters.

    from mpi4py import MPI
    bn = fastbn.nn.SyncBatchNorm(64)                   # comm=MPI.COMM_WORLD
    model = fastbn.nn.SyncBatchNorm.convert_sync_batchnorm(model)

Training forward, on every rank, with one channel block (the default)::

    local checks of the input and state     (nothing exchanged yet)
    local (mean, m2) of every channel       the kernels' stats phase
    ONE Allgather of [header, mean, m2]     header: status, channels, dtype
                                            code, ndim, count, planar
    checks of the gathered headers          the same decision on every rank
    merge in rank order (Chan's formula)    batch_norm_merge_stats
    normalize                               the kernels' apply phase

The message length, 6 + 2C words, depends only on num_features (agreed by
the ranks at the first call), so a rank whose input fails its checks still
sends it (status 1, zeros) and a rank whose statistics raise sends status 2:
every rank sees the failure in the same exchange.

With channel blocks (BLOCK_BYTES set) the partition depends on every rank's
count and layout, so the forward first Allgathers the 6-word header alone,
then per block k: local (mean, m2) of block k, Allgather of [status, mean,
m2] (blocking), merge, normalize block k.

The backward, per block (one by default): local (sum dy, sum dy*xhat),
Allgather of [status, both sums], the sums added in rank order (float64),
dx of the block.  Bytes sent per rank and call, C channels: BLOCK_BYTES
None (the default), forward 8 * (6 + 2C), backward 8 * (1 + 2C) (C = 128:
2096 and 2056); BLOCK_BYTES set, B blocks, forward 8 * (6 + B + 2C),
backward 8 * (B + 2C), 8 more each when B > 1 (a last status word); every
rank receives P times that.  So one exchange (one meeting of the ranks) per
forward and one per backward by default.

Blocks (fastbn/distributed/_pipeline.py): when its BLOCK_BYTES is set
(None by default, one block: blocks were slower on the machines measured,
see the figures there), the channels of a channels-first input with
spatial values are cut into blocks of that many bytes of input, and each
block is normalized right after its own statistics and exchange, while it is still
in the caches, so x (and dy) come from DRAM about once, as in the fused
local kernels.
Channels-last and 2-D inputs always form one block.  The results are
bit-identical to those of one block, whatever the blocks.

Gathering then combining in rank order (rather than an Allreduce, whose
summation order is the MPI library's choice) makes every rank compute the
same bits, run after run.  The header carries each rank's input description
and whether its local checks (and statistics) passed, so a bad input on one
rank makes EVERY rank raise the same ValueError instead of leaving the others
blocked in the collective; that message quotes the failing rank's own error
(one more Allgather of 240 bytes per rank, on the failure path only).  The first training forward of a layer also checks, with one
tiny Allgather, that the ranks built the same layer (num_features, dtype,
axis, eps, ...).

Gradients: ``weight.grad`` / ``bias.grad`` receive the sums over ALL ranks
(the gradient of the summed per-rank losses, equal on every rank), and dx is
the gradient of that same sum.  `fastbn.distributed.allreduce_gradients`
and `DataParallel` know this and scale these parameters instead of
allreducing them again.

Eval mode uses the running statistics (or local batch statistics when
track_running_stats is False, as torch does) and communicates nothing.  All
ranks must call the layer in the same mode and the same number of times.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .._backend import current_kernels
from .._bn_validation import check_like, is_bfloat16
from .._validation import describe
from ..distributed import _comm, _pipeline
from .batchnorm import _BatchNorm, _TRAIN
from .module import accumulate_grads

__all__ = ["SyncBatchNorm"]

_SYNCED = 2                 # saved-forward mode: statistics of every rank
_FORWARD_HEADER = 6         # status, channels, dtype code, ndim, count, planar
_REJECTED, _FAILED = 1, 2   # forward statuses: the input failed this rank's checks; its
                            # statistics raised (after the checks passed)
_INT64 = np.dtype(np.int64)


class SyncBatchNorm(_BatchNorm):
    """Batch norm over (N, C, *spatial) input (``axis=-1``: (N, *spatial, C))
    whose training statistics are those of the batches of all ranks together.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats
        As `BatchNorm1d`; must be the same on every rank.
    axis : int, keyword-only
        Channel axis: 1 (channels-first) or -1 (channels-last).
    comm : mpi4py communicator or None, keyword-only
        The ranks to synchronize over; None means ``MPI.COMM_WORLD``
        (mpi4py is imported at the first training forward, not before).
    dtype : float32 or float64, keyword-only
        dtype of parameters and buffers; inputs must match.  As the
        BatchNorm layers, a float32 layer also takes bfloat16 activations,
        but only in eval mode: the synchronized training forward does not.

    Notes
    -----
    The running variance is unbiased with the GLOBAL count (m2 / (n - 1),
    n over all ranks).  A rank may hold a batch of 1 (or 0) values per
    channel as long as all ranks together hold at least 2.
    """

    _input_ranks = (2, 3, 4, 5)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *, axis: int = 1,
                 comm: Any = None, dtype=np.float32) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, axis=axis,
                         dtype=dtype)
        if comm is not None:
            _comm.resolve_comm(comm)
        object.__setattr__(self, "comm", comm)
        object.__setattr__(self, "_agreed_comm", None)
        object.__setattr__(self, "_resolved_comm", None)

    # ---- communication helpers ------------------------------------------------

    def _communicator(self):
        # resolved once per value of `comm` (a new value is resolved and
        # checked again)
        comm = self.comm
        known = self._resolved_comm
        if known is not None and known[0] is comm:
            return known[1]
        resolved = _comm.resolve_comm(comm)
        object.__setattr__(self, "_resolved_comm", (comm, resolved))
        return resolved

    def _configuration(self) -> list:
        momentum = -1.0 if self.momentum is None else float(self.momentum)
        return [self.num_features, _comm.dtype_code(self.dtype), self.axis, self.affine,
                self.track_running_stats, self.fused_relu, float(self.eps), momentum]

    def _agree_on_configuration(self, comm) -> None:
        """Once per layer and communicator: the ranks built the same layer
        (the forward's message length depends on num_features)."""
        if self._agreed_comm is comm:
            return
        table = _comm.agree(comm, self._configuration())
        if not (table == table[0]).all():
            rows = [f"num_features={int(row[0])}, dtype={_comm.dtype_name(row[1])}, "
                    f"axis={int(row[2])}, affine={bool(row[3])}, "
                    f"track_running_stats={bool(row[4])}, relu={bool(row[5])}, eps={row[6]!r}, "
                    f"momentum={None if row[7] < 0 else row[7]!r}" for row in table]
            _comm.raise_on_disagreement(
                "SyncBatchNorm: the ranks' layers differ (num_features, dtype, axis, affine, "
                "track_running_stats, eps and momentum must be the same on every rank):", rows)
        object.__setattr__(self, "_agreed_comm", comm)

    # ---- local checks -----------------------------------------------------------

    def _plain_state(self, dtype, updating: bool) -> bool:
        """True when `_checked_state(dtype, updating)` would return the state
        arrays unchanged: each None or a 1-D ndarray of `dtype` and
        num_features elements, running statistics both or neither, and when
        `updating`, writeable running statistics that own their memory (so
        share none with each other, weight or bias; a parameter that does
        not own its memory takes the full check) and a plain writeable
        counter.  A few attribute reads instead of the validators' ~15 us;
        False sends the caller to `_checked_state`, which raises or
        normalizes."""
        arrays = self._state_arrays()
        channels = self._num_features
        for array in arrays:
            if array is not None and not (type(array) is np.ndarray and array.dtype is dtype
                                          and array.ndim == 1 and array.shape[0] == channels):
                return False
        weight, bias, running_mean, running_var = arrays
        if (running_mean is None) != (running_var is None):
            return False
        if not updating or running_mean is None:
            return True
        counter = self.num_batches_tracked
        if counter is None:
            if self._momentum is None:
                return False
        elif not (type(counter) is np.ndarray and counter.dtype is _INT64
                  and counter.ndim == 0 and counter.flags.writeable and counter.flags.aligned):
            return False
        if not (running_mean.flags.writeable and running_var.flags.writeable):
            return False
        distinct = set()
        for array in arrays:
            if array is not None:
                if not array.flags.owndata or id(array) in distinct:
                    return False
                distinct.add(id(array))
        return True

    def _checked_input(self, x, header: np.ndarray):
        """This rank's checks of a training input, before any exchange:
        header[1:6] = (channels, dtype code, ndim, values per channel, planar)
        as far as known; returns (x, layout, update, state) or raises the
        first failing check's error (nothing written)."""
        header[1] = header[3] = -1
        header[2] = 0
        array = x if isinstance(x, np.ndarray) else np.asarray(x)
        header[1] = array.shape[self._axis] if array.ndim >= 2 else -1
        header[2] = _comm.DTYPE_CODES.get(array.dtype, 0)
        header[3] = array.ndim
        # the base layer's checks: input rank, channels and dtype (the
        # geometry of the last accepted shape is reused, as the base layer
        # does), then the state arrays (writeable running statistics and
        # counter when they are updated), all before anything is written
        x, layout = self._known_or_checked_input(x)
        if is_bfloat16(x.dtype):
            # the base layer's checks also pass bfloat16 activations; the
            # statistics exchange and the channel-range kernels take
            # float32 and float64 only
            raise TypeError(f"input: expected dtype float32 or float64 in training mode "
                            f"(SyncBatchNorm's training forward does not take bfloat16 "
                            f"activations; its eval forward and BatchNorm do), got {x.dtype}")
        update = self._track_running_stats and self.running_mean is not None
        if self._plain_state(x.dtype, update):
            state = self._state_arrays()
        else:
            state = self._checked_state(x.dtype, update)
        if layout.inner > 1:
            # the channel-range phases need C-contiguous, aligned arrays (a
            # view at an odd byte offset is copied)
            flags = x.flags
            if not (flags.c_contiguous and flags.aligned):
                x = np.require(x, requirements=("C", "A"))
        header[4] = layout.n_per_channel
        header[5] = layout.inner > 1
        return x, layout, update, state

    def _checked_input_or_status(self, x, header: np.ndarray):
        """(`_checked_input(x, header)`'s result, None), or (None, the error)
        with header[0] = rejected: the error goes to every rank through the
        header's status, not up from here."""
        try:
            return self._checked_input(x, header), None
        except Exception as error:
            header[0] = _REJECTED
            return None, error

    def _raise_on_bad_header(self, comm, header: list, local_error) -> None:
        """The ValueError of every rank when a rank's input failed its checks
        (status 1) or the ranks' dtypes disagree; nothing otherwise.
        `header`: the gathered header rows as lists (Python comparisons: a
        NumPy reduction of a tiny column costs more here)."""
        dtype = header[0][2]
        # (list comprehensions, not generators: an abandoned generator is
        # closed later, wherever the collector runs)
        if not any([row[0] == _REJECTED or row[2] != dtype for row in header]):
            return
        messages = _comm.error_messages(comm, local_error)
        notes = {_REJECTED: " -- rejected by this rank's checks",
                 _FAILED: " -- its statistics failed"}
        rows = [_comm.with_cause(f"{int(row[1])} channels, dtype {_comm.dtype_name(row[2])}, "
                                 f"{int(row[3])}D input" + notes.get(int(row[0]), ""), message)
                for row, message in zip(header, messages)]
        _comm.raise_on_disagreement(
            f"SyncBatchNorm: an input is invalid or the ranks' inputs disagree (every rank "
            f"needs a {self.dtype} input with {self.num_features} channels on axis "
            f"{self.axis}):", rows, local_error)

    @staticmethod
    def _raise_forward_failed(comm, statuses, error) -> None:
        messages = _comm.error_messages(comm, error)
        _comm.raise_on_disagreement(
            "SyncBatchNorm: the forward failed on a rank:",
            [_comm.with_cause("failed" if status else "ok", message)
             for status, message in zip(statuses, messages)], error)

    # ---- forward --------------------------------------------------------------

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Normalize `x`; in training mode with the statistics of all ranks'
        batches (collective: every rank must call it), else as `BatchNorm1d`.

        Raises
        ------
        ValueError
            On EVERY rank, with the same message, when any rank's input is
            invalid (channels, dtype, rank) or the ranks' inputs disagree, or
            when all ranks together hold fewer than 2 values per channel, or
            when a rank's statistics failed (e.g. MemoryError).
        """
        if not self.training:
            return super().forward(x)
        comm = self._communicator()
        self._agree_on_configuration(comm)
        if _pipeline.BLOCK_BYTES is not None:
            return self._blocked_forward(comm, x)
        # one block (the default): ONE Allgather carries this rank's header
        # and its statistics.  Its length, 6 + 2 * num_features, is the same
        # on every rank whatever the input (num_features was agreed), so a
        # rank whose checks failed still sends it (status 1, zero statistics)
        # and every rank learns of the failure at the same exchange
        channels = self._num_features
        kernels = current_kernels()
        row = np.zeros(_FORWARD_HEADER + 2 * channels)
        checked, local_error = self._checked_input_or_status(x, row)
        if checked is not None:
            x, layout, update, state = checked
            try:
                _pipeline.local_stats_into(kernels, x, layout, row[_FORWARD_HEADER:])
            except Exception as error:  # e.g. MemoryError: reported to every rank
                local_error = error
                row[0] = _FAILED
        table = np.empty((comm.Get_size(), row.size))
        comm.Allgather(row, table)
        # the same decisions on every rank, from the gathered table only
        header = table[:, :_FORWARD_HEADER].tolist()
        self._raise_on_bad_header(comm, header, local_error)
        counts = [int(row[4]) for row in header]
        total = _comm.check_total_count(counts)
        if any([row[0] for row in header]):
            self._raise_forward_failed(comm, [row[0] for row in header], local_error)
        weight, bias, running_mean, running_var = state
        y, mean, m2, invstd = _pipeline.normalize_merged(
            kernels, x, layout, counts, total, table[:, _FORWARD_HEADER:], weight, bias,
            self._eps, self.fused_relu)
        if update:
            self._update_running_stats(mean, m2 / (total - 1), running_mean, running_var)
        object.__setattr__(self, "_saved", (_SYNCED, x, layout, mean, invstd, total,
                                            max(counts), any([row[5] for row in header])))
        return y

    def _blocked_forward(self, comm, x: np.ndarray) -> np.ndarray:
        """The training forward in channel blocks (`_pipeline.BLOCK_BYTES`
        set): the block partition depends on every rank's count and layout,
        so a header Allgather comes first, then the block pipeline."""
        channels = self._num_features
        send = np.zeros(_FORWARD_HEADER)
        checked, local_error = self._checked_input_or_status(x, send)
        header = _comm.agree(comm, send)
        self._raise_on_bad_header(comm, header.tolist(), local_error)
        counts = _comm.gathered_counts(header)
        x, layout, update, state = checked   # every rank's checks passed
        weight, bias, running_mean, running_var = state
        max_count, planar = int(counts.max()), bool(header[:, 5].any())
        blocks = _pipeline.plan_blocks(channels, max_count, x.dtype.itemsize, 1, planar)

        def failed(statuses, error):
            self._raise_forward_failed(comm, statuses, error)

        y, total, mean, m2, invstd = _pipeline.forward_blocks(
            current_kernels(), x, layout, counts, weight, bias, self._eps, self.fused_relu,
            blocks, _pipeline.CommExchange(comm), failed)
        if update:
            self._update_running_stats(mean, m2 / (total - 1), running_mean, running_var)
        object.__setattr__(self, "_saved", (_SYNCED, x, layout, mean, invstd, total, max_count,
                                            planar))
        return y

    def _update_running_stats(self, mean, unbiased_var, running_mean, running_var) -> None:
        """r = (1 - m) * r + m * stat (m = 1 / (count + 1) for momentum None),
        with the unbiased variance of the global batch; the running
        statistics and num_batches_tracked (when present) change together or
        not at all, also when a KeyboardInterrupt arrives mid-way, as in the
        base layer."""
        counter = self.num_batches_tracked
        momentum = self._momentum
        factor = momentum if momentum is not None else 1.0 / (int(counter) + 1)
        new_mean = (1.0 - factor) * running_mean + factor * mean
        new_var = (1.0 - factor) * running_var + factor * unbiased_var
        # the counter first and running_mean last: once running_mean is
        # written nothing is left to interrupt, so only running_var needs a
        # backup (the counter's is its old value)
        # (fill: a 0-d in-place add costs 2 us here, fill 0.4; an int64
        # counter at its maximum raises OverflowError before anything changes
        # instead of wrapping)
        old_var = running_var.copy()
        count = None
        try:
            if counter is not None:
                count = int(counter)
                counter.fill(count + 1)
            running_var[...] = new_var
            running_mean[...] = new_mean
        except BaseException:
            running_var[...] = old_var
            if count is not None:
                counter.fill(count)
            raise

    # ---- backward -------------------------------------------------------------

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Gradient of the input of the last forward (collective after a
        training forward: every rank must call it).

        Adds the sums over all ranks of dL/dweight and dL/dbias to
        ``weight.grad`` / ``bias.grad`` (the same values on every rank).

        Parameters
        ----------
        dy : ndarray
            IN.  Gradient of this rank's output; same shape and dtype as this
            rank's input.

        Returns
        -------
        ndarray
            dL/dx for this rank's input (a new array).
        """
        saved = self._saved
        if saved is None or saved[0] != _SYNCED:
            if saved is not None and saved[0] == _TRAIN:
                raise RuntimeError("SyncBatchNorm.backward: internal error, unsynchronized saved forward")
            return super().backward(dy)
        _, x, layout, mean, invstd, total, max_count, planar = saved
        comm = self._communicator()
        local_error = None
        weight = relu_from = None
        dtype = x.dtype
        try:
            dy = check_like("dy", dy, x, "the forward's input")
            if self._plain_state(dtype, False):
                weight, bias = self._state_arrays()[:2]
            else:
                weight, bias = self._checked_state(dtype)[:2]
            # before any rank writes a gradient
            if not all([param is None or param.grad is None or self._accumulable(param.grad, dtype)
                        for param in (self.weight, self.bias)]):
                self._check_grads(dtype)
            relu_from = (weight, bias) if self.fused_relu else None
            if layout.inner > 1:
                flags = dy.flags
                if not (flags.c_contiguous and flags.aligned):
                    dy = np.require(dy, requirements=("C", "A"))
        except Exception as error:  # reported to every rank by the exchange's status
            local_error = error
        blocks = ([(0, self._num_features)] if _pipeline.BLOCK_BYTES is None else
                  _pipeline.plan_blocks(self._num_features, max_count, dtype.itemsize, 2, planar))

        def failed(statuses, error):
            messages = _comm.error_messages(comm, error)
            rows = [_comm.with_cause("dy or the layer's state rejected by this rank's checks, or "
                                     "its backward failed" if status else "ok", message)
                    for status, message in zip(statuses, messages)]
            _comm.raise_on_disagreement(
                f"SyncBatchNorm.backward: a rank's dy or gradients are invalid (every rank "
                f"needs dy shaped like its forward input, dtype {dtype}, and grads of that "
                f"dtype):", rows, error)

        dx, sum_dy, sum_dy_xhat, _, _ = _pipeline.backward_blocks(
            current_kernels(), dy, x, layout, mean, invstd, weight, relu_from, total, blocks,
            _pipeline.CommExchange(comm), failed, local_error)
        # both grads change together or not at all (the base layer's rule)
        accumulate_grads([(param, grad.astype(dtype))
                          for param, grad in ((self.weight, sum_dy_xhat), (self.bias, sum_dy))
                          if param is not None])
        return dx

    # ---- conversion -----------------------------------------------------------

    @classmethod
    def convert_sync_batchnorm(cls, module, comm: Any = None):
        """Replace every BatchNorm layer of `module` (BatchNorm1d/2d/3d and
        the fused BatchNormReLU layers) by a SyncBatchNorm that shares its
        Parameter objects and buffer arrays (so an optimizer built on the
        old parameters keeps working).

        Parameters
        ----------
        module : fastbn.nn.Module
            Converted in place (its children are replaced); a BatchNorm layer
            itself is returned converted.
        comm : mpi4py communicator or None
            Given to every new layer (None: ``MPI.COMM_WORLD`` at first use).

        Returns
        -------
        Module
            `module`, or the new layer when `module` is a BatchNorm layer.
        """
        from .module import Module
        if not isinstance(module, Module):
            raise TypeError(f"module: expected a fastbn.nn.Module, got {describe(module)}")
        if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
            return cls._from_batchnorm(module, comm)
        for name, child in list(module.named_children()):
            converted = cls.convert_sync_batchnorm(child, comm)
            if converted is not child:
                setattr(module, name, converted)
        return module

    @classmethod
    def _from_batchnorm(cls, layer: _BatchNorm, comm: Any) -> "SyncBatchNorm":
        sync = cls(layer.num_features, layer.eps, layer.momentum, layer.affine,
                   layer.track_running_stats, axis=layer.axis, comm=comm, dtype=layer.dtype)
        if layer.fused_relu:
            object.__setattr__(sync, "fused_relu", True)
        if layer.affine:
            sync.weight = layer.weight
            sync.bias = layer.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(sync, name, getattr(layer, name))
        sync.train(layer.training)
        return sync

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text + (", relu=True" if self.fused_relu else "")
