"""Reference batch normalization in plain NumPy (float64 math where it helps
clarity is NOT used: results are computed in the input dtype, as a NumPy user
would write them)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from .._bn_validation import (batch_norm_layout, check_batch_norm_vectors, check_eps,
                              check_input, check_momentum)
from .._validation import check_out


def batch_norm(x: np.ndarray, running_mean: Optional[np.ndarray], running_var: Optional[np.ndarray],
               weight: Optional[np.ndarray] = None, bias: Optional[np.ndarray] = None,
               training: bool = False, momentum: Optional[float] = 0.1, eps: float = 1e-5,
               *, axis: int = 1, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Reference for `fastbn.functional.batch_norm` (same signature)."""
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
    if out is not None:
        check_out(out, "out", x.shape, x.dtype, inputs=(x, *vectors.values()), allow_identical=(x,))
    shape = layout.shape
    y = (x - running_mean.reshape(shape)) / np.sqrt(running_var.reshape(shape) + x.dtype.type(eps))
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    if out is not None:
        out[...] = y
        return out
    return y.astype(x.dtype, copy=False)
