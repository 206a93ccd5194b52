"""Reference for the fused batch norm + ReLU: `fastbn.functional`'s
functions on the NumPy kernels, which compute literally batch norm, then
ReLU (the oracle the fused kernels are tested against).

ReLU follows torch: ``max(y, 0)`` with NaN passed through, and no gradient
where the pre-activation is <= 0 (or NaN).  The backward takes the forward's
`weight` AND `bias` because it recomputes the pre-activation from `x` to
find the ReLU mask (the fused kernel does the same instead of storing it).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .. import functional as _entries
from ._kernels import REFERENCE


def batch_norm_relu(x: np.ndarray, running_mean: Optional[np.ndarray],
                    running_var: Optional[np.ndarray], weight: Optional[np.ndarray] = None,
                    bias: Optional[np.ndarray] = None, training: bool = False,
                    momentum: Optional[float] = 0.1, eps: float = 1e-5, *, axis: int = 1,
                    out: Optional[np.ndarray] = None) -> np.ndarray:
    """Reference for `fastbn.functional.batch_norm_relu`."""
    return _entries._batch_norm(REFERENCE, x, running_mean, running_var, weight, bias, training,
                                momentum, eps, axis, out, True)


def batch_norm_relu_forward_train(x: np.ndarray, weight: Optional[np.ndarray] = None,
                                  bias: Optional[np.ndarray] = None, eps: float = 1e-5, *,
                                  axis: int = 1, out: Optional[np.ndarray] = None,
                                  running_mean: Optional[np.ndarray] = None,
                                  running_var: Optional[np.ndarray] = None,
                                  momentum: float = 0.1
                                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference for `fastbn.functional.batch_norm_relu_forward_train`."""
    return _entries._forward_train(REFERENCE, x, weight, bias, eps, axis, out, running_mean,
                                   running_var, momentum, True)


def batch_norm_relu_backward(dy: np.ndarray, x: np.ndarray, mean: np.ndarray,
                             invstd: np.ndarray, weight: Optional[np.ndarray] = None,
                             bias: Optional[np.ndarray] = None, *, axis: int = 1,
                             out: Optional[np.ndarray] = None,
                             dweight_out: Optional[np.ndarray] = None,
                             dbias_out: Optional[np.ndarray] = None, accumulate: bool = False
                             ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference for `fastbn.functional.batch_norm_relu_backward`."""
    return _entries._backward(REFERENCE, dy, x, mean, invstd, weight, bias, axis, out, True,
                              dweight_out, dbias_out, accumulate)


def batch_norm_relu_backward_eval(dy: np.ndarray, x: np.ndarray, running_mean: np.ndarray,
                                  running_var: np.ndarray, weight: Optional[np.ndarray] = None,
                                  bias: Optional[np.ndarray] = None, eps: float = 1e-5, *,
                                  axis: int = 1, out: Optional[np.ndarray] = None,
                                  dweight_out: Optional[np.ndarray] = None,
                                  dbias_out: Optional[np.ndarray] = None,
                                  accumulate: bool = False
                                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference for `fastbn.functional.batch_norm_relu_backward_eval`."""
    return _entries._backward_eval(REFERENCE, dy, x, running_mean, running_var, weight, bias,
                                   eps, axis, out, True, dweight_out, dbias_out, accumulate)
