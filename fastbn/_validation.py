"""Shared argument checks for every public function (fast and reference
backends alike), so the same bad input raises the same exception with the same
message whichever backend runs.

Rule for dtypes (one rule, applied everywhere): arrays are float32 or float64;
anything else raises TypeError. Arrays that meet in one operation (input and
running statistics, parameter and gradient, ``out=``) must share one dtype,
otherwise TypeError; fastbn never casts silently, because a silent cast
allocates a copy and hides a precision choice from the user.

Every message names the argument, what was expected and what was given.
"""
from __future__ import annotations

import numbers
from typing import Iterable, Optional, Sequence

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# Native float dtypes are singletons, so the hot paths below test identity
# first (`is`, no dtype comparison call) and fall back to the general check.
_FLOAT32, _FLOAT64 = FLOAT_DTYPES


def describe(value) -> str:
    """Short description of a value for error messages."""
    if isinstance(value, np.ndarray):
        return f"ndarray of shape {value.shape} and dtype {value.dtype}"
    return f"{type(value).__name__} {value!r}" if np.isscalar(value) else type(value).__name__


def as_float_array(value, name: str) -> np.ndarray:
    """Return `value` as an ndarray of float32/float64 without copying.

    Raises TypeError for non-arrays of non-real-float dtype (ints, complex,
    object, bool). Lists of floats are accepted and become float64 arrays.
    """
    if type(value) is np.ndarray:
        dtype = value.dtype
        if dtype is _FLOAT32 or dtype is _FLOAT64:
            return value
    if isinstance(value, np.ndarray):
        # a subclass (np.matrix, ...) would bring its own operator semantics
        # (matrix `*` is a matmul) into the kernels and the reference alike;
        # both backends work on the plain ndarray view
        array = value if type(value) is np.ndarray else np.asarray(value)
    elif isinstance(value, (list, tuple)) or np.isscalar(value):
        array = np.asarray(value)
        if array.dtype.kind in "iu":
            array = array.astype(np.float64)
    else:
        raise TypeError(f"{name}: expected a numpy.ndarray of float32 or float64, got {describe(value)}")
    if array.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {array.dtype}")
    return array


def check_same_dtype(name: str, array: np.ndarray, reference_name: str, dtype: np.dtype) -> None:
    if array.dtype != dtype:
        raise TypeError(
            f"{name}: expected dtype {np.dtype(dtype)} (the dtype of {reference_name}), got {array.dtype}"
        )


def check_shape(name: str, array: np.ndarray, shape: Sequence[int]) -> None:
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(array.shape)}")


def check_channel_vector(name: str, value, num_channels: int, dtype: np.dtype) -> Optional[np.ndarray]:
    """A per-channel vector (running stats, weight, bias): 1-D, length C, same dtype."""
    if value is None:
        return None
    if (type(value) is np.ndarray and value.dtype is dtype and value.ndim == 1
            and value.shape[0] == num_channels):
        return value
    array = as_float_array(value, name)
    if array.ndim != 1 or array.shape[0] != num_channels:
        raise ValueError(
            f"{name}: expected a 1-D array with {num_channels} elements (one per channel), "
            f"got shape {array.shape}"
        )
    check_same_dtype(name, array, "the input", dtype)
    return array


def check_axis(axis, ndim: int) -> int:
    """Channel axis: 1 (channels-first) or -1 / ndim-1 (channels-last). Returns 1 or ndim-1."""
    if type(axis) is int:
        if axis == 1 and ndim >= 2:
            return 1
        if axis == -1 and ndim >= 2:
            return ndim - 1
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis: expected an int (1 or -1), got {describe(axis)}")
    axis = int(axis)
    normalized = axis + ndim if axis < 0 else axis
    if normalized not in (1, ndim - 1) or not (0 <= normalized < ndim):
        raise ValueError(
            f"axis: expected 1 (channels-first) or -1 (channels-last) for a {ndim}-D input, got {axis}"
        )
    return normalized


def check_real(value, name: str) -> float:
    if type(value) is float:
        if value != value:
            raise ValueError(f"{name}: expected a number, got nan")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {describe(value)}")
    value = float(value)
    if value != value:
        raise ValueError(f"{name}: expected a number, got nan")
    return value


def check_positive(value, name: str, *, strict: bool = True) -> float:
    """A real number > 0 (strict) or >= 0."""
    value = check_real(value, name)
    if (strict and not value > 0) or (not strict and not value >= 0):
        raise ValueError(f"{name}: expected a value {'>' if strict else '>='} 0, got {value!r}")
    return value


def check_range(value, name: str, low: float, high: float, *,
                low_inclusive: bool = True, high_inclusive: bool = True) -> float:
    value = check_real(value, name)
    ok_low = value >= low if low_inclusive else value > low
    ok_high = value <= high if high_inclusive else value < high
    if not (ok_low and ok_high):
        interval = f"{'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
        raise ValueError(f"{name}: expected a value in {interval}, got {value!r}")
    return value


def check_flag(value, name: str) -> bool:
    """A bool (or numpy bool), returned as a Python bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {describe(value)}")
    return bool(value)


def check_int(value, name: str, *, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {describe(value)}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def check_out(out, name: str, shape: Sequence[int], dtype: np.dtype,
              inputs: Iterable[np.ndarray] = (), *, allow_identical: Iterable[np.ndarray] = ()) -> np.ndarray:
    """Validate a caller-provided output buffer.

    It must be a writeable C-contiguous ndarray of the right shape and dtype,
    and must not overlap any input, except that it may BE one of
    `allow_identical` (same memory, shape and strides: an in-place update).
    """
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {describe(out)}")
    check_shape(name, out, shape)
    check_same_dtype(name, out, "the input", dtype)
    if not out.flags.writeable:
        raise ValueError(f"{name}: expected a writeable array, got a read-only one")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array, got strides {out.strides}")
    identical_ok = list(allow_identical)
    for array in inputs:
        # may_share_memory is a cheap bounds test; the exact test runs only
        # when the bounds overlap
        if array is None or not np.may_share_memory(out, array) or not np.shares_memory(out, array):
            continue
        if any(_is_identical(out, other) for other in identical_ok if other is array):
            continue
        raise ValueError(f"{name}: must not overlap an input array (in-place is allowed only where documented)")
    return out


def _is_identical(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype)


# ---- layer hyperparameters and gradient targets -------------------------------


def check_float_dtype(dtype, name: str = "dtype") -> np.dtype:
    """float32 or float64 (as a np.dtype), from anything np.dtype accepts."""
    try:
        resolved = np.dtype(dtype)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected float32 or float64, got {describe(dtype)}") from None
    if resolved not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float32 or float64, got {resolved}")
    return resolved


def check_bool(value, name: str) -> bool:
    """A bool (or NumPy bool); ints are refused, as a typo guard."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {describe(value)}")
    return bool(value)


def check_grad_target(name: str, grad, like: np.ndarray) -> None:
    """An existing ``param.grad`` that a backward is about to add to: an
    ndarray of the parameter's shape and dtype (no silent upcast of the sum),
    writeable.  None (the backward creates it) passes."""
    if grad is None:
        return
    if not isinstance(grad, np.ndarray):
        raise TypeError(f"{name}: expected an ndarray or None, got {describe(grad)}")
    if grad.dtype != like.dtype:
        raise TypeError(f"{name}: expected dtype {like.dtype} (the dtype of the parameter), "
                        f"got {grad.dtype}")
    check_shape(name, grad, like.shape)
    if not grad.flags.writeable:
        raise ValueError(f"{name}: expected a writeable array (gradients accumulate in "
                         "place), got a read-only one")
