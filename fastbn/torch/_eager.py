"""The eager fast path of the BatchNorm modules: the same kernels as the
custom ops in `fastbn.torch._ops`, called through plain
``torch.autograd.Function`` classes.

Why: a ``torch.library.custom_op`` call costs tens of microseconds in eager
mode (dispatcher, schema defaults, autograd wrapper, its Python frames),
more than the whole kernel on a small batch, and the functional train op
returns new running statistics that the module then copies into its
buffers.  Here the kernels update the running buffers in place through
NumPy views of them, the outputs are allocated once, and backward saves
only x, weight and bias (plus the per-channel mean and invstd as NumPy
arrays).

Which path runs is decided by `eager_allowed`: the custom ops whenever
something other than plain eager autograd looks at the call (torch.compile,
torch.export, fake tensors, a Python dispatch mode, functorch transforms, jit
tracing), so those keep seeing ``torch.ops.fastbn.*``.  Both paths run the
same fastbn.functional calls on the same views with the same scalars, so
their results are bit-identical; the only difference is when
``num_batches_tracked`` is incremented: here after the kernel succeeded (a
failing call changes no state), in the custom-op path before it (torch's
order, which a compiled graph keeps).

Double backward (``create_graph=True``) goes through the differentiable
backward custom ops, as on the custom-op path.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .. import functional as bn_functional
from . import _ops

__all__ = ["eager_allowed", "train_forward", "eval_forward"]

_PLAIN_TYPES = (Tensor, torch.nn.Parameter)
_is_compiling = torch.compiler.is_compiling
_dispatch_stack_length = torch._C._len_torch_dispatch_stack
_functorch_active = torch._C._are_functorch_transforms_active
_tracing_state = torch._C._get_tracing_state
_increment_version = torch._C._increment_version


_unwrap_if_dead = getattr(torch._C._functorch, "unwrap_if_dead", None)


def _unwrap_dead(tensor: Optional[Tensor]) -> Optional[Tensor]:
    """A tensor that escaped a finished functorch transform, unwrapped (what
    ``Function.apply`` does to its arguments)."""
    if tensor is None or _unwrap_if_dead is None:
        return tensor
    return _unwrap_if_dead(tensor)


def _bare_apply(cls: type):
    """``cls.apply`` without ``Function.apply``'s Python wrapper, which
    costs about as much as the C ``apply`` itself on a small batch; the
    wrapper only binds default arguments (these classes have none to bind)
    and handles functorch, which `eager_allowed` has ruled out (dead
    functorch wrappers are unwrapped by the callers, as the wrapper does)."""
    try:
        return torch._C._FunctionBase.__dict__["apply"].__get__(None, cls)
    except (AttributeError, KeyError, TypeError):  # pragma: no cover - other torch versions
        return cls.apply


def eager_allowed(x: Tensor, *tensors: Optional[Tensor]) -> bool:
    """True when the call is plain eager PyTorch: not compiling or exporting
    (checked first, so dynamo traces nothing after it), no Python dispatch
    mode (FakeTensorMode, proxy tracing, FlopCounterMode, ...), no functorch
    transform (vmap, grad, functionalize), no ``torch.jit.trace``, and only
    plain tensors (no subclasses such as FakeTensor)."""
    if _is_compiling():
        return False
    if _dispatch_stack_length() or _functorch_active() or _tracing_state() is not None:
        return False
    if type(x) not in _PLAIN_TYPES:
        return False
    for tensor in tensors:
        if tensor is not None and type(tensor) not in _PLAIN_TYPES:
            return False
    return True


def _array(tensor: Optional[Tensor]) -> Optional[np.ndarray]:
    return None if tensor is None else tensor.detach().numpy()


def _needs_graph(*tensors: Optional[Tensor]) -> bool:
    if not torch.is_grad_enabled():
        return False
    for tensor in tensors:
        if tensor is not None and tensor.requires_grad:
            return True
    return False


# section: training (batch statistics) ----------------------------------------------


def _run_train(x: Tensor, weight, bias, running_mean, running_var, momentum: float,
               eps: float, relu: bool, axis: int):
    """The kernel call of `fastbn::batch_norm_train`, with the running
    statistics (when given) updated in place."""
    _ops.sync_num_threads()
    y, y_array = _ops._new_output(x, axis)
    stats = {}
    if running_mean is not None:
        stats = dict(running_mean=running_mean.numpy(), running_var=running_var.numpy(),
                     momentum=momentum)
    forward = (bn_functional.batch_norm_relu_forward_train if relu
               else bn_functional.batch_norm_forward_train)
    _, mean, invstd = forward(_ops._view(x, axis), _array(weight), _array(bias), eps, axis=axis,
                              out=y_array, **stats)
    if running_mean is not None:
        # written through NumPy: tell autograd (a graph that saved them must notice)
        _increment_version([running_mean, running_var])  # a list: a tensor would be unbound
    return y, mean, invstd


# named after the op it stands for: grad_fn is EagerFor_fastbn_batch_norm_trainBackward
# (the custom op's is GeneratedBackwardFor_fastbn_batch_norm_train_defaultBackward)
class EagerFor_fastbn_batch_norm_train(torch.autograd.Function):  # noqa: N801
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, relu, axis):
        y, mean, invstd = _run_train(x, weight, bias, running_mean, running_var, momentum, eps,
                                     relu, axis)
        ctx.save_for_backward(x, weight, bias)
        ctx.mean, ctx.invstd, ctx.eps, ctx.relu, ctx.axis = mean, invstd, eps, relu, axis
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        if _needs_graph(dy, x, weight, bias):
            dx, dweight, dbias = torch.ops.fastbn.batch_norm_backward(
                dy, x, torch.from_numpy(ctx.mean), torch.from_numpy(ctx.invstd), weight, bias,
                ctx.eps, ctx.relu)
        else:
            dx, dweight, dbias = _run_backward(dy, x, ctx.mean, ctx.invstd, weight, bias, (),
                                               ctx.relu, ctx.axis, False)
        # dweight and dbias go back to autograd rather than into weight.grad
        # (fastbn.functional's dweight_out=/accumulate= could write there):
        # autograd.grad(loss, [weight]) must leave .grad alone, tensor and
        # post-accumulate hooks (DDP's bucketing among them) must see the
        # gradient, and a parametrized weight is not the leaf.  The cost is
        # AccumulateGrad's: it adopts these tensors without a copy when .grad
        # is None and adds C elements otherwise.
        needs = ctx.needs_input_grad
        return (dx if needs[0] else None,
                dweight if weight is not None and needs[1] else None,
                dbias if bias is not None and needs[2] else None,
                None, None, None, None, None, None)


_train_apply = _bare_apply(EagerFor_fastbn_batch_norm_train)


def train_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  momentum: float, eps: float, relu: bool) -> Tensor:
    """Batch-statistics forward; running statistics (both or neither)
    updated in place with `momentum`."""
    axis = _ops._kernel_axis(x)
    if _needs_graph(x, weight, bias):
        return _train_apply(_unwrap_dead(x), _unwrap_dead(weight), _unwrap_dead(bias),
                            running_mean, running_var, momentum, eps, relu, axis)
    return _run_train(x, weight, bias, running_mean, running_var, momentum, eps, relu, axis)[0]


# section: eval (running statistics) -------------------------------------------------


def _run_eval(x, running_mean, running_var, weight, bias, eps, relu, axis):
    _ops.sync_num_threads()
    y, y_array = _ops._new_output(x, axis)
    forward = bn_functional.batch_norm_relu if relu else bn_functional.batch_norm
    forward(_ops._view(x, axis), running_mean.detach().numpy(), running_var.detach().numpy(),
            _array(weight), _array(bias), False, 0.0, eps, axis=axis, out=y_array)
    return y


class EagerFor_fastbn_batch_norm_eval(torch.autograd.Function):  # noqa: N801
    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, eps, relu, axis):
        ctx.save_for_backward(x, running_mean, running_var, weight, bias)
        ctx.eps, ctx.relu, ctx.axis = eps, relu, axis
        return _run_eval(x, running_mean, running_var, weight, bias, eps, relu, axis)

    @staticmethod
    def backward(ctx, dy):
        x, running_mean, running_var, weight, bias = ctx.saved_tensors
        if _needs_graph(dy, x, weight, bias):
            dx, dweight, dbias = torch.ops.fastbn.batch_norm_backward_eval(
                dy, x, running_mean, running_var, weight, bias, ctx.eps, ctx.relu)
        else:
            dx, dweight, dbias = _run_backward(dy, x, running_mean.numpy(),
                                               running_var.numpy(), weight, bias, (ctx.eps,),
                                               ctx.relu, ctx.axis, True)
        needs = ctx.needs_input_grad
        return (dx if needs[0] else None, None, None,
                dweight if weight is not None and needs[3] else None,
                dbias if bias is not None and needs[4] else None,
                None, None, None)


_eval_apply = _bare_apply(EagerFor_fastbn_batch_norm_eval)


def eval_forward(x: Tensor, running_mean: Tensor, running_var: Tensor,
                 weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                 relu: bool) -> Tensor:
    """Running-statistics forward."""
    axis = _ops._kernel_axis(x)
    if _needs_graph(x, weight, bias):
        return _eval_apply(_unwrap_dead(x), running_mean, running_var, _unwrap_dead(weight),
                           _unwrap_dead(bias), eps, relu, axis)
    return _run_eval(x, running_mean, running_var, weight, bias, eps, relu, axis)


# section: backward ------------------------------------------------------------------


def _run_backward(dy: Tensor, x: Tensor, stat_a: np.ndarray, stat_b: np.ndarray, weight, bias,
                  extra: tuple, relu: bool, axis: int, eval_mode: bool):
    """The kernel call of `fastbn::batch_norm_backward` (``eval_mode``:
    ``batch_norm_backward_eval``, `extra` = (eps,))."""
    _ops.sync_num_threads()
    dx, dx_array = _ops._new_output(x, axis, dy)
    if eval_mode:
        function = (bn_functional.batch_norm_relu_backward_eval if relu
                    else bn_functional.batch_norm_backward_eval)
    else:
        function = (bn_functional.batch_norm_relu_backward if relu
                    else bn_functional.batch_norm_backward)
    arguments = (_ops._view(dy, axis), _ops._view(x, axis), stat_a, stat_b, _array(weight))
    if relu:
        arguments += (_array(bias),)
    _, dweight, dbias = function(*arguments, *extra, axis=axis, out=dx_array)
    return dx, torch.from_numpy(dweight), torch.from_numpy(dbias)
