"""Reference for the split-phase batch-norm primitives (`batch_norm_stats`
and after in `fastbn.functional`): the test oracle and the
``fastbn.use_backend("reference")`` backend.

Same signatures, validation and errors as the fast functions.  Written as
the formulas read, in float64 whole-array NumPy: two-pass statistics, the
merge as one weighted sum over all parts (not Chan's sequential update the
fast path uses), and the ReLU mask from the pre-activation computed in
float64.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np

from .._bn_validation import (BatchNormLayout, check_apply_args, check_backward_apply_args,
                              check_backward_reduce_args, check_merge_stats_args,
                              check_stats_args)


def _per_channel(vector: Optional[np.ndarray], layout: BatchNormLayout, default: float):
    """`vector` as float64, shaped to broadcast against x (a scalar if None)."""
    if vector is None:
        return default
    return np.asarray(vector, np.float64).reshape(layout.shape)


def _xhat(x: np.ndarray, mean, invstd, layout: BatchNormLayout) -> np.ndarray:
    return ((x.astype(np.float64) - _per_channel(mean, layout, 0.0))
            * _per_channel(invstd, layout, 1.0))


def _gradient(dy: np.ndarray, xhat: np.ndarray, relu_from, layout: BatchNormLayout):
    """dy in float64, zeroed where the forward's ReLU had pre-activation <= 0."""
    g = dy.astype(np.float64)
    if relu_from is None:
        return g
    weight, bias = relu_from
    pre = xhat * _per_channel(weight, layout, 1.0) + _per_channel(bias, layout, 0.0)
    return np.where(pre > 0, g, 0.0)


def _deliver(result: np.ndarray, dtype, out: Optional[np.ndarray]) -> np.ndarray:
    if out is None:
        return np.ascontiguousarray(result, dtype=dtype)
    out[...] = result
    return out


def batch_norm_stats(x: np.ndarray, *, axis: int = 1) -> Tuple[int, np.ndarray, np.ndarray]:
    """Reference for `fastbn.functional.batch_norm_stats`."""
    x, layout = check_stats_args(x, axis)
    count = layout.n_per_channel
    if x.size == 0:
        return count, np.zeros(layout.channels), np.zeros(layout.channels)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=layout.reduce_axes)
    centered = x64 - mean.reshape(layout.shape)
    return count, mean, (centered * centered).sum(axis=layout.reduce_axes)


def batch_norm_merge_stats(counts: Union[Sequence[int], np.ndarray],
                           means: Union[Sequence[np.ndarray], np.ndarray],
                           m2s: Union[Sequence[np.ndarray], np.ndarray]
                           ) -> Tuple[int, np.ndarray, np.ndarray]:
    """Reference for `fastbn.functional.batch_norm_merge_stats`: the direct
    formula mean = sum(n_i * mean_i) / n, m2 = sum(m2_i + n_i * (mean_i - mean)^2)."""
    counts, means, m2s = check_merge_stats_args(counts, means, m2s)
    present = [i for i, n in enumerate(counts) if n > 0]
    total = sum(counts)
    if total == 0:
        return 0, np.zeros(means.shape[1]), np.zeros(means.shape[1])
    weights = np.array([counts[i] for i in present], np.float64)[:, None]
    means, m2s = means[present], m2s[present]
    mean = (weights * means).sum(axis=0) / total
    m2 = (m2s + weights * (means - mean) ** 2).sum(axis=0)
    return total, mean, m2


def batch_norm_apply(x: np.ndarray, mean: np.ndarray, invstd: np.ndarray,
                     weight: Optional[np.ndarray] = None, bias: Optional[np.ndarray] = None,
                     *, axis: int = 1, relu: bool = False,
                     out: Optional[np.ndarray] = None) -> np.ndarray:
    """Reference for `fastbn.functional.batch_norm_apply`."""
    x, layout, mean, invstd, weight, bias, relu, out = check_apply_args(
        x, mean, invstd, weight, bias, axis, relu, out)
    y = (_xhat(x, mean, invstd, layout) * _per_channel(weight, layout, 1.0)
         + _per_channel(bias, layout, 0.0))
    if relu:
        y = np.maximum(y, 0.0)  # NaN passes through, as in torch.relu
    return _deliver(y, x.dtype, out)


def batch_norm_backward_reduce(dy: np.ndarray, x: np.ndarray, mean: np.ndarray,
                               invstd: np.ndarray, *, axis: int = 1,
                               relu_from: Optional[Tuple[Optional[np.ndarray],
                                                         Optional[np.ndarray]]] = None
                               ) -> Tuple[np.ndarray, np.ndarray]:
    """Reference for `fastbn.functional.batch_norm_backward_reduce`."""
    args = check_backward_reduce_args(dy, x, mean, invstd, axis, relu_from)
    layout = args.layout
    xhat = _xhat(args.x, args.mean, args.invstd, layout)
    g = _gradient(args.dy, xhat, args.relu_from, layout)
    return g.sum(axis=layout.reduce_axes), (g * xhat).sum(axis=layout.reduce_axes)


def batch_norm_backward_apply(dy: np.ndarray, x: np.ndarray, mean: np.ndarray,
                              invstd: np.ndarray, weight: Optional[np.ndarray],
                              sum_dy: np.ndarray, sum_dy_xhat: np.ndarray, count: int, *,
                              axis: int = 1,
                              relu_from: Optional[Tuple[Optional[np.ndarray],
                                                        Optional[np.ndarray]]] = None,
                              out: Optional[np.ndarray] = None) -> np.ndarray:
    """Reference for `fastbn.functional.batch_norm_backward_apply`."""
    args = check_backward_apply_args(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count,
                                     axis, relu_from, out)
    layout, n = args.layout, float(args.count)
    xhat = _xhat(args.x, args.mean, args.invstd, layout)
    g = _gradient(args.dy, xhat, args.relu_from, layout)
    scale = _per_channel(args.weight, layout, 1.0) * _per_channel(args.invstd, layout, 1.0)
    dx = scale / n * (n * g - _per_channel(args.sum_dy, layout, 0.0)
                      - xhat * _per_channel(args.sum_dy_xhat, layout, 0.0))
    return _deliver(dx, args.x.dtype, args.out)
