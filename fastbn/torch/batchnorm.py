"""Drop-in subclasses of ``torch.nn.BatchNorm1d/2d/3d`` running fastbn's
kernels, and the fused ``BatchNormReLU1d/2d/3d``.

Same constructor, parameters, buffers, state_dict keys and semantics as
torch's classes (``isinstance(m, torch.nn.BatchNorm2d)`` holds); only
``forward`` differs.

Fast path: a CPU float32/float64 input, contiguous or channels-last
(``torch.channels_last``, ``torch.channels_last_3d``, or (N, L, C) storage
of an (N, C, L) tensor), whose module tensors are CPU tensors of the same
dtype, in training or eval, with any momentum (``None`` is torch's
cumulative average) and with or without running statistics.

Fallback: anything else (another device or dtype, other strides, an empty
batch) runs torch's own ``forward`` (plus ``torch.relu`` for the fused
classes), silently.  Double backward works on the fast path too: the
second derivative is computed with torch's operators.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from . import _ops

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
           "BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d"]

_FAST_DTYPES = (torch.float32, torch.float64)


def _fast_path_supported(module: torch.nn.Module, x: Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype not in _FAST_DTYPES or x.numel() == 0:
        return False
    for tensor in (module.weight, module.bias, module.running_mean, module.running_var):
        if tensor is not None and (tensor.device.type != "cpu" or tensor.dtype != x.dtype):
            return False
    if (module.running_mean is None) != (module.running_var is None):
        return False
    return _ops.channel_axis(x) != 0


def _forward(module: torch.nn.Module, x: Tensor, torch_forward: Callable[[Tensor], Tensor],
             relu: bool) -> Tensor:
    """torch's ``_BatchNorm.forward`` logic with fastbn's ops in place of
    ``F.batch_norm``."""
    if not _fast_path_supported(module, x):
        y = torch_forward(x)
        return torch.relu(y) if relu else y
    module._check_input_dim(x)
    momentum = 0.0 if module.momentum is None else module.momentum
    cumulative_count = None
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        if module.momentum is None:
            cumulative_count = module.num_batches_tracked
    batch_stats = module.training or module.running_mean is None
    if not batch_stats:
        return _ops.batch_norm_eval(x, module.running_mean, module.running_var, module.weight,
                                    module.bias, module.eps, relu)
    update = module.training and module.track_running_stats and module.running_mean is not None
    running_mean = module.running_mean if update else None
    running_var = module.running_var if update else None
    y, _, _, new_running_mean, new_running_var = _ops.batch_norm_train(
        x, module.weight, module.bias, running_mean, running_var, momentum, cumulative_count,
        module.eps, relu)
    if update:
        running_mean.copy_(new_running_mean)
        running_var.copy_(new_running_var)
    return y


class BatchNorm1d(torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on fastbn's kernels (see the module docstring
    for the fast path and the fallback)."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002  (torch's argument name)
        return _forward(self, input, super().forward, relu=False)


class BatchNorm2d(torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on fastbn's kernels (see the module docstring
    for the fast path and the fallback)."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        return _forward(self, input, super().forward, relu=False)


class BatchNorm3d(torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on fastbn's kernels (see the module docstring
    for the fast path and the fallback)."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        return _forward(self, input, super().forward, relu=False)


class BatchNormReLU1d(BatchNorm1d):
    """``relu(BatchNorm1d(x))`` in one pass over the data (forward and
    backward); same parameters and state_dict as `BatchNorm1d`."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        return _forward(self, input, super(BatchNorm1d, self).forward, relu=True)


class BatchNormReLU2d(BatchNorm2d):
    """``relu(BatchNorm2d(x))`` in one pass over the data (forward and
    backward); same parameters and state_dict as `BatchNorm2d`."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        return _forward(self, input, super(BatchNorm2d, self).forward, relu=True)


class BatchNormReLU3d(BatchNorm3d):
    """``relu(BatchNorm3d(x))`` in one pass over the data (forward and
    backward); same parameters and state_dict as `BatchNorm3d`."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        return _forward(self, input, super(BatchNorm3d, self).forward, relu=True)
