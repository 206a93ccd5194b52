"""`Dropout` (torch.nn.Dropout): inverted dropout, seedable."""
from __future__ import annotations

from typing import Optional

import numpy as np

from .._validation import as_float_array, check_range, check_same_dtype
from .init import RandomState, as_generator
from .module import Module

__all__ = ["Dropout"]


class Dropout(Module):
    """In training, zero each element with probability `p` and scale the
    survivors by 1 / (1 - p); in eval mode, the identity.

    Parameters
    ----------
    p : float in [0, 1], default 0.5
    rng : None, int or numpy.random.Generator, keyword-only
        Source of the masks (a seed makes training reproducible).

    ``backward(dy)`` applies the forward's mask and scale to dy.
    """

    def __init__(self, p: float = 0.5, *, rng: RandomState = None) -> None:
        super().__init__()
        self.p = check_range(p, "p", 0.0, 1.0)
        self._rng = as_generator(rng)
        self._mask: Optional[np.ndarray] = None   # None: the forward was the identity
        self._shape = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = as_float_array(x, "input")
        self._shape = x.shape
        if not self.training or self.p == 0.0:
            self._mask = None
            return x
        if self.p == 1.0:
            mask = np.zeros(x.shape, dtype=x.dtype)
        else:
            keep = self._rng.random(x.shape, dtype=np.float32 if x.dtype == np.float32 else np.float64)
            mask = (keep >= self.p).astype(x.dtype)
            mask *= x.dtype.type(1.0 / (1.0 - self.p))
        self._mask = mask
        return x * mask

    def backward(self, dy: np.ndarray) -> np.ndarray:
        if self._shape is None:
            raise RuntimeError("Dropout.backward: call forward first")
        dy = as_float_array(dy, "dy")
        if dy.shape != self._shape:
            raise ValueError(f"dy: expected shape {self._shape} (the forward output's), got {dy.shape}")
        if self._mask is None:
            return dy
        check_same_dtype("dy", dy, "the forward input", self._mask.dtype)
        return dy * self._mask

    def extra_repr(self) -> str:
        return f"p={self.p}"
