"""Argument checks for batch normalization: every rule once, called from one
place per public entry point (fastbn.functional's shared implementations,
which fastbn.reference's twins call too, and the layers in fastbn.nn), so
both backends raise the same error for the same bad input.

The checks run on every call, so each has a cheap fast path for the common
case (a float32/float64 ndarray, a float eps, axis 1 or -1) and only falls back
to the general, message-building code when something looks wrong.
"""
from __future__ import annotations

from math import prod
from typing import NamedTuple, Optional

import numpy as np

from ._validation import (FLOAT_DTYPES as _FLOAT_DTYPES, as_float_array, check_axis,
                          check_channel_vector, check_real, check_same_dtype, check_shape,
                          describe)


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
    """The one rule for eps (functions and layers alike): a real number, > 0
    when batch statistics are used (a constant channel would divide by zero;
    a layer's eps is checked this way, as its training forward uses them),
    >= 0 with running statistics."""
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


class BatchNormArgs(NamedTuple):
    """Validated arguments of a forward (`batch_norm`, `batch_norm_forward_train`
    and their ReLU twins)."""
    x: np.ndarray
    layout: BatchNormLayout
    eps: float
    momentum: Optional[float]
    use_batch_stats: bool
    update: bool              # running statistics are updated
    running_mean: Optional[np.ndarray]
    running_var: Optional[np.ndarray]
    weight: Optional[np.ndarray]
    bias: Optional[np.ndarray]
    out: Optional[np.ndarray]


def check_batch_norm_args(x, running_mean, running_var, weight, bias, use_batch_stats: bool,
                          momentum, eps, axis, out) -> BatchNormArgs:
    """Every check of a batch-norm forward, in one order for both backends.
    Running statistics are updated when given with batch statistics."""
    from ._validation import check_out
    x = check_input(x)
    layout = batch_norm_layout(x, axis)
    check_running_stats_pair(running_mean, running_var)
    update = use_batch_stats and running_mean is not None
    eps = check_eps(eps, batch_stats=use_batch_stats)
    momentum = check_update_momentum(momentum) if update else check_momentum(momentum)
    channels, dtype = layout.channels, x.dtype
    running_mean = check_channel_vector("running_mean", running_mean, channels, dtype)
    running_var = check_channel_vector("running_var", running_var, channels, dtype)
    weight = check_channel_vector("weight", weight, channels, dtype)
    bias = check_channel_vector("bias", bias, channels, dtype)
    if use_batch_stats:
        check_batch_size(x, layout)
    if update:
        check_updatable("running_mean", running_mean)
        check_updatable("running_var", running_var)
    if out is not None:
        out = check_out(out, "out", x.shape, dtype,
                        inputs=(x, running_mean, running_var, weight, bias), allow_identical=(x,))
    return BatchNormArgs(x, layout, eps, momentum, use_batch_stats, update, running_mean,
                         running_var, weight, bias, out)


class BackwardArgs(NamedTuple):
    """Validated arguments of a backward (training: stat_a, stat_b = mean,
    invstd; eval: running_mean, running_var)."""
    dy: np.ndarray
    x: np.ndarray
    layout: BatchNormLayout
    stat_a: np.ndarray
    stat_b: np.ndarray
    weight: Optional[np.ndarray]
    bias: Optional[np.ndarray]
    eps: Optional[float]
    out: Optional[np.ndarray]


def check_backward_args(dy, x, stat_a, stat_b, weight, bias, eps, axis, out, *,
                        eval_mode: bool) -> BackwardArgs:
    """Every check of `batch_norm_backward` (eval_mode False: the saved mean
    and invstd, eps unused) and `batch_norm_backward_eval` (the running
    statistics and eps) and their ReLU twins, in one order for both backends.
    `out` may be dy (and, in training, x) itself."""
    from ._validation import check_out
    x = check_input(x, "x")
    layout = batch_norm_layout(x, axis, "x")
    dy = check_like("dy", dy, x, "x")
    if eval_mode:
        eps = check_eps(eps, batch_stats=False)
    names = ("running_mean", "running_var") if eval_mode else ("mean", "invstd")
    stat_a = check_saved_stat(names[0], stat_a, layout, x.dtype)
    stat_b = check_saved_stat(names[1], stat_b, layout, x.dtype)
    weight = check_channel_vector("weight", weight, layout.channels, x.dtype)
    bias = check_channel_vector("bias", bias, layout.channels, x.dtype)
    if out is not None:
        out = check_out(out, "out", x.shape, x.dtype,
                        inputs=(dy, x, stat_a, stat_b, weight, bias),
                        allow_identical=(dy,) if eval_mode else (dy, x))
    return BackwardArgs(dy, x, layout, stat_a, stat_b, weight, bias, eps, out)


# ---- kernel-ready arrays: the NumPy twin of the bridge's own tests --------------
# A kernel method (fastbn._backend) returns None for an array that fails these;
# the caller then runs the checks above, which name the problem.


def is_kernel_input(value, size: int) -> bool:
    """An exact ndarray of native float32/float64 with `size` elements."""
    return (type(value) is np.ndarray and value.dtype in _FLOAT_DTYPES
            and value.dtype.isnative and value.size == size)


def is_kernel_vector(value, channels: int, dtype) -> bool:
    """None, or an exact native 1-D ndarray of `channels` elements of `dtype`."""
    return value is None or (type(value) is np.ndarray and value.dtype == dtype
                             and value.dtype.isnative and value.ndim == 1
                             and value.shape[0] == channels)


def is_counter(counter) -> bool:
    """A counter a training forward can bump in place: an exact writeable,
    aligned, native 0-d integer ndarray."""
    return (type(counter) is np.ndarray and counter.ndim == 0 and counter.dtype.kind in "iu"
            and counter.dtype.isnative and counter.flags.writeable and counter.flags.aligned)


# ---- layer hyperparameters: one rule each, used by the constructor and by the
# property setters of fastbn.nn's batch-norm layers ---------------------------


def check_num_features(num_features) -> int:
    from ._validation import check_int
    return check_int(num_features, "num_features", minimum=1)


def check_layer_axis(axis) -> int:
    """A layer's channel axis: 1 (channels-first) or -1 (channels-last),
    before the rank of an input is known."""
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or axis not in (1, -1):
        raise ValueError(f"axis: expected 1 (channels-first) or -1 (channels-last), got {axis!r}")
    return int(axis)


def check_counter(name: str, counter, *, updating: bool) -> None:
    """num_batches_tracked: None (not counted, as in torch) or a 0-d integer
    array (int64 as created; another native integer dtype is kept and counts
    too), writeable when a training forward is about to increment it."""
    if counter is None:
        return
    if (not isinstance(counter, np.ndarray) or counter.ndim != 0
            or counter.dtype.kind not in "iu" or not counter.dtype.isnative):
        raise TypeError(f"{name}: expected a 0-d native-order integer array (int64) or None, "
                        f"got {describe(counter)}")
    if updating and not counter.flags.writeable:
        raise ValueError(f"{name}: expected a writeable array (it is incremented in place "
                         f"in training), got a read-only one")
    if updating and not counter.flags.aligned:
        raise ValueError(f"{name}: expected an aligned array (it is incremented in place "
                         f"in training), got an unaligned view")
