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

from ._validation import (FLOAT_DTYPES as _FLOAT_DTYPES, _FLOAT64, as_float_array, check_axis,
                          check_bool, check_channel_vector, check_real, check_same_dtype,
                          check_shape, describe)


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


# ---- bfloat16 activations ----------------------------------------------------------
# The fused forwards and backwards take bfloat16 x/dy (ml_dtypes.bfloat16,
# an optional dependency) with float32 per-channel vectors (weight, bias,
# running and saved statistics, parameter gradients), as torch's bf16 batch
# norm on CPU.  The split phases take float32/float64 only.

def _bfloat16_dtype() -> Optional[np.dtype]:
    try:
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    except (ImportError, AttributeError):
        return None


BFLOAT16: Optional[np.dtype] = _bfloat16_dtype()   # None without ml_dtypes
_FLOAT32 = np.dtype(np.float32)


def is_bfloat16(dtype) -> bool:
    return BFLOAT16 is not None and dtype == BFLOAT16


def channel_dtype(dtype) -> np.dtype:
    """The dtype of the per-channel vectors that go with activations of
    `dtype`: the same, except float32 for bfloat16."""
    return _FLOAT32 if is_bfloat16(dtype) else dtype


def check_activation(x, name: str = "input") -> np.ndarray:
    """`check_input`, also accepting a bfloat16 ndarray (as its plain ndarray
    view)."""
    if isinstance(x, np.ndarray) and BFLOAT16 is not None and x.dtype == BFLOAT16:
        return x if type(x) is np.ndarray else x.view(np.ndarray)
    return as_float_array(x, name)


def check_vector(name: str, value, channels: int, x_dtype) -> Optional[np.ndarray]:
    """A per-channel vector for activations of `x_dtype` (`check_channel_vector`;
    for bfloat16 activations it must be float32, and the message says why)."""
    if not is_bfloat16(x_dtype):
        return check_channel_vector(name, value, channels, x_dtype)
    if value is None or (type(value) is np.ndarray and value.dtype is _FLOAT32
                         and value.ndim == 1 and value.shape[0] == channels):
        return value
    array = as_float_array(value, name) if not (
        isinstance(value, np.ndarray) and is_bfloat16(value.dtype)) else value
    if array.dtype != _FLOAT32:
        raise TypeError(f"{name}: expected dtype float32 (per-channel vectors of a bfloat16 "
                        f"input are float32), got {array.dtype}")
    return check_channel_vector(name, array, channels, _FLOAT32)


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


def check_running_stats_apart(running_mean: np.ndarray, running_var: np.ndarray,
                              x: Optional[np.ndarray], weight: Optional[np.ndarray],
                              bias: Optional[np.ndarray]) -> None:
    """Running statistics updated in place share no memory with each other or
    with an input the kernel reads (otherwise the result would depend on the
    order of reads and writes)."""
    pairs = [("running_mean", running_mean, "running_var", running_var)]
    for name, stat in (("running_mean", running_mean), ("running_var", running_var)):
        pairs += [(name, stat, "input", x), (name, stat, "weight", weight),
                  (name, stat, "bias", bias)]
    for name, stat, other_name, other in pairs:
        if other is not None and np.may_share_memory(stat, other) \
                and np.shares_memory(stat, other):
            raise ValueError(f"{name}: expected an array sharing no memory with {other_name} "
                             f"(running statistics are updated in place in training), got "
                             f"one that overlaps it")


def check_like(name: str, value, like: np.ndarray, like_name: str) -> np.ndarray:
    """An array with exactly the shape and dtype of `like` (e.g. dy vs x)."""
    if type(value) is np.ndarray and value.dtype is like.dtype and value.shape == like.shape:
        return value
    array = check_activation(value, name) if is_bfloat16(like.dtype) else as_float_array(value, name)
    check_shape(name, array, like.shape)
    check_same_dtype(name, array, like_name, like.dtype)
    return array


def check_saved_stat(name: str, value, layout: BatchNormLayout, dtype) -> np.ndarray:
    """A per-channel statistic the backward needs (mean, invstd): required."""
    if value is None:
        raise TypeError(f"{name}: expected a 1-D array with {layout.channels} elements "
                        f"(one per channel), got {describe(value)}")
    return check_vector(name, value, layout.channels, dtype)


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
    x = check_activation(x)
    layout = batch_norm_layout(x, axis)
    check_running_stats_pair(running_mean, running_var)
    update = use_batch_stats and running_mean is not None
    eps = check_eps(eps, batch_stats=use_batch_stats)
    momentum = check_update_momentum(momentum) if update else check_momentum(momentum)
    channels, dtype = layout.channels, x.dtype
    running_mean = check_vector("running_mean", running_mean, channels, dtype)
    running_var = check_vector("running_var", running_var, channels, dtype)
    weight = check_vector("weight", weight, channels, dtype)
    bias = check_vector("bias", bias, channels, dtype)
    if use_batch_stats:
        check_batch_size(x, layout)
    if update:
        check_updatable("running_mean", running_mean)
        check_updatable("running_var", running_var)
        check_running_stats_apart(running_mean, running_var, x, weight, bias)
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
    x = check_activation(x, "x")
    layout = batch_norm_layout(x, axis, "x")
    dy = check_like("dy", dy, x, "x")
    if eval_mode:
        eps = check_eps(eps, batch_stats=False)
    names = ("running_mean", "running_var") if eval_mode else ("mean", "invstd")
    stat_a = check_saved_stat(names[0], stat_a, layout, x.dtype)
    stat_b = check_saved_stat(names[1], stat_b, layout, x.dtype)
    weight = check_vector("weight", weight, layout.channels, x.dtype)
    bias = check_vector("bias", bias, layout.channels, x.dtype)
    if out is not None:
        out = check_out(out, "out", x.shape, x.dtype,
                        inputs=(dy, x, stat_a, stat_b, weight, bias),
                        allow_identical=(dy,) if eval_mode else (dy, x))
    return BackwardArgs(dy, x, layout, stat_a, stat_b, weight, bias, eps, out)


def check_gradient_outs(dweight_out, dbias_out, accumulate, args: BackwardArgs):
    """`dweight_out` / `dbias_out` of a backward: each None or a writeable
    C-contiguous ndarray of shape (C,) and the per-channel dtype of x
    (float32 for bfloat16 x), sharing no memory with any array the backward
    reads or writes (dy, x, the statistics, weight, bias, `out`) or with each
    other.  `accumulate` is a bool, True only with at least one of them.
    Returns ``(dweight_out, dbias_out, accumulate)``."""
    accumulate = check_bool(accumulate, "accumulate")
    if accumulate and dweight_out is None and dbias_out is None:
        raise ValueError("accumulate: expected dweight_out or dbias_out to add into "
                         "(accumulate=True adds the gradients to those buffers), got neither")
    inputs = (args.dy, args.x, args.stat_a, args.stat_b, args.weight, args.bias, args.out)
    dweight_out = _check_gradient_out("dweight_out", dweight_out, args, inputs)
    dbias_out = _check_gradient_out("dbias_out", dbias_out, args, inputs + (dweight_out,))
    return dweight_out, dbias_out, accumulate


def _check_gradient_out(name: str, value, args: BackwardArgs, inputs) -> Optional[np.ndarray]:
    """One of `check_gradient_outs`' buffers, as a plain ndarray view (the
    kernels take exact ndarrays; the view shares the caller's memory)."""
    from ._validation import check_out
    if value is None:
        return None
    dtype = channel_dtype(args.x.dtype)
    if isinstance(value, np.ndarray) and value.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the per-channel dtype of an input "
                        f"of dtype {args.x.dtype}), got {value.dtype}")
    value = check_out(value, name, (args.layout.channels,), dtype, inputs=inputs)
    if not value.flags.aligned:
        raise ValueError(f"{name}: expected an aligned array, got an unaligned view")
    return value if type(value) is np.ndarray else value.view(np.ndarray)


# ---- kernel-ready arrays: the NumPy twin of the bridge's own tests --------------
# A kernel method (fastbn._backend) returns None for an array that fails these;
# the caller then runs the checks above, which name the problem.


def is_kernel_input(value, size: int) -> bool:
    """An exact ndarray of native float32/float64 with `size` elements."""
    return (type(value) is np.ndarray
            and (value.dtype in _FLOAT_DTYPES or is_bfloat16(value.dtype))
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
    relu = check_bool(relu, "relu")
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
