"""`clip_grad_norm_` for torch parameters on fastbn's fused norm kernel."""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Union

import torch
from torch import Tensor

from ..optim import clip_grad_norm_ as fastbn_clip_grad_norm_
from ..parameter import Parameter
from ._ops import sync_num_threads

__all__ = ["clip_grad_norm_"]


def clip_grad_norm_(parameters: Union[Tensor, Iterable[Tensor]], max_norm: float,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach: Optional[bool] = None) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` with fastbn's multi-tensor kernels.

    Scales the gradients of `parameters` IN PLACE so that their global norm
    is at most `max_norm` (coef = max_norm / (norm + 1e-6) multiplies every
    gradient when it is below 1).  With norm_type 2 or inf and every
    gradient a dense CPU float32/float64 tensor, the norm is computed by
    fastbn's fused kernel on zero-copy NumPy views (accumulated in float64,
    bit-identical for any thread count) and the gradients are scaled in
    place by its fused scale kernel.  Anything else (other norm types,
    devices, dtypes or layouts) calls torch's own function.

    Parameters
    ----------
    parameters : Tensor or iterable of Tensor
        Tensors whose ``.grad`` is clipped; those without one are skipped.
    max_norm : float
    norm_type : float, default 2.0
    error_if_nonfinite : bool, default False
        Raise RuntimeError when the norm is nan or inf (gradients untouched).
    foreach : ignored on the fastbn path (passed on to torch's fallback).

    Returns
    -------
    Tensor
        The total norm before clipping, a 0-d tensor of the gradients' dtype
        (float32 when there are none, as torch).
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    if not _fast_path_applies(grads, norm_type):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type,
                                              error_if_nonfinite=error_if_nonfinite,
                                              foreach=foreach)
    if not grads:
        return torch.tensor(0.0)
    sync_num_threads()
    views = [_gradient_holder(grad) for grad in grads]
    max_norm = float(max_norm)
    norm = fastbn_clip_grad_norm_(views, max_norm, norm_type,
                                  error_if_nonfinite=error_if_nonfinite)
    if max_norm / (norm + 1e-6) < 1:
        # Scaled through NumPy: bump the version counters as grad.mul_ would.
        torch.autograd.graph.increment_version(grads)
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    return torch.tensor(norm, dtype=dtype)


def _fast_path_applies(grads: List[Tensor], norm_type: float) -> bool:
    if norm_type != 2.0 and not math.isinf(norm_type) or norm_type < 0:
        return False
    return all(grad.layout == torch.strided and grad.device.type == "cpu"
               and grad.dtype in (torch.float32, torch.float64) and _dense(grad)
               for grad in grads)


def _dense(tensor: Tensor) -> bool:
    if tensor.is_contiguous():
        return True
    return _storage_ordered(tensor).is_contiguous()


def _storage_ordered(tensor: Tensor) -> Tensor:
    """`tensor` with its dimensions permuted into memory order (a view)."""
    order = sorted(range(tensor.dim()), key=lambda d: (-tensor.stride(d), d))
    return tensor.permute(order)


def _gradient_holder(grad: Tensor) -> Parameter:
    """A fastbn Parameter whose ``grad`` is a zero-copy view of `grad` (the
    norm is order-independent, so a permuted view is as good)."""
    grad = grad.detach()
    array = (grad if grad.is_contiguous() else _storage_ordered(grad)).numpy()
    holder = Parameter(array)
    holder.grad = array
    return holder
