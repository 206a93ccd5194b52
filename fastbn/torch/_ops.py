"""fastbn's batch-norm kernels as torch custom ops (namespace ``fastbn``).

Every op reads its tensor arguments through zero-copy ``tensor.numpy()``
views and writes into fresh tensors allocated here, so outputs never alias
inputs (a requirement of ``torch.library.custom_op``); NumPy allocates them
(see `_new_output`).  The channel axis is
1 for a contiguous tensor and last for a channels-last one (``N,C,H,W``
tensor stored as ``N,H,W,C``: the view ``movedim(1, -1)`` of it is
C-contiguous, so the kernels read it without a copy and write the output in
the same memory format).  Any other strides are read through a strided view
(the kernels copy it once) and produce a contiguous output.

The differentiable ops are functional: ``register_autograd`` only accepts
ops that mutate nothing, so `batch_norm_train` returns the UPDATED running
statistics as new tensors and the caller copies them into its buffers
(``running_mean.copy_(new_running_mean)``, C elements).  torch.compile and
torch.export then see an ordinary buffer mutation.  (Plain eager calls of
the modules skip these ops: `fastbn.torch._eager` runs the same kernels and
updates the buffers in place.)

Ops
---
``fastbn::batch_norm_train(x, weight, bias, running_mean, running_var,
momentum, num_batches_tracked, eps, relu) -> (y, saved_mean, saved_invstd,
new_running_mean, new_running_var)``
    Batch statistics.  Without running statistics the last two outputs are
    empty.  When `num_batches_tracked` is given (torch's ``momentum=None``),
    the averaging factor is ``1 / num_batches_tracked`` (already
    incremented), read inside the op so that compiled graphs stay whole.
``fastbn::batch_norm_eval(x, running_mean, running_var, weight, bias, eps,
relu) -> y``
    Running statistics.
``fastbn::batch_norm_backward(dy, x, saved_mean, saved_invstd, weight, bias,
eps, relu) -> (dx, dweight, dbias)``
``fastbn::batch_norm_backward_eval(dy, x, running_mean, running_var, weight,
bias, eps, relu) -> (dx, dweight, dbias)``
    The gradients.  Their own backward (double backward, e.g. gradient
    penalties) recomputes the forward with torch's operators and
    differentiates that, so second derivatives are exact but take torch's
    speed.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import functional as bn_functional
from .. import _output_cache
from .._bn_validation import check_running_stats_apart as check_stats_apart
from .._config import _follow_num_threads, get_user_num_threads

__all__ = ["batch_norm_train", "batch_norm_eval", "batch_norm_backward",
           "batch_norm_backward_eval", "channel_axis", "sync_num_threads"]


# section: threads -----------------------------------------------------------------

def sync_num_threads() -> None:
    """Make fastbn's kernels use ``torch.get_num_threads()`` threads, unless
    the user chose a count with `fastbn.set_num_threads` (then theirs wins).

    Called by every op, so ``torch.set_num_threads`` later on is followed too.
    """
    if get_user_num_threads() is None:
        _follow_num_threads(torch.get_num_threads())


# section: layouts ------------------------------------------------------------------


def channel_axis(x: Tensor) -> int:
    """1 for a contiguous tensor, -1 for a channels-last one (the channel
    dimension stored innermost), 0 for anything else."""
    if x.dim() <= 2:
        return 1 if x.is_contiguous() else 0
    if x.is_contiguous():
        return 1
    if x.movedim(1, -1).is_contiguous():
        return -1
    return 0


def _view(tensor: Tensor, axis: int) -> np.ndarray:
    """A zero-copy NumPy view with the channel axis at `axis` (1 or -1)."""
    tensor = tensor.detach()
    if axis == -1:
        tensor = tensor.movedim(1, -1)
    return tensor.numpy()


def _empty_like_input(x: Tensor, axis: int) -> Tensor:
    """A fresh tensor shaped as x, channels-last when x is (fake kernels)."""
    if axis == -1:
        return torch.empty(x.movedim(1, -1).shape, dtype=x.dtype, device=x.device).movedim(-1, 1)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _new_output(x: Tensor, axis: int, *others: Tensor) -> Tuple[Tensor, np.ndarray]:
    """The real kernels' output: a fresh tensor laid out as `_empty_like_input`
    says, and its NumPy view with the channel axis at `axis`, placed clear
    of x and `others` (the other inputs the kernel reads alongside it)
    modulo 4 KiB (see `_output_cache.ALIAS_AHEAD`).

    Its memory is NumPy's, which asks the kernel for transparent huge pages
    on large arrays (a fresh 100 MB torch.empty costs about 5x more in page
    faults on its first write than the whole batch-norm kernel), and large
    outputs come from `_output_cache`, which reuses the buffers of outputs
    that are gone instead of faulting new memory in at every call.
    """
    shape = x.movedim(1, -1).shape if axis == -1 else x.shape
    array = _output_cache.new_array(shape, _NUMPY_DTYPE[x.dtype],
                                    tuple(t.data_ptr() for t in (x, *others)))
    tensor = torch.from_numpy(array)
    return (tensor.movedim(-1, 1) if axis == -1 else tensor), array


_NUMPY_DTYPE = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


def _array_or_none(tensor: Optional[Tensor]) -> Optional[np.ndarray]:
    return None if tensor is None else tensor.detach().numpy()


def _kernel_axis(x: Tensor) -> int:
    return -1 if channel_axis(x) == -1 else 1


def check_running_stats_apart(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                              running_mean: Tensor, running_var: Tensor) -> None:
    """Raise the ValueError of the kernels' own validation (the eager path's
    error) when running statistics about to be updated share memory with
    each other or with x, weight or bias.  Real CPU tensors only.

    The train op updates clones of the statistics, so without this check
    ``running_mean is running_var`` would run and the caller's two
    ``copy_`` calls would leave both buffers holding the variance."""
    check_stats_apart(running_mean.detach().numpy(), running_var.detach().numpy(),
                      x.detach().numpy(), _array_or_none(weight), _array_or_none(bias))


# section: forward ops --------------------------------------------------------------


@torch.library.custom_op("fastbn::batch_norm_train", mutates_args=(), device_types="cpu")
def batch_norm_train(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     running_mean: Optional[Tensor], running_var: Optional[Tensor],
                     momentum: float, num_batches_tracked: Optional[Tensor], eps: float,
                     relu: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if running_mean is not None:
        check_running_stats_apart(x, weight, bias, running_mean, running_var)
    sync_num_threads()
    axis = _kernel_axis(x)
    y, y_array = _new_output(x, axis)
    if running_mean is not None:
        new_running_mean = running_mean.detach().clone()
        new_running_var = running_var.detach().clone()
        if num_batches_tracked is not None:
            momentum = 1.0 / float(num_batches_tracked.item())
        stats = dict(running_mean=new_running_mean.numpy(), running_var=new_running_var.numpy(),
                     momentum=momentum)
    else:
        new_running_mean = x.new_empty(0)
        new_running_var = x.new_empty(0)
        stats = {}
    forward = (bn_functional.batch_norm_relu_forward_train if relu
               else bn_functional.batch_norm_forward_train)
    _, saved_mean, saved_invstd = forward(_view(x, axis), _array_or_none(weight),
                                          _array_or_none(bias), eps, axis=axis,
                                          out=y_array, **stats)
    return (y, torch.from_numpy(saved_mean), torch.from_numpy(saved_invstd), new_running_mean,
            new_running_var)


@batch_norm_train.register_fake
def _batch_norm_train_fake(x, weight, bias, running_mean, running_var, momentum,
                           num_batches_tracked, eps, relu):
    channels = x.shape[1]
    stats = 0 if running_mean is None else channels
    return (_empty_like_input(x, _kernel_axis(x)), x.new_empty(channels), x.new_empty(channels),
            x.new_empty(stats), x.new_empty(stats))


@torch.library.custom_op("fastbn::batch_norm_eval", mutates_args=(), device_types="cpu")
def batch_norm_eval(x: Tensor, running_mean: Tensor, running_var: Tensor,
                    weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                    relu: bool) -> Tensor:
    sync_num_threads()
    axis = _kernel_axis(x)
    y, y_array = _new_output(x, axis)
    forward = bn_functional.batch_norm_relu if relu else bn_functional.batch_norm
    forward(_view(x, axis), running_mean.detach().numpy(), running_var.detach().numpy(),
            _array_or_none(weight), _array_or_none(bias), False, 0.0, eps, axis=axis,
            out=y_array)
    return y


@batch_norm_eval.register_fake
def _batch_norm_eval_fake(x, running_mean, running_var, weight, bias, eps, relu):
    return _empty_like_input(x, _kernel_axis(x))


# section: backward ops -------------------------------------------------------------


def _run_backward(function, dy: Tensor, x: Tensor, stat_a: Tensor, stat_b: Tensor,
                  weight: Optional[Tensor], bias: Optional[Tensor], extra: tuple, relu: bool
                  ) -> Tuple[Tensor, Tensor, Tensor]:
    sync_num_threads()
    axis = _kernel_axis(x)
    dx, dx_array = _new_output(x, axis, dy)
    arguments = (_view(dy, axis), _view(x, axis), stat_a.detach().numpy(),
                 stat_b.detach().numpy(), _array_or_none(weight))
    if relu:
        arguments += (_array_or_none(bias),)
    _, dweight, dbias = function(*arguments, *extra, axis=axis, out=dx_array)
    return dx, torch.from_numpy(dweight), torch.from_numpy(dbias)


@torch.library.custom_op("fastbn::batch_norm_backward", mutates_args=(), device_types="cpu")
def batch_norm_backward(dy: Tensor, x: Tensor, saved_mean: Tensor, saved_invstd: Tensor,
                        weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                        relu: bool) -> Tuple[Tensor, Tensor, Tensor]:
    function = (bn_functional.batch_norm_relu_backward if relu
                else bn_functional.batch_norm_backward)
    return _run_backward(function, dy, x, saved_mean, saved_invstd, weight, bias, (), relu)


@torch.library.custom_op("fastbn::batch_norm_backward_eval", mutates_args=(), device_types="cpu")
def batch_norm_backward_eval(dy: Tensor, x: Tensor, running_mean: Tensor, running_var: Tensor,
                             weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                             relu: bool) -> Tuple[Tensor, Tensor, Tensor]:
    function = (bn_functional.batch_norm_relu_backward_eval if relu
                else bn_functional.batch_norm_backward_eval)
    return _run_backward(function, dy, x, running_mean, running_var, weight, bias, (eps,), relu)


def _backward_fake(dy, x, stat_a, stat_b, weight, bias, eps, relu):
    channels = x.shape[1]
    return (_empty_like_input(x, _kernel_axis(x)), x.new_empty(channels),
            x.new_empty(channels))


batch_norm_backward.register_fake(_backward_fake)
batch_norm_backward_eval.register_fake(_backward_fake)


# section: autograd -----------------------------------------------------------------


def _parameter_grads(ctx, dweight: Tensor, dbias: Tensor, weight, bias):
    return (dweight if weight is not None and ctx.needs_input_grad[1] else None,
            dbias if bias is not None and ctx.needs_input_grad[2] else None)


def _train_setup_context(ctx, inputs, output):
    x, weight, bias, _, _, _, _, eps, relu = inputs
    _, saved_mean, saved_invstd, new_running_mean, new_running_var = output
    ctx.save_for_backward(x, weight, bias, saved_mean, saved_invstd)
    ctx.eps, ctx.relu = eps, relu
    ctx.mark_non_differentiable(saved_mean, saved_invstd, new_running_mean, new_running_var)


def _train_backward(ctx, dy, *unused_grads):
    x, weight, bias, saved_mean, saved_invstd = ctx.saved_tensors
    dx, dweight, dbias = torch.ops.fastbn.batch_norm_backward(
        dy, x, saved_mean, saved_invstd, weight, bias, ctx.eps, ctx.relu)
    return (dx if ctx.needs_input_grad[0] else None,
            *_parameter_grads(ctx, dweight, dbias, weight, bias),
            None, None, None, None, None, None)


def _eval_setup_context(ctx, inputs, output):
    x, running_mean, running_var, weight, bias, eps, relu = inputs
    ctx.save_for_backward(x, running_mean, running_var, weight, bias)
    ctx.eps, ctx.relu = eps, relu


def _eval_backward(ctx, dy):
    x, running_mean, running_var, weight, bias = ctx.saved_tensors
    dx, dweight, dbias = torch.ops.fastbn.batch_norm_backward_eval(
        dy, x, running_mean, running_var, weight, bias, ctx.eps, ctx.relu)
    dweight, dbias = (dweight if weight is not None and ctx.needs_input_grad[3] else None,
                      dbias if bias is not None and ctx.needs_input_grad[4] else None)
    return dx if ctx.needs_input_grad[0] else None, None, None, dweight, dbias, None, None


batch_norm_train.register_autograd(_train_backward, setup_context=_train_setup_context)
batch_norm_eval.register_autograd(_eval_backward, setup_context=_eval_setup_context)


# section: double backward (torch's operators) --------------------------------------


def _torch_forward(x, weight, bias, running_mean, running_var, eps, relu):
    """The forward again in torch operators; running statistics None means
    batch statistics (whose dependence on x the second derivative needs)."""
    y = torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias,
                                       training=running_mean is None, eps=eps)
    return torch.relu(y) if relu else y


def _make_double_backward(uses_running_stats: bool):
    def setup_context(ctx, inputs, output):
        dy, x, stat_a, stat_b, weight, bias, eps, relu = inputs
        ctx.save_for_backward(dy, x, stat_a, stat_b, weight, bias)
        ctx.eps, ctx.relu = eps, relu

    def backward(ctx, grad_dx, grad_dweight, grad_dbias):
        dy, x, stat_a, stat_b, weight, bias = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() if t is not None else None
                      for t in (dy, x, weight, bias)]
            dy_leaf, x_leaf, weight_leaf, bias_leaf = leaves
            running = (stat_a.detach(), stat_b.detach()) if uses_running_stats else (None, None)
            y = _torch_forward(x_leaf, weight_leaf, bias_leaf, *running, ctx.eps, ctx.relu)
            targets = [t for t in (x_leaf, weight_leaf, bias_leaf) if t is not None]
            first = torch.autograd.grad(y, targets, dy_leaf, create_graph=True)
            outer = [grad_dx, grad_dweight, grad_dbias][:1] + (
                [grad_dweight] if weight is not None else []) + (
                [grad_dbias] if bias is not None else [])
            inputs = [leaf for leaf in leaves if leaf is not None]
            second = torch.autograd.grad(first, inputs, outer, allow_unused=True,
                                         materialize_grads=True)
        grads = iter(second)
        dy_grad, x_grad = next(grads), next(grads)
        weight_grad = next(grads) if weight is not None else None
        bias_grad = next(grads) if bias is not None else None
        return dy_grad, x_grad, None, None, weight_grad, bias_grad, None, None

    return backward, setup_context


for _op, _uses_running_stats in ((batch_norm_backward, False), (batch_norm_backward_eval, True)):
    _backward_fn, _setup_context_fn = _make_double_backward(_uses_running_stats)
    _op.register_autograd(_backward_fn, setup_context=_setup_context_fn)
