"""The reference backend's kernels: the methods of the fast kernels object
(fastbn/_bn.pyx) with the same names, signatures and contract, in NumPy.

Written the way a NumPy user writes the formulas: the input viewed as
``x__ocn = x.reshape(outer, channels, inner)``, whole-array expressions
(two-pass mean and variance, no tricks), so the fast kernels are checked
against the textbook math, not against a copy of themselves.  The training
forward computes in float64 and rounds its outputs once; everything else is
computed in the input dtype.  The split phases (stats, merge_stats, apply,
backward_reduce, backward_apply) compute in float64 as the formulas read:
two-pass statistics, the merge as one weighted sum over all parts (not the
fast path's sequential Chan update), the ReLU mask from the pre-activation
in float64.

The contract shared with the bridge:
- arrays that are not kernel-ready (fastbn._bn_validation.kernel_ready)
  make a method return None having written nothing;
- everything a call writes (running statistics and the counter; both
  parameter gradients) changes together or not at all, also when an
  exception (a KeyboardInterrupt) arrives in the middle of the writes.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .._bn_validation import is_counter, is_kernel_input, is_kernel_vector
from . import _bf16_bn, _optim_kernels

_REDUCE = (0, 2)   # every axis of (outer, channels, inner) but the channels


def _per_channel(vector: np.ndarray) -> np.ndarray:
    return vector.reshape(1, -1, 1)


def _normalize(x__ocn, mean, invstd, weight, bias):
    y = (x__ocn - _per_channel(mean)) * _per_channel(invstd)
    if weight is not None:
        y = y * _per_channel(weight)
    if bias is not None:
        y = y + _per_channel(bias)
    return y


def _relu_mask(dy__ocn, x__ocn, mean, invstd, weight, bias):
    """dy where the forward's pre-activation is > 0, else 0 (also for NaN)."""
    pre = _normalize(x__ocn, mean, invstd, weight, bias)
    return np.where(pre > 0, dy__ocn, dy__ocn.dtype.type(0))


def _deliver(result__ocn: np.ndarray, out: Optional[np.ndarray], shape) -> np.ndarray:
    if out is None:
        return np.ascontiguousarray(result__ocn).reshape(shape)
    out.reshape(result__ocn.shape)[...] = result__ocn
    return out


def _commit(writes, counter=None) -> None:
    """target[...] = value for each (target, value), then counter += 1: all
    or nothing (the old values come back on any exception)."""
    backups = [target.copy() for target, _ in writes]
    try:
        for target, value in writes:
            target[...] = value
        if counter is not None:
            counter[...] += 1
    except BaseException:
        for (target, _), backup in zip(writes, backups):
            target[...] = backup
        raise


def _gradient_writes(dweight, dbias, new_dweight, new_dbias, accumulate: bool):
    return [(target, target + value if accumulate else value)
            for target, value in ((dweight, new_dweight), (dbias, new_dbias))
            if target is not None]


def _vectors_ready(channels: int, dtype, *vectors) -> bool:
    return all(is_kernel_vector(vector, channels, dtype) for vector in vectors)


def _written_ready(channels: int, dtype, *vectors) -> bool:
    return all(vector is None or (is_kernel_vector(vector, channels, dtype)
                                  and vector.flags.writeable and vector.flags.c_contiguous)
               for vector in vectors)


def eval_forward(x, y, outer, channels, inner, running_mean, running_var, weight, bias,
                 eps, relu=False):
    """See fastbn/_bn.pyx: eval_forward.  Returns (y, x) or None."""
    if not is_kernel_input(x, outer * channels * inner):
        return None
    if _bf16_bn.is_bfloat16(x):
        if (running_mean is None or running_var is None or not _vectors_ready(
                channels, np.float32, running_mean, running_var, weight, bias)):
            return None
        return _bf16_bn.eval_forward(x, y, outer, channels, inner, running_mean, running_var,
                                     weight, bias, eps, relu), x
    if (running_mean is None or running_var is None
            or not _vectors_ready(channels, x.dtype, running_mean, running_var, weight, bias)):
        return None
    x__ocn = x.reshape(outer, channels, inner)
    invstd = 1 / np.sqrt(running_var + x.dtype.type(eps))
    y__ocn = _normalize(x__ocn, running_mean, invstd, weight, bias)
    if relu:
        np.maximum(y__ocn, y__ocn.dtype.type(0), out=y__ocn)   # NaN passes, as torch.relu
    return _deliver(y__ocn, y, x.shape), x


def train_forward(x, y, outer, channels, inner, weight, bias, eps, running_mean, running_var,
                  momentum, relu=False, counter=None):
    """See fastbn/_bn.pyx: train_forward.  Returns (y, saved_mean,
    saved_invstd, x) or None."""
    if not is_kernel_input(x, outer * channels * inner):
        return None
    dtype = np.dtype(np.float32) if _bf16_bn.is_bfloat16(x) else x.dtype
    if not _vectors_ready(channels, dtype, weight, bias, running_mean, running_var):
        return None
    if (running_mean is None) != (running_var is None) or not (
            running_mean is None
            or (running_mean.flags.writeable and running_var.flags.writeable)):
        return None
    if counter is not None and not is_counter(counter):
        return None
    if running_mean is not None and any(
            np.may_share_memory(stat, other) and np.shares_memory(stat, other)
            for stat, other in ((running_mean, running_var), (running_mean, x), (running_var, x),
                                (running_mean, weight), (running_var, weight),
                                (running_mean, bias), (running_var, bias))
            if other is not None):
        return None  # the bridge's test (written statistics apart from the inputs)
    if momentum is None:
        if counter is None:
            return None
        momentum = 1.0 / (int(counter) + 1)
    if _bf16_bn.is_bfloat16(x):
        backups = [a.copy() for a in (running_mean, running_var) if a is not None]
        try:
            y, mean, invstd = _bf16_bn.train_forward(x, y, outer, channels, inner, weight, bias,
                                                     eps, running_mean, running_var, momentum,
                                                     relu)
            if counter is not None and running_mean is not None:
                counter[...] += 1
        except BaseException:
            for target, backup in zip((running_mean, running_var), backups):
                target[...] = backup
            raise
        return y, mean, invstd, x
    # statistics and normalization in float64, outputs rounded once (torch's
    # CPU kernels also accumulate the statistics in double): a float32 mean
    # accumulated in float32 is off by far more than float32 rounding when
    # the mean is large (1e4 + N(0, 1)), and that error, times 1/std, lands
    # on every output
    x__ocn = x.reshape(outer, channels, inner).astype(np.float64, copy=False)
    mean = x__ocn.mean(axis=_REDUCE)
    centered = x__ocn - _per_channel(mean)
    var = (centered * centered).mean(axis=_REDUCE)
    invstd = 1 / np.sqrt(var + float(eps))
    y__ocn = _normalize(x__ocn, mean, invstd, weight, bias).astype(dtype, copy=False)
    if relu:
        np.maximum(y__ocn, dtype.type(0), out=y__ocn)
    result = _deliver(y__ocn, y, x.shape)
    if running_mean is not None:
        # r = (1 - m) * r + m * stat, with the unbiased variance for running_var
        n = outer * inner
        factor = dtype.type(momentum)
        keep = dtype.type(1) - factor
        _commit([(running_mean, keep * running_mean + factor * mean),
                 (running_var, keep * running_var + factor * (var * dtype.type(n / (n - 1))))],
                counter)
    return result, mean.astype(dtype), invstd.astype(dtype), x


def backward(dy, x, dx, outer, channels, inner, mean, invstd, weight, dweight, dbias,
             accumulate, bias=None, relu=False):
    """See fastbn/_bn.pyx: backward.  Returns dx or None."""
    size = outer * channels * inner
    if not (is_kernel_input(x, size) and is_kernel_input(dy, size) and dy.dtype == x.dtype):
        return None
    dtype = x.dtype
    if _bf16_bn.is_bfloat16(x):
        if (mean is None or invstd is None
                or not _vectors_ready(channels, np.float32, mean, invstd, weight,
                                      bias if relu else None)
                or not _written_ready(channels, np.float32, dweight, dbias)):
            return None
        return _bf16_bn.backward(dy, x, dx, outer, channels, inner, mean, invstd, weight,
                                 dweight, dbias, accumulate, bias, relu)
    if (mean is None or invstd is None
            or not _vectors_ready(channels, dtype, mean, invstd, weight, bias if relu else None)
            or not _written_ready(channels, dtype, dweight, dbias)):
        return None
    x__ocn = x.reshape(outer, channels, inner)
    dy__ocn = dy.reshape(outer, channels, inner)
    if relu:
        dy__ocn = _relu_mask(dy__ocn, x__ocn, mean, invstd, weight, bias)
    xhat = (x__ocn - _per_channel(mean)) * _per_channel(invstd)
    sum_dy = dy__ocn.sum(axis=_REDUCE)
    sum_dy_xhat = (dy__ocn * xhat).sum(axis=_REDUCE)
    n = dtype.type(outer * inner)
    scale = invstd if weight is None else weight * invstd
    dx__ocn = (_per_channel(scale) / n
               * (n * dy__ocn - _per_channel(sum_dy) - xhat * _per_channel(sum_dy_xhat)))
    writes = _gradient_writes(dweight, dbias, sum_dy_xhat, sum_dy, accumulate)
    result = _deliver(dx__ocn, dx, x.shape)
    _commit(writes)
    return result


def backward_eval(dy, x, dx, outer, channels, inner, running_mean, running_var, weight, eps,
                  dweight, dbias, accumulate, bias=None, relu=False):
    """See fastbn/_bn.pyx: backward_eval.  Returns dx or None."""
    size = outer * channels * inner
    needs_x = dweight is not None or dbias is not None or relu
    if not is_kernel_input(dy, size) or (
            needs_x and not (is_kernel_input(x, size) and x.dtype == dy.dtype)):
        return None
    dtype = dy.dtype
    if _bf16_bn.is_bfloat16(dy):
        if (running_mean is None or running_var is None
                or not _vectors_ready(channels, np.float32, running_mean, running_var, weight,
                                      bias if relu else None)
                or not _written_ready(channels, np.float32, dweight, dbias)):
            return None
        return _bf16_bn.backward_eval(dy, x, dx, outer, channels, inner, running_mean,
                                      running_var, weight, eps, dweight, dbias, accumulate,
                                      bias, relu)
    if (running_mean is None or running_var is None
            or not _vectors_ready(channels, dtype, running_mean, running_var, weight,
                                  bias if relu else None)
            or not _written_ready(channels, dtype, dweight, dbias)):
        return None
    dy__ocn = dy.reshape(outer, channels, inner)
    invstd = 1 / np.sqrt(running_var + dtype.type(eps))
    if needs_x:
        x__ocn = x.reshape(outer, channels, inner)
    if relu:
        dy__ocn = _relu_mask(dy__ocn, x__ocn, running_mean, invstd, weight, bias)
    scale = invstd if weight is None else weight * invstd
    dx__ocn = dy__ocn * _per_channel(scale)
    writes = []
    if dweight is not None or dbias is not None:
        xhat = (x__ocn - _per_channel(running_mean)) * _per_channel(invstd)
        writes = _gradient_writes(dweight, dbias, (dy__ocn * xhat).sum(axis=_REDUCE),
                                  dy__ocn.sum(axis=_REDUCE), accumulate)
    result = _deliver(dx__ocn, dx, dy.shape)
    _commit(writes)
    return result


# section: split phases ------------------------------------------------------------
# Called only with validated arrays (fastbn.functional's phase implementations
# check every argument first): per-channel statistics and sums are float64 or
# the input's dtype, and come back float64.


def _float64_per_channel(vector, default: float):
    """`vector` as float64 shaped (1, C, 1) (a scalar if None)."""
    if vector is None:
        return default
    return _per_channel(np.asarray(vector, np.float64))


def _xhat64(x__ocn, mean, invstd):
    return ((x__ocn.astype(np.float64) - _float64_per_channel(mean, 0.0))
            * _float64_per_channel(invstd, 1.0))


def _gradient64(dy__ocn, xhat, mask_weight, mask_bias, relu):
    """dy in float64, zeroed where the forward's ReLU had pre-activation <= 0."""
    g = dy__ocn.astype(np.float64)
    if not relu:
        return g
    pre = xhat * _float64_per_channel(mask_weight, 1.0) + _float64_per_channel(mask_bias, 0.0)
    return np.where(pre > 0, g, 0.0)


def _channel_slice(channel_range, channels, inner) -> slice:
    """The channels of a `channel_range` (first, stop), checked as the
    bridge checks it (bounds; a sub-range only with inner > 1)."""
    if channel_range is None:
        return slice(0, channels)
    first, stop = channel_range
    if not 0 <= first < stop <= channels:
        raise ValueError(f"channel_range: expected 0 <= first < stop <= channels "
                         f"({channels}), got {channel_range!r}")
    if inner <= 1 and (first, stop) != (0, channels):
        raise ValueError(f"channel_range: a channel sub-range needs a planar input (inner > "
                         f"1), got inner={inner}")
    return slice(first, stop)


def _sliced(part, *vectors):
    return [None if v is None else np.asarray(v)[part] for v in vectors]


def stats(x, outer, channels, inner, channel_range=None):
    """See fastbn/_bn.pyx: stats.  Returns (mean, m2), float64."""
    part = _channel_slice(channel_range, channels, inner)
    x__ocn = x.reshape(outer, channels, inner)[:, part].astype(np.float64)
    mean = x__ocn.mean(axis=_REDUCE)
    centered = x__ocn - _per_channel(mean)
    return mean, (centered * centered).sum(axis=_REDUCE)


def merge_stats(counts, means, m2s):
    """See fastbn/_bn.pyx: merge_stats.  The direct formula
    ``mean = sum(n_i * mean_i) / n``, ``m2 = sum(m2_i + n_i * (mean_i - mean)**2)``
    over the parts with n_i > 0.  Returns (count, mean, m2)."""
    present = [i for i, n in enumerate(counts) if n > 0]
    total = sum(counts)
    if total == 0:
        return 0, np.zeros(means.shape[1]), np.zeros(means.shape[1])
    weights = np.array([counts[i] for i in present], np.float64)[:, None]
    means, m2s = means[present], m2s[present]
    mean = (weights * means).sum(axis=0) / total
    m2 = (m2s + weights * (means - mean) ** 2).sum(axis=0)
    return total, mean, m2


def _deliver_range(result__ocn, out, outer, channels, inner, part, like):
    """The whole result, or with a channel sub-range written into `out`'s
    channels `part` (out required)."""
    if part == slice(0, channels):
        return _deliver(result__ocn.astype(like.dtype, copy=False), out, like.shape)
    out.reshape(outer, channels, inner)[:, part] = result__ocn
    return out


def apply(x, y, outer, channels, inner, mean, invstd, weight, bias, relu=False,
          channel_range=None):
    """See fastbn/_bn.pyx: apply.  Returns y."""
    part = _channel_slice(channel_range, channels, inner)
    mean, invstd, weight, bias = _sliced(part, mean, invstd, weight, bias)
    x__ocn = x.reshape(outer, channels, inner)[:, part]
    y__ocn = (_xhat64(x__ocn, mean, invstd) * _float64_per_channel(weight, 1.0)
              + _float64_per_channel(bias, 0.0))
    if relu:
        y__ocn = np.maximum(y__ocn, 0.0)   # NaN passes through, as in torch.relu
    return _deliver_range(y__ocn.astype(x.dtype, copy=False), y, outer, channels, inner, part,
                          x)


def backward_reduce(dy, x, outer, channels, inner, mean, invstd, mask_weight=None,
                    mask_bias=None, relu=False, channel_range=None):
    """See fastbn/_bn.pyx: backward_reduce.  Returns (sum_dy, sum_dy_xhat), float64."""
    part = _channel_slice(channel_range, channels, inner)
    mean, invstd, mask_weight, mask_bias = _sliced(part, mean, invstd, mask_weight, mask_bias)
    xhat = _xhat64(x.reshape(outer, channels, inner)[:, part], mean, invstd)
    g = _gradient64(dy.reshape(outer, channels, inner)[:, part], xhat, mask_weight, mask_bias,
                    relu)
    return g.sum(axis=_REDUCE), (g * xhat).sum(axis=_REDUCE)


def backward_apply(dy, x, dx, outer, channels, inner, mean, invstd, weight, sum_dy,
                   sum_dy_xhat, count, mask_weight=None, mask_bias=None, relu=False,
                   channel_range=None):
    """See fastbn/_bn.pyx: backward_apply.  Returns dx."""
    part = _channel_slice(channel_range, channels, inner)
    mean, invstd, weight, sum_dy, sum_dy_xhat, mask_weight, mask_bias = _sliced(
        part, mean, invstd, weight, sum_dy, sum_dy_xhat, mask_weight, mask_bias)
    n = float(count)
    xhat = _xhat64(x.reshape(outer, channels, inner)[:, part], mean, invstd)
    g = _gradient64(dy.reshape(outer, channels, inner)[:, part], xhat, mask_weight, mask_bias,
                    relu)
    scale = _float64_per_channel(weight, 1.0) * _float64_per_channel(invstd, 1.0)
    dx__ocn = scale / n * (n * g - _float64_per_channel(sum_dy, 0.0)
                           - xhat * _float64_per_channel(sum_dy_xhat, 0.0))
    return _deliver_range(dx__ocn.astype(x.dtype, copy=False), dx, outer, channels, inner,
                          part, dy)


def _no_shortcut(*args, **kwargs) -> None:
    """The `*_at` methods: the bridge's one-crossing path for plain valid
    arguments.  The NumPy kernels take no shortcut (None: the caller runs the
    validators, then the explicit-geometry method), so the reference backend
    validates every call in full."""
    return None


class ReferenceKernels:
    """The NumPy kernels object selected by ``use_backend("reference")``."""

    name = "reference"
    eval_forward = staticmethod(eval_forward)
    train_forward = staticmethod(train_forward)
    backward = staticmethod(backward)
    backward_eval = staticmethod(backward_eval)
    eval_forward_at = train_forward_at = backward_at = backward_eval_at = \
        staticmethod(_no_shortcut)
    stats = staticmethod(stats)
    merge_stats = staticmethod(merge_stats)
    apply = staticmethod(apply)
    backward_reduce = staticmethod(backward_reduce)
    backward_apply = staticmethod(backward_apply)
    optim_plan = staticmethod(_optim_kernels.optim_plan)
    grad_norm = staticmethod(_optim_kernels.grad_norm)
    scale_grads = staticmethod(_optim_kernels.scale_grads)
    lerp_ = staticmethod(_optim_kernels.lerp_)


REFERENCE = ReferenceKernels()
