"""NumPy twin of the batch-norm kernels on bfloat16 activations.

x, y, dy and dx are ``ml_dtypes.bfloat16`` arrays; weight, bias, running
statistics, saved mean/invstd and the parameter gradients are float32, as in
torch's bf16 batch norm on CPU.  The bfloat16 values are widened to float32
(exact), the statistics and sums are taken in float64, and every output value
is computed by the same float32/float64 operations as the C kernels
(src_c/bn/bn_bf16_impl.h), then rounded to bfloat16 by `round_bf16`:

- statistics around the channel's first value c: d = x - c in float32,
  s1 = sum(d), s2 = sum(d * d) in float64; mean = c + s1 / n,
  var = max((s2 - s1 * (s1 / n)) / n, 0), invstd = 1 / sqrt(var + eps);
- forward: y = fma(x - m, k1, bias) (a float32 fused multiply-add, `fma32`),
  m the saved (float32) or running mean, k1 = f32(weight * invstd) with the
  saved float32 invstd (training) or 1 / sqrt(running_var + eps) in float64
  (eval);
- training backward: dx = fma(g, k1, fma(x - m, k2, k3)) with k1 = f32(a),
  k2 = f32(-a invstd sum(g xhat) / n), k3 = f32(-a sum(g) / n), a = w invstd;
- eval backward: dx = g * k1 in float32;
- ReLU: the forward stores max(y, 0); the backwards keep dy where the
  forward's float32 pre-activation is >= the smallest normal float32, exactly
  where the stored bfloat16 output is > 0.

Only the sums differ from the kernels: NumPy's pairwise float64 sums here,
fixed chunks there, and the kernels' channels-first sums (the statistics'
sums of d and d * d, and the backwards' of g and g * (x - m)) first add 8
values per lane in float32 (the products by a fused multiply-add) before
the float64 lane takes them, as the float32 kernels do; their channels-last
statistics do the same with 8 rows of each channel.  So on data whose
sums are exact (small dyadic values about an exact mean) every output is
bit-identical to the kernels'; on other data the float32 per-channel values
may differ in their last bits.

ml_dtypes is imported by the functions, not by this module: fastbn imports
without it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

_FLT_MIN = np.float32(np.finfo(np.float32).tiny)


def bfloat16():
    """The ml_dtypes bfloat16 scalar type (ImportError without ml_dtypes)."""
    import ml_dtypes
    return ml_dtypes.bfloat16


def is_bfloat16(array) -> bool:
    """True for an ndarray of ml_dtypes.bfloat16 (False without ml_dtypes)."""
    if not isinstance(array, np.ndarray) or array.dtype.kind != "V":
        return False
    try:
        return array.dtype == np.dtype(bfloat16())
    except (ImportError, AttributeError):
        return False


def round_bf16(values) -> np.ndarray:
    """float32 `values` rounded to bfloat16 as the kernels store them:
    nearest-even (ml_dtypes' cast), except that a subnormal float32 becomes a
    zero of its sign and a NaN becomes its top half with the quiet bit set
    (the AVX512_BF16 conversion instruction's rules)."""
    v = np.asarray(values, dtype=np.float32)
    bits = v.view(np.uint32)
    with np.errstate(invalid="ignore"):  # NaN lanes are set below
        out = v.astype(bfloat16()).view(np.uint16).copy()
    magnitude = bits & np.uint32(0x7FFFFFFF)
    subnormal = magnitude < np.uint32(0x00800000)
    out[subnormal] = ((bits[subnormal] >> np.uint32(16)) & np.uint32(0x8000)).astype(np.uint16)
    nan = magnitude > np.uint32(0x7F800000)
    out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return out.view(bfloat16())


def _widen(x, outer, channels, inner) -> np.ndarray:
    return np.asarray(x).reshape(outer, channels, inner).astype(np.float32)


def _col(vector) -> np.ndarray:
    return np.asarray(vector).reshape(1, -1, 1)


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _weight(weight, channels) -> np.ndarray:
    return np.ones(channels) if weight is None else _f64(weight)


def _bias32(bias, channels) -> np.ndarray:
    return np.zeros(channels, np.float32) if bias is None else np.asarray(bias, np.float32)


def fma32(a, b, c) -> np.ndarray:
    """float32 a * b + c rounded once (a fused multiply-add): the exact
    product and sum in float64, rounded to odd (an inexact result with an
    even last bit moves one ulp towards the exact value), then rounded to
    float32, which float64's extra precision makes exact."""
    a, b, c = np.broadcast_arrays(_f64(a), _f64(b), _f64(c))
    product = a * b                       # exact: 24 x 24 bits
    with np.errstate(invalid="ignore", over="ignore"):
        total = product + c
        back = total - product
        error = (product - (total - back)) + (c - back)
        bits = total.view(np.int64).copy()
        step = (error != 0) & ((bits & 1) == 0) & np.isfinite(total)
        bits[step] += np.where((error > 0) == (total > 0), 1, -1)[step]
        return bits.view(np.float64).astype(np.float32)


def _affine(xc, k1, k3) -> np.ndarray:
    return fma32(xc, _col(np.asarray(k1, np.float32)), _col(np.asarray(k3, np.float32)))


def _activate(v, relu) -> np.ndarray:
    return np.where(v < 0, np.float32(0), v) if relu else v


def _deliver(values32, out, shape):
    rounded = round_bf16(values32).reshape(shape)
    if out is None:
        return rounded
    out[...] = rounded
    return out


def _masked(dy32, xc, scale, shift, relu):
    if not relu:
        return dy32
    return np.where(_affine(xc, scale, shift) >= _FLT_MIN, dy32, np.float32(0))


def train_forward(x, y, outer, channels, inner, weight, bias, eps, running_mean, running_var,
                  momentum, relu=False) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y, saved_mean, saved_invstd); running statistics updated in place."""
    x32 = _widen(x, outer, channels, inner)
    center = x32.transpose(1, 0, 2).reshape(channels, -1)[:, 0]
    d = _f64(x32 - _col(center))
    n = outer * inner
    s1 = d.sum(axis=(0, 2))
    s2 = (d * d).sum(axis=(0, 2))
    var = (s2 - s1 * (s1 / n)) / n
    var = np.where(var < 0, 0.0, var)
    mean = _f64(center) + s1 / n
    saved_mean = mean.astype(np.float32)
    saved_invstd = (1.0 / np.sqrt(var + float(eps))).astype(np.float32)
    if running_mean is not None:
        m = float(momentum)
        running_mean[...] = ((1.0 - m) * _f64(running_mean) + m * mean).astype(np.float32)
        running_var[...] = ((1.0 - m) * _f64(running_var)
                            + m * var * (n / (n - 1.0))).astype(np.float32)
    k1 = (_weight(weight, channels) * _f64(saved_invstd)).astype(np.float32)
    v = _activate(_affine(x32 - _col(saved_mean), k1, _bias32(bias, channels)), relu)
    return _deliver(v, y, np.shape(x)), saved_mean, saved_invstd


def eval_forward(x, y, outer, channels, inner, running_mean, running_var, weight, bias, eps,
                 relu=False) -> np.ndarray:
    x32 = _widen(x, outer, channels, inner)
    invstd = 1.0 / np.sqrt(_f64(running_var) + float(eps))
    k1 = (_weight(weight, channels) * invstd).astype(np.float32)
    v = _activate(_affine(x32 - _col(np.asarray(running_mean, np.float32)), k1,
                          _bias32(bias, channels)), relu)
    return _deliver(v, y, np.shape(x))


def _gradients(dweight, dbias, new_dweight, new_dbias, accumulate):
    for target, value in ((dweight, new_dweight), (dbias, new_dbias)):
        if target is not None:
            base = _f64(target) if accumulate else 0.0
            target[...] = (base + value).astype(np.float32)


def backward(dy, x, dx, outer, channels, inner, mean, invstd, weight, dweight, dbias,
             accumulate, bias=None, relu=False) -> np.ndarray:
    """dx; dweight/dbias (float32, or None) written or added to."""
    x32 = _widen(x, outer, channels, inner)
    dy32 = _widen(dy, outer, channels, inner)
    xc = x32 - _col(np.asarray(mean, np.float32))
    w = _weight(weight, channels)
    invstd64 = _f64(invstd)
    g = _masked(dy32, xc, (w * invstd64).astype(np.float32), _bias32(bias, channels), relu)
    s1 = _f64(g).sum(axis=(0, 2))
    s2 = (_f64(g) * _f64(xc)).sum(axis=(0, 2))
    n = float(outer * inner)
    dw = s2 * invstd64
    a = w * invstd64
    k1 = a.astype(np.float32)
    k2 = (-a * invstd64 * dw / n).astype(np.float32)
    k3 = (-a * s1 / n).astype(np.float32)
    v = fma32(g, _col(k1), fma32(xc, _col(k2), _col(k3)))
    _gradients(dweight, dbias, dw, s1, accumulate)
    return _deliver(v, dx, np.shape(dy))


def backward_eval(dy, x, dx, outer, channels, inner, running_mean, running_var, weight, eps,
                  dweight, dbias, accumulate, bias=None, relu=False) -> np.ndarray:
    dy32 = _widen(dy, outer, channels, inner)
    invstd = 1.0 / np.sqrt(_f64(running_var) + float(eps))
    k1 = (_weight(weight, channels) * invstd).astype(np.float32)
    needs_x = relu or dweight is not None or dbias is not None
    xc: Optional[np.ndarray] = None
    if needs_x:
        xc = _widen(x, outer, channels, inner) - _col(np.asarray(running_mean, np.float32))
    g = _masked(dy32, xc, k1, _bias32(bias, channels), relu)
    if dweight is not None or dbias is not None:
        s1 = _f64(g).sum(axis=(0, 2))
        s2 = (_f64(g) * _f64(xc)).sum(axis=(0, 2))
        _gradients(dweight, dbias, s2 * invstd, s1, accumulate)
    return _deliver(g * _col(k1), dx, np.shape(dy))
