"""`SyncBatchNorm`: batch norm whose training statistics span every rank of
an MPI communicator (mpi4py), for data-parallel training on CPU clusters.

    from mpi4py import MPI
    bn = fastbn.nn.SyncBatchNorm(64)                   # comm=MPI.COMM_WORLD
    model = fastbn.nn.SyncBatchNorm.convert_sync_batchnorm(model)

Training forward, on every rank::

    ONE Allgather of a header               (input description, checks, count)
    per channel block k (see below):
      local (mean, m2) of block k           the kernels' stats phase
      Allgather of [status, mean, m2]       (blocking)
      merge in rank order (Chan's formula)  batch_norm_merge_stats
      normalize block k                     the kernels' apply phase

and the backward, per block: local (sum dy, sum dy*xhat), Allgather of
[status, both sums], the sums added in rank order (float64), dx of the
block.  Bytes sent per rank and call, C channels in B blocks: forward
8 * (6 + B + 2C), backward 8 * (B + 2C), 8 more each when B > 1 (a last
status word); every rank receives P times that.

Blocks (fastbn/distributed/_pipeline.py): when its BLOCK_BYTES is set
(None by default, one block: blocks were slower on the machines measured,
see the figures there), the channels of a channels-first input with
spatial values are cut into blocks of that many bytes of input, the new
output's pages are faulted in before the first block, and each block is
normalized right after its own statistics and exchange, while it is still
in the caches, so x (and dy) come from DRAM about once, as in the fused
local kernels.
Channels-last and 2-D inputs always form one block.  The results are
bit-identical to those of one block, whatever the blocks.

Gathering then combining in rank order (rather than an Allreduce, whose
summation order is the MPI library's choice) makes every rank compute the
same bits, run after run.  The header carries each rank's input description
and whether its local checks passed, so a bad input on one rank makes EVERY
rank raise the same ValueError instead of leaving the others blocked in the
collective; that message quotes the failing rank's own error (one more
Allgather of 240 bytes per rank, on the failure path only).  The first training forward of a layer also checks, with one
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
from .._bn_validation import check_like
from .._validation import describe
from ..distributed import _comm, _pipeline
from .batchnorm import _BatchNorm, _TRAIN
from .module import accumulate_grads

__all__ = ["SyncBatchNorm"]

_SYNCED = 2                 # saved-forward mode: statistics of every rank
_FORWARD_HEADER = 6         # status, channels, dtype code, ndim, count, planar


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
        dtype of parameters and buffers; inputs must match.

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

    # ---- communication helpers ------------------------------------------------

    def _communicator(self):
        return _comm.resolve_comm(self.comm)

    def _configuration(self) -> list:
        momentum = -1.0 if self.momentum is None else float(self.momentum)
        return [self.num_features, _comm.dtype_code(self.dtype), self.axis, self.affine,
                self.track_running_stats, self.fused_relu, float(self.eps), momentum]

    def _agree_on_configuration(self, comm) -> None:
        """Once per layer and communicator: the ranks built the same layer
        (the forward's buffer length depends on num_features)."""
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

    # ---- forward --------------------------------------------------------------

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Normalize `x`; in training mode with the statistics of all ranks'
        batches (collective: every rank must call it), else as `BatchNorm1d`.

        Raises
        ------
        ValueError
            On EVERY rank, with the same message, when any rank's input is
            invalid (channels, dtype, rank) or the ranks' inputs disagree, or
            when all ranks together hold fewer than 2 values per channel.
        """
        if not self.training:
            return super().forward(x)
        comm = self._communicator()
        self._agree_on_configuration(comm)
        channels = self.num_features
        # the header: this rank's input description and checks, then every
        # rank derives the same block partition from the gathered table
        send = np.zeros(_FORWARD_HEADER)
        send[1:4] = (-1, 0, -1)
        local_error = None
        try:
            array = np.asarray(x) if not isinstance(x, np.ndarray) else x
            send[1:4] = (array.shape[self.axis] if array.ndim >= 2 else -1,
                         _comm.dtype_code(array.dtype), array.ndim)
            # the base layer's checks: input rank, channels and dtype, then
            # the state arrays (writeable running statistics and counter
            # when they are updated), all before anything is written
            x, layout = self._check_input(x)
            update = self._track_running_stats and self.running_mean is not None
            state = self._checked_state(x.dtype, update)
            send[4] = layout.n_per_channel
            send[5] = layout.inner > 1
        except Exception as error:  # reported to every rank through the header
            local_error = error
            send[0] = 1
        header = _comm.agree(comm, send)
        if header[:, 0].any() or not (header[:, 2] == header[0, 2]).all():
            messages = _comm.error_messages(comm, local_error)
            rows = [_comm.with_cause(f"{int(row[1])} channels, dtype {_comm.dtype_name(row[2])}, "
                                     f"{int(row[3])}D input"
                                     + (" -- rejected by this rank's checks" if row[0] else ""),
                                     message)
                    for row, message in zip(header, messages)]
            _comm.raise_on_disagreement(
                f"SyncBatchNorm: an input is invalid or the ranks' inputs disagree (every rank "
                f"needs a {self.dtype} input with {channels} channels on axis {self.axis}):",
                rows, local_error)
        counts = _comm.gathered_counts(header)
        weight, bias, running_mean, running_var = state
        if layout.inner > 1:
            # once, not per block; the channel-range phases need C-contiguous,
            # aligned arrays (a view at an odd byte offset is copied)
            x = np.require(x, requirements=("C", "A"))
        blocks = _pipeline.plan_blocks(channels, int(counts.max()), x.dtype.itemsize, 1,
                                       bool(header[:, 5].any()))
        def failed(statuses, error):
            messages = _comm.error_messages(comm, error)
            _comm.raise_on_disagreement(
                "SyncBatchNorm: the forward failed on a rank:",
                [_comm.with_cause("failed" if status else "ok", message)
                 for status, message in zip(statuses, messages)], error)

        y, total, mean, m2, invstd = _pipeline.forward_blocks(
            current_kernels(), x, layout, counts, weight, bias, self._eps, self.fused_relu,
            blocks, _pipeline.CommExchange(comm), failed)
        if update:
            self._update_running_stats(mean, m2 / (total - 1), running_mean, running_var)
        object.__setattr__(self, "_saved", (_SYNCED, x, layout, mean, invstd, total,
                                            int(counts.max()), bool(header[:, 5].any())))
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
        backups = (running_mean.copy(), running_var.copy())
        try:
            running_mean[...] = new_mean
            running_var[...] = new_var
            if counter is not None:
                counter[...] += 1
        except BaseException:
            running_mean[...], running_var[...] = backups
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
        try:
            dy = check_like("dy", dy, x, "the forward's input")
            weight, bias = self._checked_state(x.dtype)[:2]
            self._check_grads(x.dtype)   # before any rank writes a gradient
            relu_from = (weight, bias) if self.fused_relu else None
            if layout.inner > 1:
                dy = np.require(dy, requirements=("C", "A"))
        except Exception as error:  # reported to every rank by the first block's status
            local_error = error
        blocks = _pipeline.plan_blocks(self.num_features, max_count, x.dtype.itemsize, 2, planar)

        def failed(statuses, error):
            messages = _comm.error_messages(comm, error)
            rows = [_comm.with_cause("dy or the layer's state rejected by this rank's checks, or "
                                     "its backward failed" if status else "ok", message)
                    for status, message in zip(statuses, messages)]
            _comm.raise_on_disagreement(
                f"SyncBatchNorm.backward: a rank's dy or gradients are invalid (every rank "
                f"needs dy shaped like its forward input, dtype {x.dtype}, and grads of that "
                f"dtype):", rows, error)

        dx, sum_dy, sum_dy_xhat, _, _ = _pipeline.backward_blocks(
            current_kernels(), dy, x, layout, mean, invstd, weight, relu_from, total, blocks,
            _pipeline.CommExchange(comm), failed, local_error)
        # both grads change together or not at all (the base layer's rule)
        accumulate_grads([(param, grad.astype(x.dtype))
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
