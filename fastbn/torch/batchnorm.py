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

Eager calls (no torch.compile/export, fake tensors, dispatch modes or
functorch transforms) run the kernels through `fastbn.torch._eager`, which
updates the running buffers in place and skips the custom-op dispatch
(tens of microseconds per call); everything else goes through the
``torch.ops.fastbn`` custom ops.  Both give bit-identical results.

Fallback: anything else (another device or dtype, other strides, an empty
batch) runs torch's own ``forward`` (plus ``torch.relu`` for the fused
classes), silently.  Double backward works on the fast path too: the
second derivative is computed with torch's operators.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import _eager, _ops
from ._eager import eager_allowed

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
           "BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d"]

_FAST_DTYPES = (torch.float32, torch.float64)
# False sends eager calls through the custom ops too (tests compare the paths)
_EAGER_FAST_PATH = True


def _fast_path_supported(module: torch.nn.Module, x: Tensor, weight: Optional[Tensor],
                         bias: Optional[Tensor], running_mean: Optional[Tensor],
                         running_var: Optional[Tensor]) -> bool:
    dtype = x.dtype
    if (dtype is not torch.float32 and dtype is not torch.float64) or not x.is_cpu \
            or x.numel() == 0:
        return False
    for tensor in (weight, bias, running_mean, running_var):
        if tensor is not None and (tensor.dtype is not dtype or not tensor.is_cpu):
            return False
    if (running_mean is None) != (running_var is None):
        return False
    return _ops.channel_axis(x) != 0


_TENSOR_NAMES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _module_tensors(module: torch.nn.Module) -> tuple:
    """weight, bias, running_mean, running_var, num_batches_tracked, read
    from the module's parameter and buffer dicts (``nn.Module.__getattr__``
    costs about 1 us per lookup); a name found in neither (e.g. a
    parametrized weight, a property) is read as an attribute, as is every
    name while torch.compile traces (dynamo's module handling stays as for
    torch's own modules)."""
    if torch.compiler.is_compiling():
        return tuple(getattr(module, name, None) for name in _TENSOR_NAMES)
    parameters, buffers = module._parameters, module._buffers
    tensors = []
    for name in _TENSOR_NAMES:
        if name in parameters:
            tensors.append(parameters[name])
        elif name in buffers:
            tensors.append(buffers[name])
        else:
            tensors.append(getattr(module, name, None))
    return tuple(tensors)


def _forward(module: torch.nn.Module, x: Tensor, torch_forward: Callable[[Tensor], Tensor],
             relu: bool) -> Tensor:
    """torch's ``_BatchNorm.forward`` logic with fastbn's kernels in place of
    ``F.batch_norm``: in plain eager mode through `_eager` (running buffers
    updated in place), otherwise (compile, export, fake tensors, dispatch
    modes, functorch) through the ``torch.ops.fastbn`` custom ops."""
    weight, bias, running_mean, running_var, counter = _module_tensors(module)
    if not _fast_path_supported(module, x, weight, bias, running_mean, running_var):
        y = torch_forward(x)
        return torch.relu(y) if relu else y
    module._check_input_dim(x)
    training = module.training
    batch_stats = training or running_mean is None
    update = training and module.track_running_stats and running_mean is not None
    if _EAGER_FAST_PATH and eager_allowed(x, weight, bias, running_mean, running_var, counter) \
            and (not update or (running_mean.is_contiguous() and running_var.is_contiguous())):
        if not batch_stats:
            return _eager.eval_forward(x, running_mean, running_var, weight, bias, module.eps,
                                       relu)
        momentum = 0.0
        if update:
            momentum = module.momentum
            if momentum is None:  # cumulative average over the batches, this one included
                momentum = 1.0 / float(counter.item() + 1) if counter is not None else 0.0
        y = _eager.train_forward(x, weight, bias, running_mean if update else None,
                                 running_var if update else None, momentum, module.eps, relu)
        # after the kernel: a call that raised has changed no state
        if training and module.track_running_stats and counter is not None:
            counter.add_(1)
        return y
    if update and eager_allowed(x, weight, bias, running_mean, running_var):
        # before the counter moves (a refused call changes no state); the op
        # checks again when it runs (compiled graphs), after the counter
        _ops.check_running_stats_apart(x, weight, bias, running_mean, running_var)
    momentum = 0.0 if module.momentum is None else module.momentum
    cumulative_count = None
    if training and module.track_running_stats and counter is not None:
        counter.add_(1)
        if module.momentum is None:
            cumulative_count = counter
    if not batch_stats:
        return _ops.batch_norm_eval(x, running_mean, running_var, weight, bias, module.eps,
                                    relu)
    y, _, _, new_running_mean, new_running_var = _ops.batch_norm_train(
        x, weight, bias, running_mean if update else None, running_var if update else None,
        momentum, cumulative_count, module.eps, relu)
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
