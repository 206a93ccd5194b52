"""`Flatten` (torch.nn.Flatten): merge a range of dimensions into one."""
from __future__ import annotations

import numpy as np

from .._validation import as_float_array, check_int
from .module import Module

__all__ = ["Flatten"]


class Flatten(Module):
    """Reshape (N, d1, d2, ...) to (N, d1 * d2 * ...) (dimensions `start_dim`
    to `end_dim`, inclusive, negative counting from the end).  A view when
    the input allows it; ``backward(dy)`` reshapes dy back."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1) -> None:
        super().__init__()
        self.start_dim = check_int(start_dim, "start_dim")
        self.end_dim = check_int(end_dim, "end_dim")
        self._shape = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = as_float_array(x, "input")
        ndim = max(x.ndim, 1)
        start = self.start_dim + ndim if self.start_dim < 0 else self.start_dim
        end = self.end_dim + ndim if self.end_dim < 0 else self.end_dim
        if not (0 <= start < ndim and 0 <= end < ndim) or start > end:
            raise ValueError(f"Flatten: start_dim={self.start_dim} and end_dim={self.end_dim} do "
                             f"not select a range of the {x.ndim}-D input's dimensions")
        self._shape = x.shape
        if x.ndim == 0:
            return x.reshape(1)
        return x.reshape(x.shape[:start] + (-1,) + x.shape[end + 1:])

    def backward(self, dy: np.ndarray) -> np.ndarray:
        if self._shape is None:
            raise RuntimeError("Flatten.backward: call forward first")
        dy = as_float_array(dy, "dy")
        if dy.size != int(np.prod(self._shape, dtype=np.int64)):
            raise ValueError(f"dy: expected {int(np.prod(self._shape))} elements (input shape "
                             f"{self._shape}), got shape {dy.shape}")
        return dy.reshape(self._shape)

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"
