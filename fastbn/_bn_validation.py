"""Argument checks for batch normalization, shared by the fast path
(fastbn.functional), the layers (fastbn.nn) and the reference
(fastbn.reference), so both backends raise the same error for the same bad
input.

The checks run on every call, so each has a cheap fast path for the common
case (a float32/float64 ndarray, a float eps, axis 1 or -1) and only falls back
to the general, message-building code when something looks wrong.
"""
from __future__ import annotations

from math import prod
from typing import NamedTuple, Optional

import numpy as np

from ._validation import (_FLOAT64, as_float_array, check_axis, check_channel_vector,
                          check_flag, check_real, check_same_dtype, check_shape, describe)


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

    @property
    def reduce_axes(self) -> tuple:
        """Every axis except the channel axis."""
        return tuple(i for i in range(len(self.shape)) if i != self.axis)


_new_layout = tuple.__new__


def batch_norm_layout(x: np.ndarray, axis, name: str = "input") -> BatchNormLayout:
    shape = x.shape
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(f"{name}: expected at least 2 dimensions (N, C, ...), got {ndim}D input")
    if axis != 1 or type(axis) is not int:
        axis = check_axis(axis, ndim)
    channels = shape[axis]
    if axis == 1:
        return _new_layout(BatchNormLayout, (1, channels, shape[0], prod(shape[2:]),
                                             (1, channels) + (1,) * (ndim - 2)))
    return _new_layout(BatchNormLayout, (axis, channels, prod(shape[:-1]), 1,
                                         (1,) * (ndim - 1) + (channels,)))


def check_eps(eps, *, batch_stats: bool) -> float:
    """eps > 0 when batch statistics are used (a constant channel would divide
    by zero), >= 0 with running statistics."""
    if type(eps) is not float or not eps > 0:
        eps = check_real(eps, "eps")
        if batch_stats and not eps > 0:
            raise ValueError(f"eps: expected a value > 0 when batch statistics are used, got {eps!r}")
        if not eps >= 0:
            raise ValueError(f"eps: expected a value >= 0, got {eps!r}")
    return eps


def check_momentum(momentum) -> Optional[float]:
    if momentum is None:
        return None
    if type(momentum) is not float or not 0.0 <= momentum <= 1.0:
        momentum = check_real(momentum, "momentum")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum: expected a value in [0, 1] or None, got {momentum!r}")
    return momentum


def check_update_momentum(momentum) -> float:
    """The factor of a running-statistics update: a number, not None.

    None (a cumulative average) needs the number of batches seen so far, which
    only the module keeps; it passes momentum = 1 / num_batches_tracked.
    """
    momentum = check_momentum(momentum)
    if momentum is None:
        raise ValueError(
            "momentum: None (cumulative average) needs the number of batches seen; "
            "pass momentum=1/num_batches_tracked (as BatchNorm layers do) to update "
            "running statistics")
    return momentum


def check_batch_norm_vectors(layout: BatchNormLayout, dtype, **vectors) -> dict:
    """Validate per-channel vectors (None allowed), return them by name."""
    return {name: check_channel_vector(name, value, layout.channels, dtype)
            for name, value in vectors.items()}


def check_input(x, name: str = "input") -> np.ndarray:
    return as_float_array(x, name)


def check_batch_size(x: np.ndarray, layout: BatchNormLayout) -> None:
    """Batch statistics need at least 2 values per channel (torch's rule and
    message), and a non-empty batch."""
    n = layout.outer * layout.inner
    if n > 1:
        return
    if n == 0:
        raise ValueError(f"Expected a non-empty batch when using batch statistics, "
                         f"got input size {tuple(x.shape)}")
    raise ValueError(f"Expected more than 1 value per channel when training, "
                     f"got input size {tuple(x.shape)}")


def check_running_stats_pair(running_mean, running_var) -> None:
    if (running_mean is None) != (running_var is None):
        given, missing = (("running_mean", "running_var") if running_var is None
                          else ("running_var", "running_mean"))
        raise ValueError(f"{missing}: expected an array because {given} was given "
                         f"(pass both running statistics or neither), got None")


def check_updatable(name: str, array: Optional[np.ndarray]) -> None:
    """A running statistic updated in place must be writeable."""
    if array is not None and not array.flags.writeable:
        raise ValueError(f"{name}: expected a writeable array (running statistics are updated "
                         f"in place in training), got a read-only one")


def check_like(name: str, value, like: np.ndarray, like_name: str) -> np.ndarray:
    """An array with exactly the shape and dtype of `like` (e.g. dy vs x)."""
    if type(value) is np.ndarray and value.dtype is like.dtype and value.shape == like.shape:
        return value
    array = as_float_array(value, name)
    check_shape(name, array, like.shape)
    check_same_dtype(name, array, like_name, like.dtype)
    return array


def check_saved_stat(name: str, value, layout: BatchNormLayout, dtype) -> np.ndarray:
    """A per-channel statistic the backward needs (mean, invstd): required."""
    if value is None:
        raise TypeError(f"{name}: expected a 1-D array with {layout.channels} elements "
                        f"(one per channel), got {describe(value)}")
    return check_channel_vector(name, value, layout.channels, dtype)


class ForwardTrainArgs(NamedTuple):
    """Validated arguments of a training forward (fast path and reference)."""
    x: np.ndarray
    layout: BatchNormLayout
    eps: float
    momentum: Optional[float]
    update: bool              # running statistics are updated
    vectors: dict             # weight, bias, running_mean, running_var (or None)
    out: Optional[np.ndarray]


def check_forward_train_args(x, weight, bias, eps, axis, out, running_mean, running_var,
                             momentum) -> ForwardTrainArgs:
    """Every check of `batch_norm_forward_train`, in one order for both
    backends (so they raise the same error for the same bad input)."""
    from ._validation import check_out
    x = check_input(x)
    layout = batch_norm_layout(x, axis)
    check_running_stats_pair(running_mean, running_var)
    update = running_mean is not None
    eps = check_eps(eps, batch_stats=True)
    momentum = check_update_momentum(momentum) if update else check_momentum(momentum)
    vectors = check_batch_norm_vectors(layout, x.dtype, weight=weight, bias=bias,
                                       running_mean=running_mean, running_var=running_var)
    check_batch_size(x, layout)
    check_updatable("running_mean", vectors["running_mean"])
    check_updatable("running_var", vectors["running_var"])
    if out is not None:
        out = check_out(out, "out", x.shape, x.dtype, inputs=(x, *vectors.values()),
                        allow_identical=(x,))
    return ForwardTrainArgs(x, layout, eps, momentum, update, vectors, out)


# section: split-phase primitives (batch_norm_stats and after) ----------------------
# One argument check per primitive, called by the fast function and its
# reference twin alike.  Per-channel statistics and sums of the phases are
# float64 or the input's dtype (they cross processes in float64).


def check_phase_vector(name: str, value, layout: BatchNormLayout, dtype) -> np.ndarray:
    """A required per-channel statistic or sum of the phases: 1-D, one value
    per channel, float64 or the input's dtype."""
    if value is None:
        raise TypeError(f"{name}: expected a 1-D array with {layout.channels} elements "
                        f"(one per channel), got {describe(value)}")
    if type(value) is np.ndarray and value.dtype is _FLOAT64:
        return check_channel_vector(name, value, layout.channels, value.dtype)
    array = as_float_array(value, name)
    if array.dtype != _FLOAT64:
        return check_channel_vector(name, array, layout.channels, dtype)
    return check_channel_vector(name, array, layout.channels, array.dtype)


def check_relu_from(relu_from, layout: BatchNormLayout, dtype):
    """None, or the forward's (weight, bias) for the ReLU mask: each None or
    a per-channel vector of the input's dtype.  Returns None or the pair."""
    if relu_from is None:
        return None
    if not isinstance(relu_from, (tuple, list)) or len(relu_from) != 2:
        raise TypeError(f"relu_from: expected None or a (weight, bias) pair of the forward, "
                        f"got {describe(relu_from)}")
    weight, bias = relu_from
    return (check_channel_vector("relu_from[0] (weight)", weight, layout.channels, dtype),
            check_channel_vector("relu_from[1] (bias)", bias, layout.channels, dtype))


def check_stats_args(x, axis):
    """`batch_norm_stats`: returns (x, layout)."""
    x = check_input(x)
    return x, batch_norm_layout(x, axis)


def check_merge_stats_args(counts, means, m2s):
    """`batch_norm_merge_stats`: counts (P,) non-negative integers, means and
    m2s (P, C) float arrays, P >= 1.  Returns (counts as a list of ints,
    means, m2s as float64 arrays)."""
    if isinstance(counts, np.ndarray):
        counts_array = counts
    elif isinstance(counts, (list, tuple)):
        counts_array = np.asarray(counts)
    else:
        raise TypeError(f"counts: expected a 1-D sequence or array of ints, got {describe(counts)}")
    if counts_array.dtype.kind not in "iu" and not (counts_array.size == 0
                                                     and counts_array.dtype.kind == "f"):
        raise TypeError(f"counts: expected integers (values per channel of each part), "
                        f"got dtype {counts_array.dtype}")
    if counts_array.ndim != 1 or counts_array.shape[0] == 0:
        raise ValueError(f"counts: expected a 1-D array with one count per part (at least 1), "
                         f"got shape {counts_array.shape}")
    if (counts_array < 0).any():
        raise ValueError(f"counts: expected counts >= 0, got {counts_array.min()}")
    parts = counts_array.shape[0]
    means = as_float_array(means, "means")
    if means.ndim != 2 or means.shape[0] != parts:
        raise ValueError(f"means: expected shape ({parts}, C) (one row per part), "
                         f"got {tuple(means.shape)}")
    m2s = as_float_array(m2s, "m2s")
    check_shape("m2s", m2s, means.shape)
    return ([int(n) for n in counts_array], means.astype(np.float64, copy=False),
            m2s.astype(np.float64, copy=False))


class PhaseApplyArgs(NamedTuple):
    """Validated arguments of `batch_norm_apply`."""
    x: np.ndarray
    layout: BatchNormLayout
    mean: np.ndarray
    invstd: np.ndarray
    weight: Optional[np.ndarray]
    bias: Optional[np.ndarray]
    relu: bool
    out: Optional[np.ndarray]


def check_apply_args(x, mean, invstd, weight, bias, axis, relu, out) -> PhaseApplyArgs:
    from ._validation import check_out
    x = check_input(x)
    layout = batch_norm_layout(x, axis)
    mean = check_phase_vector("mean", mean, layout, x.dtype)
    invstd = check_phase_vector("invstd", invstd, layout, x.dtype)
    weight = check_channel_vector("weight", weight, layout.channels, x.dtype)
    bias = check_channel_vector("bias", bias, layout.channels, x.dtype)
    relu = check_flag(relu, "relu")
    if out is not None:
        out = check_out(out, "out", x.shape, x.dtype, inputs=(x, mean, invstd, weight, bias),
                        allow_identical=(x,))
    return PhaseApplyArgs(x, layout, mean, invstd, weight, bias, relu, out)


class PhaseBackwardArgs(NamedTuple):
    """Validated arguments of `batch_norm_backward_reduce` and
    `batch_norm_backward_apply` (the latter's own ones None where not given)."""
    dy: np.ndarray
    x: np.ndarray
    layout: BatchNormLayout
    mean: np.ndarray
    invstd: np.ndarray
    relu_from: Optional[tuple]   # (weight, bias) of the forward, or None
    weight: Optional[np.ndarray]
    sum_dy: Optional[np.ndarray]
    sum_dy_xhat: Optional[np.ndarray]
    count: Optional[int]
    out: Optional[np.ndarray]


def check_backward_reduce_args(dy, x, mean, invstd, axis, relu_from) -> PhaseBackwardArgs:
    x = check_input(x, "x")
    layout = batch_norm_layout(x, axis, "x")
    dy = check_like("dy", dy, x, "x")
    mean = check_phase_vector("mean", mean, layout, x.dtype)
    invstd = check_phase_vector("invstd", invstd, layout, x.dtype)
    relu_from = check_relu_from(relu_from, layout, x.dtype)
    return PhaseBackwardArgs(dy, x, layout, mean, invstd, relu_from, None, None, None, None,
                             None)


def check_backward_apply_args(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count, axis,
                              relu_from, out) -> PhaseBackwardArgs:
    from ._validation import check_int, check_out
    dy, x, layout, mean, invstd, relu_from = check_backward_reduce_args(
        dy, x, mean, invstd, axis, relu_from)[:6]
    weight = check_channel_vector("weight", weight, layout.channels, x.dtype)
    sum_dy = check_phase_vector("sum_dy", sum_dy, layout, x.dtype)
    sum_dy_xhat = check_phase_vector("sum_dy_xhat", sum_dy_xhat, layout, x.dtype)
    count = check_int(count, "count", minimum=1)
    if out is not None:
        out = check_out(out, "out", x.shape, x.dtype,
                        inputs=(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat,
                                *(relu_from or ())),
                        allow_identical=(dy, x))
    return PhaseBackwardArgs(dy, x, layout, mean, invstd, relu_from, weight, sum_dy,
                             sum_dy_xhat, count, out)
