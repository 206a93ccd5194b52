"""`SyncBatchNorm` for CPU tensors over ``torch.distributed`` (gloo), and
`convert_sync_batchnorm`.

torch's own ``torch.nn.SyncBatchNorm`` refuses CPU tensors.  This layer
has its constructor and state_dict (but is not its subclass, since
DistributedDataParallel rejects those on CPU).  It runs the protocol of
`fastbn.nn.SyncBatchNorm` (the MPI layer) over ``torch.distributed``: the
training forward all_gathers a small header (the input's description, this
rank's checks, its values per channel), then runs the channel-block
pipeline of fastbn/distributed/_pipeline.py (one block unless its
BLOCK_BYTES is set, None by default): per block of channels, this
rank's (mean, m2) by the kernels' stats phase, an all_gather of [status,
mean, m2] (blocking), the merge in rank order (Chan's
formula) and the normalization of the block while it is still in the
caches.  The backward does the same with the per-channel sums of dy and
dy * xhat (added in rank order in float64) and dx.  Bytes sent per rank
and call, C channels in B blocks: forward 8 * (6 + B + 2C), backward
8 * (B + 2C), 8 more each when B > 1.  Channels-last and 2-D inputs form one block.

Gathering then combining in rank order (instead of an all_reduce, whose
summation order is the backend's) gives every rank the same bits, run after
run.  The header carries each rank's input description and whether its local
checks passed, so a bad input on one rank (wrong channels or dtype) makes
EVERY rank raise the same ValueError instead of leaving the others blocked
in the collective.  Before its first synchronized forward on a process
group, a layer checks with one small all_gather that the ranks built the
same layer (num_features first: the forward's message length depends on it).

Gradients follow torch's SyncBatchNorm, so that
``torch.nn.parallel.DistributedDataParallel`` works unchanged: dx is the
gradient of the SUM of all ranks' losses (it uses the sums of every rank),
while ``weight.grad`` / ``bias.grad`` receive this rank's share only; their
sum over the ranks is the full-batch gradient (DDP's all_reduce adds them).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .. import functional as bn_functional
from .._backend import current_kernels
from .._bn_validation import batch_norm_layout
from ..distributed._comm import gathered_counts, raise_on_disagreement
from ..distributed._pipeline import Exchange, backward_blocks, forward_blocks, plan_blocks
from . import _ops
from .batchnorm import BatchNormReLU1d, BatchNormReLU2d, BatchNormReLU3d, _forward

__all__ = ["SyncBatchNorm", "SyncBatchNormReLU", "convert_sync_batchnorm"]

_FORWARD_HEADER = 6   # status, channels, dtype code, ndim, values per channel, planar
_DTYPE_CODES = {torch.float32: 1, torch.float64: 2}
_DTYPE_NAMES = {1: "float32", 2: "float64"}


# section: collectives -------------------------------------------------------------


def _all_gather_rows(row: np.ndarray, group) -> np.ndarray:
    """all_gather a fixed-length float64 row; returns the (ranks, length)
    table in rank order (the same bits on every rank)."""
    send = torch.from_numpy(np.ascontiguousarray(row, dtype=np.float64))
    size = torch.distributed.get_world_size(group)
    received = [torch.empty_like(send) for _ in range(size)]
    torch.distributed.all_gather(received, send, group=group)
    return torch.stack(received).numpy()


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPE_CODES.get(dtype, 0)


def _dtype_name(code: float) -> str:
    return _DTYPE_NAMES.get(int(code), "another dtype")


# section: the module --------------------------------------------------------------


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """``torch.nn.SyncBatchNorm`` for CPU tensors, on fastbn's kernels, over
    ``torch.distributed`` (the gloo backend).

    Same constructor as torch's (``num_features, eps, momentum, affine,
    track_running_stats, process_group, device, dtype``, keyword ``bias``),
    same parameters, buffers and state_dict keys (a state_dict loads both
    ways), same base class (torch's ``_BatchNorm``).  It is deliberately NOT
    a subclass of ``torch.nn.SyncBatchNorm``: ``DistributedDataParallel``
    refuses a CPU model that contains one ("SyncBatchNorm layers only work
    with GPU modules"), and DDP is how these layers are meant to be used.

    Training forward of a CPU float32/float64 tensor (contiguous or
    channels-last) with ``torch.distributed`` initialized and more than one
    rank in `process_group` (None: the default group): the batch statistics
    are those of all ranks' batches together, merged in rank order, so the
    output, the gradients and the running statistics are identical on every
    rank and from run to run.  The running variance is unbiased with the
    GLOBAL count.  Ranks may hold different batch sizes, and a rank may hold
    a batch of 1 (or 0) as long as all ranks together hold at least 2 values
    per channel.

    Collective: every rank of the group must call the layer in the same mode
    and the same number of times, and (when its input requires grad) run
    the backward.  A bad input on any rank (channels, dtype) raises the same
    ValueError on every rank, and a layer whose configuration differs across
    ranks is reported the same way at its first forward.

    No communication in eval mode, without ``torch.distributed``, or with a
    single rank: the layer is then `fastbn.torch.BatchNorm2d` (any input
    rank >= 2; torch's own batch norm for CPU inputs fastbn does not take).
    Non-CPU tensors run torch's SyncBatchNorm forward.

    Gradients as in torch's SyncBatchNorm: dx uses the sums of all ranks;
    ``weight.grad`` and ``bias.grad`` are this rank's share, and DDP's
    all_reduce of the gradients completes them (see the module docstring).
    """

    _fused_relu = False

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, *, bias: bool = True) -> None:
        # torch versions before `bias=` exist: pass it only when it is False
        options = {} if bias else {"bias": False}
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, **options)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:  # noqa: A002
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: Tensor) -> None:  # noqa: A002
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002  (torch's argument name)
        """Normalize `input` (N, C, *); collective in training mode (see the
        class docstring).

        Raises
        ------
        ValueError
            On EVERY rank, with the same message, when any rank's input is
            invalid (channels, dtype) or the ranks' inputs or layers disagree,
            or when all ranks together hold fewer than 2 values per channel.
        """
        if input.device.type != "cpu":
            y = torch.nn.SyncBatchNorm.forward(self, input)
            return torch.relu(y) if self._fused_relu else y
        group = self._sync_group()
        if group is None:
            return _forward(self, input, self._local_torch_forward, self._fused_relu)
        if _ops.channel_axis(input) == 0:
            input = input.contiguous()
        self._agree_on_configuration(group)
        return _SyncBatchNormFunction.apply(input, self.weight, self.bias, self, group)

    # ---- when to synchronize ------------------------------------------------------

    def _sync_group(self):
        """The process group to synchronize over, or None for a local forward
        (eval mode, no torch.distributed, one rank)."""
        if not self.training or not torch.distributed.is_available():
            return None
        if not torch.distributed.is_initialized():
            return None
        group = self.process_group or torch.distributed.group.WORLD
        if torch.distributed.get_world_size(group) <= 1:
            return None
        return group

    def _local_torch_forward(self, x: Tensor) -> Tensor:
        """torch's plain batch norm, for CPU inputs fastbn's kernels do not
        take (torch's SyncBatchNorm.forward rejects CPU tensors when
        torch.distributed is initialized, even with one rank)."""
        return torch.nn.modules.batchnorm._BatchNorm.forward(self, x)

    # ---- the statistics --------------------------------------------------------------

    def _configuration(self) -> list:
        momentum = -1.0 if self.momentum is None else float(self.momentum)
        return [float(self.num_features), float(self.weight is not None),
                float(self.bias is not None), float(self.track_running_stats),
                float(self._fused_relu), float(self.eps), momentum]

    def _agree_on_configuration(self, group) -> None:
        """Once per layer, group and configuration: the ranks built the same
        layer (the forward's message length depends on num_features)."""
        configuration = self._configuration()
        key = (id(group), tuple(configuration))
        if getattr(self, "_agreed_configuration", None) == key:
            return
        table = _all_gather_rows(np.array(configuration), group)
        if not (table == table[0]).all():
            rows = [f"num_features={int(row[0])}, weight={bool(row[1])}, bias={bool(row[2])}, "
                    f"track_running_stats={bool(row[3])}, relu={bool(row[4])}, eps={row[5]!r}, "
                    f"momentum={None if row[6] < 0 else row[6]!r}" for row in table]
            raise_on_disagreement(
                f"{type(self).__name__}: the ranks' layers differ (num_features, affine, bias, "
                f"track_running_stats, eps and momentum must be the same on every rank):", rows)
        # a plain tuple (not the group) keeps the layer deep-copyable and picklable
        self._agreed_configuration = key

    def _check_local_input(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"input: expected at least 2D input (got {x.dim()}D input)")
        if x.shape[1] != self.num_features:
            raise ValueError(f"input: expected {self.num_features} channels (dimension 1), "
                             f"got shape {tuple(x.shape)}")
        if x.dtype not in _DTYPE_CODES:
            raise ValueError(f"input: expected a float32 or float64 tensor, got {x.dtype}")
        for name in ("weight", "bias", "running_mean", "running_var"):
            tensor = getattr(self, name)
            if tensor is not None and (tensor.device.type != "cpu" or tensor.dtype != x.dtype):
                raise ValueError(f"{name}: expected a CPU {x.dtype} tensor like the input, got "
                                 f"{tensor.dtype} on {tensor.device}")

    def _synchronized_forward(self, x: Tensor, group):
        """The training forward over all ranks (the layers agreed): the
        header all_gather (input description, checks, values per channel),
        then the channel-block pipeline (fastbn/distributed/_pipeline.py).
        Returns (y array, axis, mean, invstd, total, backward blocks), the
        statistics float64; updates the running statistics (unbiased
        variance with the global count) and num_batches_tracked."""
        channels = self.num_features
        send = np.zeros(_FORWARD_HEADER)
        send[1:4] = (x.shape[1] if x.dim() >= 2 else -1, _dtype_code(x.dtype), x.dim())
        local_error = None
        try:
            self._check_local_input(x)
            axis = _ops.channel_axis(x)
            _ops.sync_num_threads()
            x_array = _ops._view(x, axis)
            layout = batch_norm_layout(x_array, axis)
            send[4] = layout.n_per_channel
            send[5] = layout.inner > 1
        except Exception as error:  # reported to every rank through the header
            local_error = error
            send[0] = 1
        header = _all_gather_rows(send, group)
        if header[:, 0].any() or not (header[:, 2] == header[0, 2]).all():
            rows = [f"{int(row[1])} channels, {_dtype_name(row[2])}, {int(row[3])}D input"
                    + (" -- rejected by this rank's checks" if row[0] else "") for row in header]
            raise_on_disagreement(
                f"{type(self).__name__}: an input is invalid or the ranks' inputs disagree "
                f"(every rank needs a float32 or float64 CPU input of the layer's dtype with "
                f"{channels} channels on dimension 1):", rows, local_error)
        counts = gathered_counts(header)
        planar = bool(header[:, 5].any())
        max_count = int(counts.max())
        itemsize = x_array.dtype.itemsize
        blocks = plan_blocks(channels, max_count, itemsize, 1, planar)

        def failed(statuses, error):
            raise_on_disagreement(f"{type(self).__name__}: the forward failed on a rank:",
                                  ["failed" if status else "ok" for status in statuses], error)

        y, total, mean, m2, invstd = forward_blocks(
            current_kernels(), x_array, layout, counts, _ops._array_or_none(self.weight),
            _ops._array_or_none(self.bias), self.eps, self._fused_relu, blocks,
            _GroupExchange(group), failed)
        self._update_running_stats(mean, m2 / (total - 1))
        backward_blocks = plan_blocks(channels, max_count, itemsize, 2, planar)
        return y, axis, mean, invstd, total, backward_blocks

    def _update_running_stats(self, mean: np.ndarray, unbiased_var: np.ndarray) -> None:
        """torch's update, ``r = (1 - m) * r + m * stat`` (m = 1 /
        num_batches_tracked after its increment for momentum None), computed in
        float64 and stored; buffers and counter change together."""
        if not self.track_running_stats:
            return
        counter = self.num_batches_tracked
        if self.running_mean is None:
            if counter is not None:
                counter.add_(1)
            return
        if self.momentum is None:
            factor = 1.0 / (int(counter) + 1) if counter is not None else 0.0
        else:
            factor = float(self.momentum)
        with torch.no_grad():
            running_mean = self.running_mean.detach().numpy().astype(np.float64)
            running_var = self.running_var.detach().numpy().astype(np.float64)
            new_mean = torch.from_numpy((1.0 - factor) * running_mean + factor * mean)
            new_var = torch.from_numpy((1.0 - factor) * running_var + factor * unbiased_var)
            self.running_mean.copy_(new_mean)
            self.running_var.copy_(new_var)
            if counter is not None:
                counter.add_(1)

    # ---- conversion ------------------------------------------------------------------

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module,
                               process_group=None) -> torch.nn.Module:
        """`convert_sync_batchnorm`, as a classmethod like torch's."""
        return convert_sync_batchnorm(module, process_group)


class SyncBatchNormReLU(SyncBatchNorm):
    """``relu(SyncBatchNorm(x))`` in one pass over the data, forward and
    backward (what `convert_sync_batchnorm` makes of a
    `fastbn.torch.BatchNormReLU2d` etc.); same parameters and state_dict as
    `SyncBatchNorm`."""

    _fused_relu = True


# section: autograd ----------------------------------------------------------------


class _GroupExchange(Exchange):
    """A blocking ``torch.distributed.all_gather`` of one float64 row per
    rank."""

    def __init__(self, group) -> None:
        self.group = group
        self.size = torch.distributed.get_world_size(group)

    def allgather(self, row: np.ndarray) -> np.ndarray:
        send = torch.from_numpy(row)
        received = [torch.empty_like(send) for _ in range(self.size)]
        torch.distributed.all_gather(received, send, group=self.group)
        return torch.stack(received).numpy()


class _SyncBatchNormFunction(torch.autograd.Function):
    """The synchronized forward (statistics of all ranks, the channel-block
    pipeline); its backward combines the per-channel sums of every rank."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                layer: SyncBatchNorm, group) -> Tensor:
        y_array, axis, mean, invstd, count, blocks = layer._synchronized_forward(x, group)
        y = torch.from_numpy(y_array)
        if axis == -1:
            y = y.movedim(-1, 1)
        ctx.save_for_backward(x, weight, bias)
        ctx.statistics = (mean, invstd, count, blocks)
        ctx.group, ctx.relu, ctx.axis = group, layer._fused_relu, axis
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, bias = ctx.saved_tensors
        mean, invstd, count, blocks = ctx.statistics
        axis = ctx.axis
        _ops.sync_num_threads()
        x_view = _ops._view(x, axis)
        weight_array, bias_array = _ops._array_or_none(weight), _ops._array_or_none(bias)
        relu_from = (weight_array, bias_array) if ctx.relu else None
        layout = batch_norm_layout(x_view, axis)
        local_error = None
        try:
            dy_view = _ops._view(dy, axis)
            if layout.inner > 1:   # the channel-range phases read dy as x: C-contiguous
                dy_view = np.require(dy_view, requirements=("C", "A"))
        except Exception as error:  # e.g. MemoryError: reported to every rank
            if not ctx.needs_input_grad[0]:
                raise  # no collective follows
            local_error = error
            dy_view = None
        dx = None
        if not ctx.needs_input_grad[0]:
            # as torch: no dx needed, no communication; this rank's sums only
            sum_dy, sum_dy_xhat = bn_functional.batch_norm_backward_reduce(
                dy_view, x_view, mean, invstd, axis=axis, relu_from=relu_from)
        else:
            def failed(statuses, error):
                raise_on_disagreement("SyncBatchNorm.backward: the backward failed on a rank:",
                                      ["failed" if status else "ok" for status in statuses],
                                      error)

            dx_array, _, _, sum_dy, sum_dy_xhat = backward_blocks(
                current_kernels(), dy_view, x_view, layout, mean, invstd, weight_array,
                relu_from, count, blocks, _GroupExchange(ctx.group), failed, local_error)
            dx = torch.from_numpy(dx_array)
            if axis == -1:
                dx = dx.movedim(-1, 1)
        # this rank's sums are this rank's share of dbias and dweight
        dweight = (torch.from_numpy(sum_dy_xhat.astype(x_view.dtype))
                   if weight is not None and ctx.needs_input_grad[1] else None)
        dbias = (torch.from_numpy(sum_dy.astype(x_view.dtype))
                 if bias is not None and ctx.needs_input_grad[2] else None)
        return dx, dweight, dbias, None, None


# section: conversion --------------------------------------------------------------

_FUSED_RELU_CLASSES = (BatchNormReLU1d, BatchNormReLU2d, BatchNormReLU3d)


def convert_sync_batchnorm(module: torch.nn.Module, process_group=None) -> torch.nn.Module:
    """Replace every BatchNorm layer of `module` by a `SyncBatchNorm`, as
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does.

    Converted: every ``torch.nn.BatchNorm1d/2d/3d`` (and any other subclass
    of torch's ``_BatchNorm``, e.g. ``torch.nn.SyncBatchNorm`` and
    `fastbn.torch.BatchNorm2d`); `fastbn.torch.BatchNormReLU1d/2d/3d` become
    `SyncBatchNormReLU`.  The new layers share the old ones' parameter and
    buffer TENSORS (an optimizer built on ``model.parameters()`` keeps
    working) and their training flag; hooks on the old layers are not
    carried over (as in torch).

    Parameters
    ----------
    module : torch.nn.Module
        IN-OUT.  Its BatchNorm children are replaced in place.
    process_group : torch.distributed.ProcessGroup or None
        The ranks to synchronize over (None: the default group), stored in
        every new layer.

    Returns
    -------
    torch.nn.Module
        `module`, or the new layer when `module` itself is a BatchNorm layer.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    converted = module
    if (isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
            and not isinstance(module, SyncBatchNorm)):
        converted = _sync_layer_from(module, process_group)
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, process_group))
    return converted


def _sync_layer_from(layer: torch.nn.modules.batchnorm._BatchNorm,
                     process_group) -> SyncBatchNorm:
    cls = SyncBatchNormReLU if isinstance(layer, _FUSED_RELU_CLASSES) else SyncBatchNorm
    # bias=False exists only in newer torch versions: pass it only when needed
    options = {"bias": False} if layer.affine and layer.bias is None else {}
    sync = cls(layer.num_features, layer.eps, layer.momentum, layer.affine,
               layer.track_running_stats, process_group, **options)
    if layer.affine:
        sync.weight = layer.weight
        sync.bias = layer.bias
    sync.running_mean = layer.running_mean
    sync.running_var = layer.running_var
    sync.num_batches_tracked = layer.num_batches_tracked
    sync.training = layer.training
    if hasattr(layer, "qconfig"):
        sync.qconfig = layer.qconfig
    return sync
