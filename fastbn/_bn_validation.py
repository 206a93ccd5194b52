"""Argument checks for batch normalization, shared by the fast path
(fastbn.functional) and the reference (fastbn.reference)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from ._validation import as_float_array, check_axis, check_channel_vector, check_real


class BatchNormLayout(NamedTuple):
    """The input viewed as (outer, channels, inner); see src_c/bn/bn_kernels.h."""
    axis: int            # normalized channel axis: 1 or ndim - 1
    channels: int
    outer: int
    inner: int
    shape: tuple         # shape that broadcasts a per-channel vector against x

    @property
    def n_per_channel(self) -> int:
        return self.outer * self.inner


def batch_norm_layout(x: np.ndarray, axis, name: str = "input") -> BatchNormLayout:
    if x.ndim < 2:
        raise ValueError(f"{name}: expected at least 2 dimensions (N, C, ...), got {x.ndim}D input")
    axis = check_axis(axis, x.ndim)
    shape = x.shape
    channels = shape[axis]
    if axis == 1:
        outer = shape[0]
        inner = 1
        for size in shape[2:]:
            inner *= size
    else:
        outer = 1
        for size in shape[:-1]:
            outer *= size
        inner = 1
    broadcast = [1] * x.ndim
    broadcast[axis] = channels
    return BatchNormLayout(axis, channels, outer, inner, tuple(broadcast))


def check_eps(eps, *, batch_stats: bool) -> float:
    """eps > 0 when batch statistics are used (a constant channel would divide
    by zero), >= 0 with running statistics."""
    eps = check_real(eps, "eps")
    if batch_stats and not eps > 0:
        raise ValueError(f"eps: expected a value > 0 when batch statistics are used, got {eps!r}")
    if not eps >= 0:
        raise ValueError(f"eps: expected a value >= 0, got {eps!r}")
    return eps


def check_momentum(momentum) -> Optional[float]:
    if momentum is None:
        return None
    momentum = check_real(momentum, "momentum")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum: expected a value in [0, 1] or None, got {momentum!r}")
    return momentum


def check_batch_norm_vectors(layout: BatchNormLayout, dtype, **vectors) -> dict:
    """Validate per-channel vectors (None allowed), return them by name."""
    return {name: check_channel_vector(name, value, layout.channels, dtype)
            for name, value in vectors.items()}


def check_input(x, name: str = "input") -> np.ndarray:
    return as_float_array(x, name)
