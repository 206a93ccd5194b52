"""Stateless batch normalization (``torch.nn.functional`` semantics) and the
training pieces for code without autograd.

- `batch_norm`: torch's ``F.batch_norm``; in training it uses batch
  statistics and updates the running statistics in place.
- `batch_norm_forward_train`: the training forward that also returns the
  per-channel ``saved_mean`` and ``saved_invstd`` the backward needs.
- `batch_norm_backward`: gradients of a training-mode forward.
- `batch_norm_backward_eval`: gradients of an eval-mode forward (running
  statistics, which are constants for the backward).
- `batch_norm_relu`, `batch_norm_relu_forward_train`,
  `batch_norm_relu_backward`, `batch_norm_relu_backward_eval`: the same four
  with a ReLU fused after the normalization (one pass; the backward
  recomputes the ReLU mask from x).
- `batch_norm_stats`, `batch_norm_merge_stats`, `batch_norm_apply`,
  `batch_norm_backward_reduce`, `batch_norm_backward_apply`: the training
  forward and backward split at their per-channel sums (torch's
  SyncBatchNorm split), so that the statistics of several parts of a batch
  (processes) can be combined in between.

Every function validates its arguments once (fastbn._bn_validation), then
calls the current kernels object (fastbn._backend): the C kernels, or their
NumPy twins under ``fastbn.use_backend("reference")``.  `fastbn.reference`
has a twin of each function with the same signature, on the NumPy kernels.
Inputs may have any strides (non-contiguous ones are copied once); outputs passed as ``out=`` must be
C-contiguous.

Numerics: batch statistics are sums in float64 of values shifted by one value
of their channel (short runs of up to 8 values are summed in the input dtype
first), so float32 data with a large mean (1e4 + N(0, 1)) keeps a variance
accurate to float64 level.  The normalization is one subtraction and one
fused multiply-add per element, ``y = (x - mean) * scale + shift`` with
``scale = weight * invstd`` rounded to the input dtype: ``x - mean`` is exact
near the mean, so a large mean costs no precision and a constant channel
gives exactly `bias`.  (The training forward subtracts the mean rounded to
the input dtype and puts the rounding into ``shift``; the fused ReLU variant
cannot, since its backward recomputes the ReLU mask from the saved mean, so
its error includes that rounding, at most half an ulp of the mean times
``|scale|``.)  Results are bit-identical for any thread count.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np

from ._backend import current_kernels
from ._bn_validation import (channel_dtype, check_apply_args, check_backward_apply_args,
                             check_backward_args, check_backward_reduce_args,
                             check_batch_norm_args, check_gradient_outs,
                             check_merge_stats_args, check_stats_args)

__all__ = ["batch_norm", "batch_norm_forward_train", "batch_norm_backward",
           "batch_norm_backward_eval", "batch_norm_relu", "batch_norm_relu_forward_train",
           "batch_norm_relu_backward", "batch_norm_relu_backward_eval",
           "batch_norm_stats", "batch_norm_merge_stats", "batch_norm_apply",
           "batch_norm_backward_reduce", "batch_norm_backward_apply"]


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
        IN (eval) / IN-OUT (training: updated in place,
        ``r = (1 - momentum) * r + momentum * batch_stat``, with the UNBIASED
        batch variance for ``running_var``).  Both or neither; None means batch
        statistics are used in eval too.
    weight, bias : ndarray (C,) or None
        IN.  The affine parameters (None means 1 and 0).
    training : bool
        Use batch statistics (and update running stats) instead of running stats.
    momentum : float
        Running-average factor in [0, 1].  torch's cumulative average
        (``momentum=None`` on a layer) is ``momentum=1/num_batches_tracked``
        here, since this function does not know the count; None is accepted
        only when nothing is updated.
    eps : float
        Added to the variance; > 0 when batch statistics are used.  With
        running statistics eps may be 0: where ``running_var + eps == 0`` the
        output is the IEEE value of ``(x - running_mean) / 0 * weight + bias``,
        on both backends: +-inf where x != running_mean, NaN where
        x == running_mean (0 * inf) or weight == 0 (torch's CPU kernel, which
        folds the mean into the shift, gives NaN for most of these).
    axis : int, keyword-only
        Channel axis: 1 (channels-first) or -1 (channels-last).
    out : ndarray or None, keyword-only
        OUT.  C-contiguous, same shape and dtype as x; may be x itself.

    Returns
    -------
    ndarray
        The normalized array (`out` when given), computed as
        ``(x - mean) * (weight / sqrt(var + eps)) + bias``: the mean is
        subtracted first, so a large mean costs no precision (a constant
        channel gives exactly `bias`).

    Raises
    ------
    TypeError
        Non-float input, or arrays of different dtypes.
    ValueError
        Wrong shapes, fewer than 2 values per channel (or an empty batch) with
        batch statistics, eps <= 0 with batch statistics, bad momentum, axis
        or `out`.
    """
    return _batch_norm(current_kernels(), x, running_mean, running_var, weight, bias, training,
                       momentum, eps, axis, out, False)



def batch_norm_forward_train(x: np.ndarray, weight: Optional[np.ndarray] = None,
                             bias: Optional[np.ndarray] = None, eps: float = 1e-5, *,
                             axis: int = 1, out: Optional[np.ndarray] = None,
                             running_mean: Optional[np.ndarray] = None,
                             running_var: Optional[np.ndarray] = None,
                             momentum: float = 0.1) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training-mode forward that also returns what the backward needs.

    Normalizes with the batch statistics of each channel (biased variance)
    and, when running statistics are given, updates them in place exactly as
    `batch_norm` does in training.

    Parameters
    ----------
    x : ndarray, float32 or float64, shape (N, C, *spatial) or (N, *spatial, C)
        IN.  At least 2 values per channel.  Any strides.
    weight, bias : ndarray (C,) or None
        IN.  Affine parameters (None means 1 and 0).
    eps : float
        > 0, added to the variance.
    axis : int, keyword-only
        Channel axis: 1 or -1.
    out : ndarray or None, keyword-only
        OUT.  C-contiguous, same shape and dtype as x; may be x itself.
    running_mean, running_var : ndarray (C,) or None, keyword-only
        IN-OUT.  Both or neither; updated in place with `momentum`.
    momentum : float, keyword-only
        Running-average factor in [0, 1] (``1/num_batches_tracked`` for a
        cumulative average).

    Returns
    -------
    y : ndarray
        The normalized array (`out` when given).
    saved_mean : ndarray (C,)
        Per-channel batch mean.
    saved_invstd : ndarray (C,)
        Per-channel ``1 / sqrt(biased_batch_var + eps)``.
    """
    return _forward_train(current_kernels(), x, weight, bias, eps, axis, out, running_mean,
                          running_var, momentum, False)



def batch_norm_backward(dy: np.ndarray, x: np.ndarray, mean: np.ndarray, invstd: np.ndarray,
                        weight: Optional[np.ndarray] = None, *, axis: int = 1,
                        out: Optional[np.ndarray] = None,
                        dweight_out: Optional[np.ndarray] = None,
                        dbias_out: Optional[np.ndarray] = None, accumulate: bool = False
                        ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of a training-mode batch norm (batch statistics).

    With ``xhat = (x - mean) * invstd`` and n values per channel::

        dbias   = sum(dy)
        dweight = sum(dy * xhat)
        dx      = weight * invstd / n * (n * dy - dbias - xhat * dweight)

    Parameters
    ----------
    dy : ndarray
        IN.  Gradient of the output; same shape and dtype as x.
    x : ndarray, float32 or float64
        IN.  The forward's input.
    mean, invstd : ndarray (C,)
        IN.  ``saved_mean`` and ``saved_invstd`` from `batch_norm_forward_train`.
    weight : ndarray (C,) or None
        IN.  The forward's weight (None means 1).
    axis : int, keyword-only
        Channel axis: 1 or -1 (as in the forward).
    out : ndarray or None, keyword-only
        OUT for dx.  C-contiguous, same shape and dtype as x; may be dy (or x)
        itself.
    dweight_out, dbias_out : ndarray (C,) or None, keyword-only
        OUT for dweight / dbias: writeable, C-contiguous, aligned, x's dtype
        (float32 for bfloat16 x), sharing no memory with any other argument
        or with each other.  The kernel writes the gradient straight into
        them (e.g. a parameter's existing gradient buffer); they are returned
        in place of new arrays.  An invalid one raises before anything is
        written.
    accumulate : bool, keyword-only
        Add the gradients to `dweight_out` / `dbias_out` instead of
        overwriting them (a gradient without a buffer is still returned as a
        new array).  Requires at least one of them.

    Returns
    -------
    dx : ndarray
        Gradient of the input (`out` when given).
    dweight, dbias : ndarray (C,)
        Gradients of weight and bias (computed even when weight is None;
        `dweight_out` / `dbias_out` when given).
    """
    return _backward(current_kernels(), dy, x, mean, invstd, weight, None, axis, out, False,
                     dweight_out, dbias_out, accumulate)



def batch_norm_backward_eval(dy: np.ndarray, x: np.ndarray, running_mean: np.ndarray,
                             running_var: np.ndarray, weight: Optional[np.ndarray] = None,
                             eps: float = 1e-5, *, axis: int = 1,
                             out: Optional[np.ndarray] = None,
                             dweight_out: Optional[np.ndarray] = None,
                             dbias_out: Optional[np.ndarray] = None, accumulate: bool = False
                             ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of an eval-mode batch norm (running statistics, constants).

    With ``invstd = 1 / sqrt(running_var + eps)``::

        dx      = dy * weight * invstd
        dweight = sum(dy * (x - running_mean) * invstd)
        dbias   = sum(dy)

    Parameters
    ----------
    dy : ndarray
        IN.  Gradient of the output; same shape and dtype as x.
    x : ndarray, float32 or float64
        IN.  The forward's input.
    running_mean, running_var : ndarray (C,)
        IN.  The statistics the forward used.
    weight : ndarray (C,) or None
        IN.  The forward's weight (None means 1).
    eps : float
        >= 0, as in the forward.
    axis : int, keyword-only
        Channel axis: 1 or -1.
    out : ndarray or None, keyword-only
        OUT for dx.  C-contiguous, same shape and dtype as x; may be dy itself.
    dweight_out, dbias_out, accumulate : keyword-only
        As in `batch_norm_backward` (OUT buffers for dweight / dbias, and
        whether to add into them).

    Returns
    -------
    dx : ndarray
        Gradient of the input (`out` when given).
    dweight, dbias : ndarray (C,)
        Gradients of weight and bias (computed even when weight is None;
        `dweight_out` / `dbias_out` when given).
    """
    return _backward_eval(current_kernels(), dy, x, running_mean, running_var, weight, None,
                          eps, axis, out, False, dweight_out, dbias_out, accumulate)


def batch_norm_relu(x: np.ndarray, running_mean: Optional[np.ndarray],
                    running_var: Optional[np.ndarray], weight: Optional[np.ndarray] = None,
                    bias: Optional[np.ndarray] = None, training: bool = False,
                    momentum: Optional[float] = 0.1, eps: float = 1e-5, *, axis: int = 1,
                    out: Optional[np.ndarray] = None) -> np.ndarray:
    """``relu(batch_norm(...))`` in one pass over the data.

    Same arguments, validation and running-statistics update as
    `batch_norm`; the output is ``max(y, 0)`` (NaN stays NaN, as in
    ``torch.relu``), written by the normalization's own store (no second
    pass, no temporary).

    Returns
    -------
    ndarray
        The activated array (`out` when given; `out` may be x).
    """
    return _batch_norm(current_kernels(), x, running_mean, running_var, weight, bias, training,
                       momentum, eps, axis, out, True)


def batch_norm_relu_forward_train(x: np.ndarray, weight: Optional[np.ndarray] = None,
                                  bias: Optional[np.ndarray] = None, eps: float = 1e-5, *,
                                  axis: int = 1, out: Optional[np.ndarray] = None,
                                  running_mean: Optional[np.ndarray] = None,
                                  running_var: Optional[np.ndarray] = None,
                                  momentum: float = 0.1
                                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training forward of batch norm + ReLU: `batch_norm_forward_train`,
    then ``max(y, 0)``, in one pass.

    Returns
    -------
    y : ndarray
        ``max(batch_norm(x), 0)`` (`out` when given).
    saved_mean, saved_invstd : ndarray (C,)
        For `batch_norm_relu_backward`.

    Notes
    -----
    The normalization uses the saved mean and invstd as rounded to the input
    dtype (the plain forward uses them in float64), so that the backward,
    which only has the saved values, recomputes exactly the forward's ReLU
    mask.  For float32 this moves y by about ``|mean * invstd| * 6e-8``.
    """
    return _forward_train(current_kernels(), x, weight, bias, eps, axis, out, running_mean,
                          running_var, momentum, True)


def batch_norm_relu_backward(dy: np.ndarray, x: np.ndarray, mean: np.ndarray,
                             invstd: np.ndarray, weight: Optional[np.ndarray] = None,
                             bias: Optional[np.ndarray] = None, *, axis: int = 1,
                             out: Optional[np.ndarray] = None,
                             dweight_out: Optional[np.ndarray] = None,
                             dbias_out: Optional[np.ndarray] = None, accumulate: bool = False
                             ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of `batch_norm_relu_forward_train`.

    `dy` is the gradient of the ReLU's output.  The ReLU mask is not stored:
    it is recomputed from x as ``(x - mean) * invstd * weight + bias > 0``
    (exactly where the forward's output is > 0), so the fused backward reads
    dy and x and writes dx, like `batch_norm_backward`, instead of also
    reading y and writing and re-reading a masked gradient.

    Parameters
    ----------
    dy, x, mean, invstd, weight, axis, out, dweight_out, dbias_out, accumulate
        As in `batch_norm_backward`.
    bias : ndarray (C,) or None
        IN.  The forward's bias (None means 0), needed for the mask.

    Returns
    -------
    dx : ndarray
        Gradient of the input (`out` when given; `out` may be dy or x).
    dweight, dbias : ndarray (C,)
        Gradients of weight and bias.
    """
    return _backward(current_kernels(), dy, x, mean, invstd, weight, bias, axis, out, True,
                     dweight_out, dbias_out, accumulate)


def batch_norm_relu_backward_eval(dy: np.ndarray, x: np.ndarray, running_mean: np.ndarray,
                                  running_var: np.ndarray, weight: Optional[np.ndarray] = None,
                                  bias: Optional[np.ndarray] = None, eps: float = 1e-5, *,
                                  axis: int = 1, out: Optional[np.ndarray] = None,
                                  dweight_out: Optional[np.ndarray] = None,
                                  dbias_out: Optional[np.ndarray] = None,
                                  accumulate: bool = False
                                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of an eval-mode `batch_norm_relu` (running statistics).

    As `batch_norm_backward_eval` (the same arguments, `dweight_out`,
    `dbias_out` and `accumulate` included), with dy masked where the eval forward's
    pre-activation ``(x - running_mean) * scale + bias`` is <= 0; `bias` is the forward's
    bias (None means 0).  x is always read (for the mask).
    """
    return _backward_eval(current_kernels(), dy, x, running_mean, running_var, weight, bias,
                          eps, axis, out, True, dweight_out, dbias_out, accumulate)


# section: shared implementations --------------------------------------------------
# Used by the functions above with the current kernels object and by their
# twins in fastbn.reference with the NumPy kernels: one check sequence per
# entry point for both backends.  relu: fused ReLU.


# Each first tries the kernels' `*_at` method, which reads the geometry from
# `axis` and runs the kernel when every argument is plain and valid (one
# bridge crossing); on None (nothing written) the validators run, raising
# the error or normalizing the arguments for the explicit-geometry kernel.


def _batch_norm(kernels, x, running_mean, running_var, weight, bias, training, momentum, eps,
                axis, out, relu):
    use_batch_stats = bool(training) or running_mean is None
    if use_batch_stats:
        result = kernels.train_forward_at(x, out, axis, weight, bias, eps, running_mean,
                                          running_var, momentum, relu)
    elif momentum is None or (type(momentum) is float and 0.0 <= momentum <= 1.0):
        # eval reads no momentum, but a bad one is still an error
        result = kernels.eval_forward_at(x, out, axis, running_mean, running_var, weight, bias,
                                         eps, relu)
    else:
        result = None
    if result is not None:
        return result[0]
    x, layout, eps, momentum, use_batch_stats, update, running_mean, running_var, weight, \
        bias, out = check_batch_norm_args(x, running_mean, running_var, weight, bias,
                                          use_batch_stats, momentum, eps, axis, out)
    if x.size == 0:
        return np.empty(x.shape, x.dtype) if out is None else out
    outer, channels, inner = layout.outer, layout.channels, layout.inner
    if use_batch_stats:
        if not update:
            running_mean = running_var = None
            momentum = 0.0
        return kernels.train_forward(x, out, outer, channels, inner, weight, bias, eps,
                                     running_mean, running_var, momentum, relu)[0]
    return kernels.eval_forward(x, out, outer, channels, inner, running_mean, running_var,
                                weight, bias, eps, relu)[0]


def _forward_train(kernels, x, weight, bias, eps, axis, out, running_mean, running_var,
                   momentum, relu):
    result = kernels.train_forward_at(x, out, axis, weight, bias, eps, running_mean,
                                      running_var, momentum, relu)
    if result is not None:
        return result[:3]
    x, layout, eps, momentum, _, update, running_mean, running_var, weight, bias, out = \
        check_batch_norm_args(x, running_mean, running_var, weight, bias, True, momentum,
                              eps, axis, out)
    if x.size == 0:  # no channels: nothing to compute
        empty = np.empty(0, channel_dtype(x.dtype))
        return (np.empty(x.shape, x.dtype) if out is None else out), empty, empty.copy()
    outer, channels, inner = layout.outer, layout.channels, layout.inner
    y, mean, invstd, _ = kernels.train_forward(x, out, outer, channels, inner, weight, bias, eps,
                                               running_mean, running_var,
                                               momentum if update else 0.0, relu)
    return y, mean, invstd


def _backward(kernels, dy, x, mean, invstd, weight, bias, axis, out, relu,
              dweight_out=None, dbias_out=None, accumulate=False):
    if dweight_out is None and dbias_out is None and accumulate is False:
        result = kernels.backward_at(dy, x, out, axis, mean, invstd, weight, bias, relu)
        if result is not None:
            return result
    args = check_backward_args(dy, x, mean, invstd, weight, bias, None, axis, out,
                               eval_mode=False)
    return _run_backward(kernels, args, relu, dweight_out, dbias_out, accumulate)


def _backward_eval(kernels, dy, x, running_mean, running_var, weight, bias, eps, axis, out,
                   relu, dweight_out=None, dbias_out=None, accumulate=False):
    if dweight_out is None and dbias_out is None and accumulate is False:
        result = kernels.backward_eval_at(dy, x, out, axis, running_mean, running_var, weight,
                                          bias, eps, relu)
        if result is not None:
            return result
    args = check_backward_args(dy, x, running_mean, running_var, weight, bias, eps, axis, out,
                               eval_mode=True)
    return _run_backward(kernels, args, relu, dweight_out, dbias_out, accumulate)


def _run_backward(kernels, args, relu, dweight_out, dbias_out, accumulate):
    """The validated backward (training when ``args.eps`` is None): dx, and
    dweight and dbias written into (or, with `accumulate`, added to) the
    caller's buffers when given, into new arrays otherwise."""
    # every check (the gradient buffers' too) before anything is written
    kernel_dweight, kernel_dbias, accumulate = check_gradient_outs(dweight_out, dbias_out,
                                                                   accumulate, args)
    layout, dtype = args.layout, channel_dtype(args.x.dtype)
    dweight = np.empty(layout.channels, dtype) if kernel_dweight is None else kernel_dweight
    dbias = np.empty(layout.channels, dtype) if kernel_dbias is None else kernel_dbias
    if accumulate:  # only the caller's buffers are added to: a new array starts at 0
        for fresh, given in ((dweight, kernel_dweight), (dbias, kernel_dbias)):
            if given is None:
                fresh.fill(0)
    if args.x.size == 0:
        if not accumulate:
            dweight.fill(0)
            dbias.fill(0)
        dx = np.empty(args.x.shape, args.x.dtype) if args.out is None else args.out
    elif args.eps is None:
        dx = kernels.backward(args.dy, args.x, args.out, layout.outer, layout.channels,
                              layout.inner, args.stat_a, args.stat_b, args.weight, dweight,
                              dbias, accumulate, args.bias, relu)
    else:
        dx = kernels.backward_eval(args.dy, args.x, args.out, layout.outer, layout.channels,
                                   layout.inner, args.stat_a, args.stat_b, args.weight,
                                   args.eps, dweight, dbias, accumulate, args.bias, relu)
    return (dx, dweight if dweight_out is None else dweight_out,
            dbias if dbias_out is None else dbias_out)


# section: split-phase primitives ----------------------------------------------------
# The training forward and backward cut where torch's SyncBatchNorm cuts them:
#
#   forward:   batch_norm_stats (per part) -> batch_norm_merge_stats (all parts)
#              -> invstd = 1 / sqrt(m2 / count + eps) -> batch_norm_apply (per part)
#   backward:  batch_norm_backward_reduce (per part) -> add the sums over parts
#              -> batch_norm_backward_apply (per part, with the total count)
#
# The C phases are the fused kernels' own passes stopped at (or started from)
# their per-channel sums, which are float64 and bit-identical for any thread
# count; on a single part the composition reproduces `batch_norm_forward_train`
# and `batch_norm_backward` to rounding.


def batch_norm_stats(x: np.ndarray, *, axis: int = 1) -> Tuple[int, np.ndarray, np.ndarray]:
    """Per-channel count, mean and sum of squared deviations of a (part of a) batch.

    The forward's first phase.  The sums are accumulated in float64 around a
    value of each channel, in a fixed chunk order (bit-identical for any
    thread count); ``m2 / count`` is the biased batch variance that
    `batch_norm_forward_train` uses.

    Parameters
    ----------
    x : ndarray, float32 or float64, shape (N, C, *spatial) or (N, *spatial, C)
        IN.  Any strides.  May hold no values per channel (count 0).
    axis : int, keyword-only
        Channel axis: 1 or -1.

    Returns
    -------
    count : int
        Values per channel (``x.size // C``).
    mean : ndarray (C,) float64
        Per-channel mean (0 when count is 0).
    m2 : ndarray (C,) float64
        Per-channel ``sum((x - mean)**2)`` (0 when count is 0).
    """
    return _stats(current_kernels(), x, axis)


def batch_norm_merge_stats(counts: Union[Sequence[int], np.ndarray],
                           means: Union[Sequence[np.ndarray], np.ndarray],
                           m2s: Union[Sequence[np.ndarray], np.ndarray]
                           ) -> Tuple[int, np.ndarray, np.ndarray]:
    """Merge the `batch_norm_stats` of P parts of a batch into the whole batch's.

    Chan et al.'s parallel formula, applied to part 0, 1, 2, ... in that
    order (so the result depends only on the parts and their order).  Merging
    part b into the running total a::

        n    = na + nb
        d    = mb - ma
        mean = ma + d * nb / n
        m2   = m2a + m2b + d**2 * na * nb / n

    Parts with count 0 are skipped.  The arrays are tiny (P x C), so this runs
    in NumPy, in float64.

    Parameters
    ----------
    counts : sequence or ndarray of int, shape (P,)
        IN.  Values per channel of each part (>= 0), P >= 1.
    means, m2s : ndarray (P, C) (or a sequence of P (C,) arrays), float32 or float64
        IN.  Each part's mean and m2.

    Returns
    -------
    count : int
        Total values per channel.
    mean, m2 : ndarray (C,) float64
        Mean and m2 of the whole batch (0 where count is 0).
    """
    return _merge_stats(current_kernels(), counts, means, m2s)


def batch_norm_apply(x: np.ndarray, mean: np.ndarray, invstd: np.ndarray,
                     weight: Optional[np.ndarray] = None, bias: Optional[np.ndarray] = None,
                     *, axis: int = 1, relu: bool = False,
                     out: Optional[np.ndarray] = None) -> np.ndarray:
    """Normalize with given per-channel statistics (the forward's last phase).

    ``y = (x - mean) * invstd * weight + bias``, then ``max(y, 0)`` with
    `relu`; computed as `batch_norm_forward_train` computes it:
    ``(x - m) * scale + shift`` with ``m`` the mean rounded to x's dtype and
    ``scale`` rounded once from float64; the rounding of a float64 mean goes
    into ``shift``, except with `relu`, where ``shift`` is exactly ``bias``
    so that `batch_norm_backward_reduce` / `batch_norm_backward_apply` with
    ``relu_from`` recompute exactly this ReLU's mask.

    Parameters
    ----------
    x : ndarray, float32 or float64, shape (N, C, *spatial) or (N, *spatial, C)
        IN.  Any strides.
    mean, invstd : ndarray (C,), float64 or x's dtype
        IN.  E.g. the merged mean and ``1 / sqrt(m2 / count + eps)``.
    weight, bias : ndarray (C,) or None
        IN.  Affine parameters, x's dtype (None means 1 and 0).
    axis : int, keyword-only
        Channel axis: 1 or -1.
    relu : bool, keyword-only
        Fuse a ReLU (NaN passes through, as in ``torch.relu``).
    out : ndarray or None, keyword-only
        OUT.  C-contiguous, same shape and dtype as x; may be x itself.

    Returns
    -------
    ndarray
        The normalized array (`out` when given).
    """
    return _apply(current_kernels(), x, mean, invstd, weight, bias, axis, relu, out)


def batch_norm_backward_reduce(dy: np.ndarray, x: np.ndarray, mean: np.ndarray,
                               invstd: np.ndarray, *, axis: int = 1,
                               relu_from: Optional[Tuple[Optional[np.ndarray],
                                                         Optional[np.ndarray]]] = None
                               ) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel sums of the backward (its first phase).

    ``sum_dy = sum(dy)`` and ``sum_dy_xhat = sum(dy * xhat)`` with
    ``xhat = (x - mean) * invstd``, accumulated in float64 in a fixed chunk
    order (bit-identical for any thread count).  They are the gradients of
    bias and weight of this part; summed over the parts, they feed
    `batch_norm_backward_apply`.

    Parameters
    ----------
    dy : ndarray
        IN.  Gradient of the output; same shape and dtype as x.
    x : ndarray, float32 or float64
        IN.  The forward's input.
    mean, invstd : ndarray (C,), float64 or x's dtype
        IN.  The statistics the forward normalized with.
    axis : int, keyword-only
        Channel axis: 1 or -1.
    relu_from : (weight, bias) or None, keyword-only
        The forward's weight and bias when it fused a ReLU (`batch_norm_apply`
        with ``relu=True``): dy is then the gradient of the ReLU's output and
        is masked where the pre-activation ``(x - mean) * invstd * weight +
        bias`` is <= 0, recomputed from x as the fused backward does.

    Returns
    -------
    sum_dy, sum_dy_xhat : ndarray (C,) float64
    """
    return _backward_reduce(current_kernels(), dy, x, mean, invstd, axis, relu_from)


def batch_norm_backward_apply(dy: np.ndarray, x: np.ndarray, mean: np.ndarray,
                              invstd: np.ndarray, weight: Optional[np.ndarray],
                              sum_dy: np.ndarray, sum_dy_xhat: np.ndarray, count: int, *,
                              axis: int = 1,
                              relu_from: Optional[Tuple[Optional[np.ndarray],
                                                        Optional[np.ndarray]]] = None,
                              out: Optional[np.ndarray] = None) -> np.ndarray:
    """Gradient of the input from the backward's sums (its last phase).

    ::

        xhat = (x - mean) * invstd
        dx   = weight * invstd / count * (count * dy - sum_dy - xhat * sum_dy_xhat)

    computed as `batch_norm_backward` computes it.  With the sums and count
    of the whole batch (all parts), dx is the full-batch gradient.

    Parameters
    ----------
    dy, x : ndarray
        IN.  As in `batch_norm_backward_reduce`.
    mean, invstd : ndarray (C,), float64 or x's dtype
        IN.  The statistics the forward normalized with.
    weight : ndarray (C,) or None
        IN.  The forward's weight, x's dtype (None means 1).
    sum_dy, sum_dy_xhat : ndarray (C,), float64 or x's dtype
        IN.  `batch_norm_backward_reduce`'s sums, added over all parts.
    count : int
        Values per channel over all parts (>= 1), e.g. from
        `batch_norm_merge_stats`.
    axis : int, keyword-only
        Channel axis: 1 or -1.
    relu_from : (weight, bias) or None, keyword-only
        As in `batch_norm_backward_reduce` (dy is masked the same way).
    out : ndarray or None, keyword-only
        OUT for dx.  C-contiguous, same shape and dtype as x; may be dy or x.

    Returns
    -------
    dx : ndarray
        Gradient of the input (`out` when given).
    """
    return _backward_apply(current_kernels(), dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat,
                           count, axis, relu_from, out)


# section: shared implementations of the phases -------------------------------------
# As above: one check sequence per entry point, then the kernels object's
# phase method (fastbn.reference's twins pass the NumPy kernels).


def _stats(kernels, x, axis):
    x, layout = check_stats_args(x, axis)
    count = layout.n_per_channel
    if x.size == 0:
        return count, np.zeros(layout.channels), np.zeros(layout.channels)
    mean, m2 = kernels.stats(x, layout.outer, layout.channels, layout.inner)
    return count, mean, m2


def _merge_stats(kernels, counts, means, m2s):
    counts, means, m2s = check_merge_stats_args(counts, means, m2s)
    return kernels.merge_stats(counts, means, m2s)


def _apply(kernels, x, mean, invstd, weight, bias, axis, relu, out):
    x, layout, mean, invstd, weight, bias, relu, out = check_apply_args(
        x, mean, invstd, weight, bias, axis, relu, out)
    if x.size == 0:
        return np.empty(x.shape, x.dtype) if out is None else out
    return kernels.apply(x, out, layout.outer, layout.channels, layout.inner, mean, invstd,
                         weight, bias, relu)


def _backward_reduce(kernels, dy, x, mean, invstd, axis, relu_from):
    args = check_backward_reduce_args(dy, x, mean, invstd, axis, relu_from)
    layout = args.layout
    if args.x.size == 0:
        return np.zeros(layout.channels), np.zeros(layout.channels)
    mask_weight, mask_bias = args.relu_from or (None, None)
    return kernels.backward_reduce(args.dy, args.x, layout.outer, layout.channels,
                                   layout.inner, args.mean, args.invstd, mask_weight,
                                   mask_bias, args.relu_from is not None)


def _backward_apply(kernels, dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count, axis,
                    relu_from, out):
    args = check_backward_apply_args(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count,
                                     axis, relu_from, out)
    layout = args.layout
    if args.x.size == 0:
        return np.empty(args.x.shape, args.x.dtype) if args.out is None else args.out
    mask_weight, mask_bias = args.relu_from or (None, None)
    return kernels.backward_apply(args.dy, args.x, args.out, layout.outer, layout.channels,
                                  layout.inner, args.mean, args.invstd, args.weight,
                                  args.sum_dy, args.sum_dy_xhat, float(args.count),
                                  mask_weight, mask_bias, args.relu_from is not None)
