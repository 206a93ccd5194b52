"""`Parameter`: a trainable array and its gradient."""
from __future__ import annotations

from typing import Optional

import numpy as np


class Parameter:
    """A trainable tensor: ``data`` (an ndarray updated in place by optimizers)
    and ``grad`` (an ndarray of the same shape and dtype, or None).

    Parameters
    ----------
    data : array_like
        Initial value. Kept as is when it is a C-contiguous native-order
        float32/float64 ndarray (no copy: the Parameter updates the caller's
        array).  Other layouts and byte-swapped float32/float64 are copied
        into a native-order array of the same precision.  Integer and bool
        data become float32 (exact for integers up to 2**24 in magnitude).
        ml_dtypes' bfloat16 is kept as well (for the optimizers that update
        bfloat16 parameters: SGD, Momentum, RMSprop, Adam, AdamW, Lion).
        Other float widths (float16, longdouble) and non-numeric dtypes
        raise TypeError: fastbn's kernels take float32 and float64 (and
        bfloat16 there) only, and a silent cast would change the values.
    grad : array_like or None, optional
        Initial gradient: same shape and dtype as data (TypeError otherwise,
        never a silent cast).
    """

    __slots__ = ("data", "grad")

    def __init__(self, data, grad: Optional[np.ndarray] = None) -> None:
        array = np.asarray(data)
        dtype = array.dtype
        if type(array) is not np.ndarray:   # np.matrix and other subclasses
            array = array.view(np.ndarray)
        if dtype.kind == "f":
            if dtype.itemsize not in (4, 8):
                raise TypeError(
                    f"Parameter data: expected float32 or float64 (or integer) data, got dtype "
                    f"{dtype}; convert it with .astype(np.float32) or .astype(np.float64)"
                )
            if not dtype.isnative:
                # same precision, native byte order: the kernels read native floats
                array = array.astype(dtype.newbyteorder("="))
        elif dtype.kind in "biu":
            array = array.astype(np.float32)
        elif dtype.kind == "V" and dtype.itemsize == 2 and dtype.name == "bfloat16":
            pass  # ml_dtypes' bfloat16, native by construction
        else:
            raise TypeError(
                f"Parameter data: expected a real numeric array (float32, float64 or integer), "
                f"got dtype {dtype}"
            )
        # np.ascontiguousarray would turn a 0-d array into shape (1,)
        self.data: np.ndarray = array if array.flags.c_contiguous else array.copy(order="C")
        self.grad: Optional[np.ndarray] = None
        if grad is not None:
            grad = np.asarray(grad)
            if grad.dtype != self.data.dtype:
                raise TypeError(
                    f"Parameter grad: expected dtype {self.data.dtype} (the dtype of data), "
                    f"got {grad.dtype}"
                )
            if grad.shape != self.data.shape:
                raise ValueError(
                    f"Parameter grad: expected shape {self.data.shape}, got {grad.shape}"
                )
            self.grad = grad if grad.flags.c_contiguous else grad.copy(order="C")

    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def size(self) -> int:
        return self.data.size

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradient (to None, or to zeros in place)."""
        if set_to_none or self.grad is None:
            self.grad = None
        else:
            self.grad.fill(0)

    def __repr__(self) -> str:
        has_grad = "None" if self.grad is None else "ndarray"
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype}, grad={has_grad})"
