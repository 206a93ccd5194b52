"""Reference for the split-phase batch-norm primitives (`batch_norm_stats`
and after in `fastbn.functional`): the same functions, with identical
signatures and the same validation, on the NumPy kernels
(fastbn/reference/_kernels.py, "split phases": float64 whole-array NumPy,
two-pass statistics, the merge as one weighted sum over all parts).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np

from .. import functional as _entries
from ._kernels import REFERENCE


def batch_norm_stats(x: np.ndarray, *, axis: int = 1) -> Tuple[int, np.ndarray, np.ndarray]:
    """Reference for `fastbn.functional.batch_norm_stats`."""
    return _entries._stats(REFERENCE, x, axis)


def batch_norm_merge_stats(counts: Union[Sequence[int], np.ndarray],
                           means: Union[Sequence[np.ndarray], np.ndarray],
                           m2s: Union[Sequence[np.ndarray], np.ndarray]
                           ) -> Tuple[int, np.ndarray, np.ndarray]:
    """Reference for `fastbn.functional.batch_norm_merge_stats`."""
    return _entries._merge_stats(REFERENCE, counts, means, m2s)


def batch_norm_apply(x: np.ndarray, mean: np.ndarray, invstd: np.ndarray,
                     weight: Optional[np.ndarray] = None, bias: Optional[np.ndarray] = None,
                     *, axis: int = 1, relu: bool = False,
                     out: Optional[np.ndarray] = None) -> np.ndarray:
    """Reference for `fastbn.functional.batch_norm_apply`."""
    return _entries._apply(REFERENCE, x, mean, invstd, weight, bias, axis, relu, out)


def batch_norm_backward_reduce(dy: np.ndarray, x: np.ndarray, mean: np.ndarray,
                               invstd: np.ndarray, *, axis: int = 1,
                               relu_from: Optional[Tuple[Optional[np.ndarray],
                                                         Optional[np.ndarray]]] = None
                               ) -> Tuple[np.ndarray, np.ndarray]:
    """Reference for `fastbn.functional.batch_norm_backward_reduce`."""
    return _entries._backward_reduce(REFERENCE, dy, x, mean, invstd, axis, relu_from)


def batch_norm_backward_apply(dy: np.ndarray, x: np.ndarray, mean: np.ndarray,
                              invstd: np.ndarray, weight: Optional[np.ndarray],
                              sum_dy: np.ndarray, sum_dy_xhat: np.ndarray, count: int, *,
                              axis: int = 1,
                              relu_from: Optional[Tuple[Optional[np.ndarray],
                                                        Optional[np.ndarray]]] = None,
                              out: Optional[np.ndarray] = None) -> np.ndarray:
    """Reference for `fastbn.functional.batch_norm_backward_apply`."""
    return _entries._backward_apply(REFERENCE, dy, x, mean, invstd, weight, sum_dy,
                                    sum_dy_xhat, count, axis, relu_from, out)
