"""`ReLU` (torch.nn.ReLU): y = max(x, 0); the gradient passes where y > 0."""
from __future__ import annotations

from typing import Optional

import numpy as np

from .._validation import as_float_array, check_same_dtype
from .module import Module

__all__ = ["ReLU"]


class ReLU(Module):
    """Rectified linear unit, ``y = max(x, 0)``.

    ``backward(dy)`` returns ``dy * (y > 0)`` (torch's choice at 0: no
    gradient).  NaN inputs stay NaN, as in torch.
    """

    def __init__(self) -> None:
        super().__init__()
        self._output: Optional[np.ndarray] = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = as_float_array(x, "input")
        # np.maximum propagates NaN (torch.relu does too)
        y = np.maximum(x, x.dtype.type(0))
        self._output = y
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        y = self._output
        if y is None:
            raise RuntimeError("ReLU.backward: call forward first")
        dy = as_float_array(dy, "dy")
        check_same_dtype("dy", dy, "the forward input", y.dtype)
        if dy.shape != y.shape:
            raise ValueError(f"dy: expected shape {y.shape} (the forward output's), got {dy.shape}")
        return np.where(y > 0, dy, dy.dtype.type(0))
