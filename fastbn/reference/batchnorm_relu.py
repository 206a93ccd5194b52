"""Reference for the fused batch norm + ReLU: literally batch norm, then ReLU
(the oracle the fused kernels are tested against).

ReLU follows torch: ``max(y, 0)`` with NaN passed through, and no gradient
where the pre-activation is <= 0 (or NaN).  The backward takes the forward's
`weight` AND `bias` because it recomputes the pre-activation from `x` to
find the ReLU mask (the fused kernel does the same instead of storing it).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .._bn_validation import (batch_norm_layout, check_eps, check_input, check_like,
                              check_saved_stat)
from .._validation import check_channel_vector, check_out
from .batchnorm import (_normalize, batch_norm, batch_norm_backward, batch_norm_backward_eval,
                        batch_norm_forward_train)


def _relu_in_place(y: np.ndarray) -> np.ndarray:
    # np.maximum propagates NaN, as torch.relu does
    return np.maximum(y, y.dtype.type(0), out=y)


def batch_norm_relu(x: np.ndarray, running_mean: Optional[np.ndarray],
                    running_var: Optional[np.ndarray], weight: Optional[np.ndarray] = None,
                    bias: Optional[np.ndarray] = None, training: bool = False,
                    momentum: Optional[float] = 0.1, eps: float = 1e-5, *, axis: int = 1,
                    out: Optional[np.ndarray] = None) -> np.ndarray:
    """Reference for `fastbn.functional.batch_norm_relu`."""
    y = batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps,
                   axis=axis, out=out)
    return _relu_in_place(y)


def batch_norm_relu_forward_train(x: np.ndarray, weight: Optional[np.ndarray] = None,
                                  bias: Optional[np.ndarray] = None, eps: float = 1e-5, *,
                                  axis: int = 1, out: Optional[np.ndarray] = None,
                                  running_mean: Optional[np.ndarray] = None,
                                  running_var: Optional[np.ndarray] = None,
                                  momentum: float = 0.1
                                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference for `fastbn.functional.batch_norm_relu_forward_train`."""
    y, mean, invstd = batch_norm_forward_train(x, weight, bias, eps, axis=axis, out=out,
                                               running_mean=running_mean,
                                               running_var=running_var, momentum=momentum)
    return _relu_in_place(y), mean, invstd


def _check_backward_inputs(dy, x, stat_a, stat_b, weight, bias, axis, names, eps=None):
    """The backward's validation, in the fast path's order."""
    x = check_input(x, "x")
    layout = batch_norm_layout(x, axis, "x")
    dy = check_like("dy", dy, x, "x")
    if eps is not None:
        eps = check_eps(eps, batch_stats=False)
    stat_a = check_saved_stat(names[0], stat_a, layout, x.dtype)
    stat_b = check_saved_stat(names[1], stat_b, layout, x.dtype)
    weight = check_channel_vector("weight", weight, layout.channels, x.dtype)
    bias = check_channel_vector("bias", bias, layout.channels, x.dtype)
    return dy, x, layout, stat_a, stat_b, weight, bias, eps


def batch_norm_relu_backward(dy: np.ndarray, x: np.ndarray, mean: np.ndarray,
                             invstd: np.ndarray, weight: Optional[np.ndarray] = None,
                             bias: Optional[np.ndarray] = None, *, axis: int = 1,
                             out: Optional[np.ndarray] = None
                             ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference for `fastbn.functional.batch_norm_relu_backward`."""
    dy, x, layout, mean, invstd, weight, bias, _ = _check_backward_inputs(
        dy, x, mean, invstd, weight, bias, axis, ("mean", "invstd"))
    if out is not None:
        check_out(out, "out", x.shape, x.dtype, inputs=(dy, x, mean, invstd, weight, bias),
                  allow_identical=(dy, x))
    pre = _normalize(x, mean, invstd, weight, bias, layout)
    masked = np.where(pre > 0, dy, dy.dtype.type(0))
    return batch_norm_backward(masked, x, mean, invstd, weight, axis=axis, out=out)


def batch_norm_relu_backward_eval(dy: np.ndarray, x: np.ndarray, running_mean: np.ndarray,
                                  running_var: np.ndarray, weight: Optional[np.ndarray] = None,
                                  bias: Optional[np.ndarray] = None, eps: float = 1e-5, *,
                                  axis: int = 1, out: Optional[np.ndarray] = None
                                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference for `fastbn.functional.batch_norm_relu_backward_eval`."""
    dy, x, layout, running_mean, running_var, weight, bias, eps = _check_backward_inputs(
        dy, x, running_mean, running_var, weight, bias, axis, ("running_mean", "running_var"),
        eps)
    if out is not None:
        check_out(out, "out", x.shape, x.dtype,
                  inputs=(dy, x, running_mean, running_var, weight, bias), allow_identical=(dy,))
    invstd = 1 / np.sqrt(running_var + x.dtype.type(eps))
    pre = _normalize(x, running_mean, invstd, weight, bias, layout)
    masked = np.where(pre > 0, dy, dy.dtype.type(0))
    return batch_norm_backward_eval(masked, x, running_mean, running_var, weight, eps,
                                    axis=axis, out=out)
