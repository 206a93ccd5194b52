"""Reference batch normalization in plain NumPy: the test oracle and the
``fastbn.use_backend("reference")`` backend.

Same signatures, validation and errors as `fastbn.functional`.  Written the
way a NumPy user would write the formulas: whole-array expressions (two-pass
mean and variance, no tricks), so the fast path is checked against the
textbook math, not against a copy of itself.  The training forward computes
the batch statistics and the normalization in float64 and rounds the outputs
once (torch's CPU kernels also accumulate the statistics in double): a
float32 mean accumulated in float32 is off by far more than float32 rounding
when the mean is large (1e4 + N(0, 1)), and that error, times 1/std, lands
on every output.  Everything else is computed in the input dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .._bn_validation import (BatchNormLayout, batch_norm_layout, check_batch_norm_vectors,
                              check_batch_size, check_eps, check_input, check_like,
                              check_momentum, check_running_stats_pair, check_saved_stat,
                              check_updatable, check_update_momentum,
                              check_forward_train_args)
from .._validation import check_channel_vector, check_out


def _batch_statistics(x: np.ndarray, layout: BatchNormLayout) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance (two passes), in float64."""
    axes = layout.reduce_axes
    x = x.astype(np.float64, copy=False)
    mean = x.mean(axis=axes)
    centered = x - mean.reshape(layout.shape)
    var = (centered * centered).mean(axis=axes)
    return mean, var


def _normalize_batch(x: np.ndarray, weight, bias, eps: float, layout: BatchNormLayout):
    """Training normalization: y in x's dtype (computed in float64, rounded
    once), and the float64 mean, biased variance and invstd."""
    mean, var = _batch_statistics(x, layout)
    invstd = 1 / np.sqrt(var + float(eps))
    y = _normalize(x.astype(np.float64, copy=False), mean, invstd, weight, bias, layout)
    return y.astype(x.dtype, copy=False), mean, var, invstd


def _update_running(running_mean: np.ndarray, running_var: np.ndarray, mean: np.ndarray,
                    var: np.ndarray, n: int, momentum: float) -> None:
    """In place: r = (1 - m) * r + m * stat, unbiased variance for running_var."""
    dtype = running_mean.dtype.type
    m = dtype(momentum)
    unbiased = var * dtype(n / (n - 1))
    running_mean[...] = (dtype(1) - m) * running_mean + m * mean
    running_var[...] = (dtype(1) - m) * running_var + m * unbiased


def _normalize(x, mean, invstd, weight, bias, layout):
    shape = layout.shape
    y = (x - mean.reshape(shape)) * invstd.reshape(shape)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _deliver(result: np.ndarray, out: Optional[np.ndarray]) -> np.ndarray:
    if out is None:
        return np.ascontiguousarray(result)
    out[...] = result
    return out


def batch_norm(x: np.ndarray, running_mean: Optional[np.ndarray], running_var: Optional[np.ndarray],
               weight: Optional[np.ndarray] = None, bias: Optional[np.ndarray] = None,
               training: bool = False, momentum: Optional[float] = 0.1, eps: float = 1e-5,
               *, axis: int = 1, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Reference for `fastbn.functional.batch_norm` (same signature)."""
    x = check_input(x)
    layout = batch_norm_layout(x, axis)
    check_running_stats_pair(running_mean, running_var)
    use_batch_stats = bool(training) or running_mean is None
    update = use_batch_stats and running_mean is not None
    eps = check_eps(eps, batch_stats=use_batch_stats)
    momentum = check_update_momentum(momentum) if update else check_momentum(momentum)
    vectors = check_batch_norm_vectors(layout, x.dtype, running_mean=running_mean,
                                       running_var=running_var, weight=weight, bias=bias)
    if use_batch_stats:
        check_batch_size(x, layout)
    if update:
        check_updatable("running_mean", running_mean)
        check_updatable("running_var", running_var)
    if out is not None:
        check_out(out, "out", x.shape, x.dtype, inputs=(x, *vectors.values()), allow_identical=(x,))
    eps_typed = x.dtype.type(eps)
    if use_batch_stats:
        if x.size == 0:
            return _deliver(np.empty(x.shape, x.dtype), out)
        y, mean, var, _ = _normalize_batch(x, weight, bias, eps, layout)
        if update:
            _update_running(running_mean, running_var, mean, var, layout.n_per_channel, momentum)
        return _deliver(y, out)
    invstd = 1 / np.sqrt(running_var + eps_typed)
    return _deliver(_normalize(x, running_mean, invstd, weight, bias, layout), out)


def batch_norm_forward_train(x: np.ndarray, weight: Optional[np.ndarray] = None,
                             bias: Optional[np.ndarray] = None, eps: float = 1e-5, *,
                             axis: int = 1, out: Optional[np.ndarray] = None,
                             running_mean: Optional[np.ndarray] = None,
                             running_var: Optional[np.ndarray] = None,
                             momentum: float = 0.1) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference for `fastbn.functional.batch_norm_forward_train`."""
    x, layout, eps, momentum, update, vectors, out = check_forward_train_args(
        x, weight, bias, eps, axis, out, running_mean, running_var, momentum)
    if x.size == 0:
        empty = np.empty(0, x.dtype)
        return _deliver(np.empty(x.shape, x.dtype), out), empty, empty.copy()
    y, mean, var, invstd = _normalize_batch(x, weight, bias, eps, layout)
    if update:
        _update_running(running_mean, running_var, mean, var, layout.n_per_channel, momentum)
    return _deliver(y, out), mean.astype(x.dtype), invstd.astype(x.dtype)


def batch_norm_backward(dy: np.ndarray, x: np.ndarray, mean: np.ndarray, invstd: np.ndarray,
                        weight: Optional[np.ndarray] = None, *, axis: int = 1,
                        out: Optional[np.ndarray] = None
                        ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference for `fastbn.functional.batch_norm_backward`."""
    x = check_input(x, "x")
    layout = batch_norm_layout(x, axis, "x")
    dy = check_like("dy", dy, x, "x")
    mean = check_saved_stat("mean", mean, layout, x.dtype)
    invstd = check_saved_stat("invstd", invstd, layout, x.dtype)
    weight = check_channel_vector("weight", weight, layout.channels, x.dtype)
    if out is not None:
        check_out(out, "out", x.shape, x.dtype, inputs=(dy, x, mean, invstd, weight),
                  allow_identical=(dy, x))
    shape, axes, n = layout.shape, layout.reduce_axes, layout.n_per_channel
    xhat = (x - mean.reshape(shape)) * invstd.reshape(shape)
    dbias = dy.sum(axis=axes)
    dweight = (dy * xhat).sum(axis=axes)
    scale = invstd if weight is None else weight * invstd
    if n == 0:
        dx = np.empty(x.shape, x.dtype)
    else:
        dx = (scale.reshape(shape) / x.dtype.type(n)
              * (x.dtype.type(n) * dy - dbias.reshape(shape) - xhat * dweight.reshape(shape)))
    return _deliver(dx, out), dweight, dbias


def batch_norm_backward_eval(dy: np.ndarray, x: np.ndarray, running_mean: np.ndarray,
                             running_var: np.ndarray, weight: Optional[np.ndarray] = None,
                             eps: float = 1e-5, *, axis: int = 1,
                             out: Optional[np.ndarray] = None
                             ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference for `fastbn.functional.batch_norm_backward_eval`."""
    x = check_input(x, "x")
    layout = batch_norm_layout(x, axis, "x")
    dy = check_like("dy", dy, x, "x")
    eps = check_eps(eps, batch_stats=False)
    running_mean = check_saved_stat("running_mean", running_mean, layout, x.dtype)
    running_var = check_saved_stat("running_var", running_var, layout, x.dtype)
    weight = check_channel_vector("weight", weight, layout.channels, x.dtype)
    if out is not None:
        check_out(out, "out", x.shape, x.dtype,
                  inputs=(dy, x, running_mean, running_var, weight), allow_identical=(dy,))
    shape, axes = layout.shape, layout.reduce_axes
    invstd = 1 / np.sqrt(running_var + x.dtype.type(eps))
    scale = invstd if weight is None else weight * invstd
    dx = dy * scale.reshape(shape)
    dweight = (dy * (x - running_mean.reshape(shape)) * invstd.reshape(shape)).sum(axis=axes)
    dbias = dy.sum(axis=axes)
    return _deliver(dx, out), dweight, dbias
