"""Gradient clipping by global norm (torch.nn.utils.clip_grad_norm_)."""
from __future__ import annotations

import math
from typing import Iterable, List, Union

import numpy as np

from .._backend import current_kernels
from .._validation import check_real, describe
from ..parameter import Parameter
from ._bf16 import is_bfloat16

__all__ = ["clip_grad_norm_"]


def clip_grad_norm_(parameters: Union[Parameter, Iterable[Parameter]], max_norm: float,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False) -> float:
    """Scale the gradients of `parameters` in place so their global norm is at
    most `max_norm`.

    norm = sqrt(sum over every gradient element of g**2) (norm_type 2) or
    max |g| (norm_type inf), accumulated in float64 over fixed chunks in a
    fixed order (bit-identical for any thread count); coef = max_norm /
    (norm + 1e-6) multiplies every gradient when coef < 1.  Parameters
    without a gradient are skipped.  bfloat16 gradients (ml_dtypes) count
    with their exact float32 values (as float32 gradients would) and are
    scaled in float32, each product rounded back to bfloat16 to nearest-even.

    Parameters
    ----------
    parameters : Parameter or iterable of Parameter
        Their ``.grad`` arrays (float32, float64 or bfloat16) are modified
        IN PLACE.
    max_norm : float
    norm_type : float, default 2.0
        2.0 or inf.
    error_if_nonfinite : bool, default False
        Raise RuntimeError when the norm is nan or inf (gradients untouched).

    Returns
    -------
    float
        The norm before clipping.
    """
    if isinstance(parameters, Parameter):
        parameters = [parameters]
    max_norm = check_real(max_norm, "max_norm")
    norm_type = check_real(norm_type, "norm_type")
    if norm_type != 2.0 and not math.isinf(norm_type):
        raise ValueError(f"norm_type: expected 2.0 or inf, got {norm_type!r}")
    grads = _collect_grads(parameters)
    # bfloat16 gradients take part as float32 copies (widening is exact),
    # in their place in the list, so the chunk order is the float32 one
    widened = [grad.astype(np.float32) if is_bfloat16(grad.dtype) else grad for grad in grads]
    kernels = current_kernels()
    norm = kernels.grad_norm(widened, math.isinf(norm_type))
    if error_if_nonfinite and not math.isfinite(norm):
        raise RuntimeError(f"clip_grad_norm_: the total norm of order {norm_type} of the gradients "
                           f"is non-finite ({norm}), so it cannot be clipped")
    coef = max_norm / (norm + 1e-6)
    if coef < 1:
        kernels.scale_grads([grad for grad in grads if not is_bfloat16(grad.dtype)], coef)
        for grad in grads:
            if is_bfloat16(grad.dtype):
                # widened from its current values, one listed entry at a
                # time: a gradient listed twice is scaled twice, as a float32
                # one is; ml_dtypes' float32 -> bfloat16 cast rounds to
                # nearest-even
                scaled = grad.astype(np.float32)
                kernels.scale_grads([scaled], coef)
                grad[...] = scaled.astype(grad.dtype)
    return norm


def _collect_grads(parameters: Iterable[Parameter]) -> List[np.ndarray]:
    grads = []
    for position, param in enumerate(parameters):
        if not isinstance(param, Parameter):
            raise TypeError(f"parameters[{position}]: expected a fastbn.Parameter, got {describe(param)}")
        grad = param.grad
        if grad is None:
            continue
        name = f"parameters[{position}].grad"
        if not isinstance(grad, np.ndarray) or not (grad.dtype in (np.float32, np.float64)
                                                    or is_bfloat16(grad.dtype)):
            raise TypeError(f"{name}: expected a float32, float64 or bfloat16 numpy.ndarray, "
                            f"got {describe(grad)}")
        if not (grad.flags.c_contiguous and grad.flags.writeable):
            raise ValueError(f"{name}: expected a writeable C-contiguous array (scaled in place)")
        grads.append(grad)
    return grads
