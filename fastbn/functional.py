"""Stateless batch normalization (``torch.nn.functional`` semantics).

Every function validates its arguments (shared with the reference backend),
then runs the C kernels, or the NumPy reference under
``fastbn.use_backend("reference")``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from . import _backend
from ._bn_validation import (batch_norm_layout, check_batch_norm_vectors, check_eps,
                             check_input, check_momentum)
from ._validation import check_out
from .nn import _bn

__all__ = ["batch_norm"]


def _contiguous(array: Optional[np.ndarray]) -> Optional[np.ndarray]:
    if array is None or array.flags.c_contiguous:
        return array
    return np.ascontiguousarray(array)


def batch_norm(x: np.ndarray, running_mean: Optional[np.ndarray], running_var: Optional[np.ndarray],
               weight: Optional[np.ndarray] = None, bias: Optional[np.ndarray] = None,
               training: bool = False, momentum: Optional[float] = 0.1, eps: float = 1e-5,
               *, axis: int = 1, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Batch normalization over every axis except the channel axis.

    Parameters
    ----------
    x : ndarray, float32 or float64, shape (N, C, *spatial) or (N, *spatial, C)
        IN.  Any strides (non-contiguous input is copied once).
    running_mean, running_var : ndarray (C,) or None
        IN (eval) / IN-OUT (training: updated in place with `momentum`).
    weight, bias : ndarray (C,) or None
        IN.  The affine parameters (None means 1 and 0).
    training : bool
        Use batch statistics (and update running stats) instead of running stats.
    momentum : float or None
        Running-average factor; None means a cumulative average.
    eps : float
        Added to the variance.
    axis : int, keyword-only
        Channel axis: 1 (channels-first) or -1 (channels-last).
    out : ndarray or None, keyword-only
        OUT.  C-contiguous, same shape and dtype as x; may be x itself.

    Returns
    -------
    ndarray
        The normalized array (`out` when given).
    """
    if _backend.is_reference():
        from .reference import batch_norm as reference_batch_norm
        return reference_batch_norm(x, running_mean, running_var, weight, bias, training,
                                    momentum, eps, axis=axis, out=out)
    x = check_input(x)
    layout = batch_norm_layout(x, axis)
    use_batch_stats = training or running_mean is None or running_var is None
    eps = check_eps(eps, batch_stats=use_batch_stats)
    check_momentum(momentum)
    vectors = check_batch_norm_vectors(layout, x.dtype, running_mean=running_mean,
                                       running_var=running_var, weight=weight, bias=bias)
    if use_batch_stats:
        raise NotImplementedError(
            "batch_norm: training mode (batch statistics) is not implemented yet; "
            "pass training=False with running_mean and running_var")
    if out is None:
        y = np.empty(x.shape, dtype=x.dtype)
    else:
        y = check_out(out, "out", x.shape, x.dtype, inputs=(x, *vectors.values()), allow_identical=(x,))
    _bn.eval_forward(_contiguous(x), y, layout.outer, layout.channels, layout.inner,
                     _contiguous(vectors["running_mean"]), _contiguous(vectors["running_var"]),
                     _contiguous(vectors["weight"]), _contiguous(vectors["bias"]), eps)
    return y
