"""Weight initializations (``torch.nn.init`` names), seedable.

Every function fills an array in place and returns it.  Randomness comes
from `rng`: a :class:`numpy.random.Generator`, an int seed, or None (fresh
OS entropy); pass one Generator to every layer of a model, or one seed per
layer, for reproducible models.

fan_in / fan_out of a weight of shape (out_features, in_features, *kernel)
are ``in_features * prod(kernel)`` and ``out_features * prod(kernel)``, as in
torch.
"""
from __future__ import annotations

import math
import numbers
from typing import Tuple, Union

import numpy as np

from .._validation import as_float_array, check_positive, describe

__all__ = ["RandomState", "as_generator", "calculate_gain", "kaiming_normal_",
           "kaiming_uniform_", "xavier_normal_", "xavier_uniform_", "zeros_", "ones_"]

#: What the `rng` argument of layers and init functions accepts.
RandomState = Union[None, int, np.random.Generator]

_GAINS = {"linear": 1.0, "identity": 1.0, "sigmoid": 1.0, "tanh": 5.0 / 3.0,
          "relu": math.sqrt(2.0), "selu": 0.75}


def as_generator(rng: RandomState, name: str = "rng") -> np.random.Generator:
    """A Generator from None, an int seed or a Generator (returned as is, so a
    Generator shared by several layers advances from one to the next)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        return np.random.default_rng()
    if isinstance(rng, bool) or not isinstance(rng, numbers.Integral) or rng < 0:
        raise TypeError(f"{name}: expected None, a non-negative int seed or a "
                        f"numpy.random.Generator, got {describe(rng)}")
    return np.random.default_rng(int(rng))


def calculate_gain(nonlinearity: str, param: float = 0.01) -> float:
    """Recommended gain for a nonlinearity (torch.nn.init.calculate_gain):
    'linear'/'identity'/'sigmoid' 1, 'tanh' 5/3, 'relu' sqrt(2),
    'leaky_relu' sqrt(2 / (1 + slope**2)), 'selu' 3/4."""
    if nonlinearity == "leaky_relu":
        slope = float(param)
        return math.sqrt(2.0 / (1.0 + slope * slope))
    if nonlinearity not in _GAINS:
        raise ValueError(f"nonlinearity: expected one of {sorted(_GAINS) + ['leaky_relu']}, "
                         f"got {nonlinearity!r}")
    return _GAINS[nonlinearity]


def _fans(array: np.ndarray) -> Tuple[int, int]:
    if array.ndim < 2:
        raise ValueError(f"weight: fan in and fan out need at least 2 dimensions "
                         f"(out_features, in_features, ...), got shape {array.shape}")
    receptive = int(np.prod(array.shape[2:], dtype=np.int64))
    return array.shape[1] * receptive, array.shape[0] * receptive


def _fan(array: np.ndarray, mode: str) -> int:
    fan_in, fan_out = _fans(array)
    if mode == "fan_in":
        return fan_in
    if mode == "fan_out":
        return fan_out
    raise ValueError(f"mode: expected 'fan_in' or 'fan_out', got {mode!r}")


def _fill_uniform(array: np.ndarray, bound: float, rng: RandomState) -> np.ndarray:
    array = as_float_array(array, "array")
    generator = as_generator(rng)
    array[...] = generator.uniform(-bound, bound, size=array.shape)
    return array


def _fill_normal(array: np.ndarray, std: float, rng: RandomState) -> np.ndarray:
    array = as_float_array(array, "array")
    generator = as_generator(rng)
    array[...] = generator.standard_normal(array.shape) * std
    return array


def kaiming_normal_(array: np.ndarray, a: float = 0.0, mode: str = "fan_in",
                    nonlinearity: str = "relu", rng: RandomState = None) -> np.ndarray:
    """He et al. (2015) normal init: N(0, std²), std = gain / sqrt(fan)."""
    std = calculate_gain(nonlinearity, a) / math.sqrt(_fan(array, mode))
    return _fill_normal(array, std, rng)


def kaiming_uniform_(array: np.ndarray, a: float = 0.0, mode: str = "fan_in",
                     nonlinearity: str = "relu", rng: RandomState = None) -> np.ndarray:
    """He et al. (2015) uniform init: U(-b, b), b = gain * sqrt(3 / fan)."""
    bound = calculate_gain(nonlinearity, a) * math.sqrt(3.0 / _fan(array, mode))
    return _fill_uniform(array, bound, rng)


def xavier_uniform_(array: np.ndarray, gain: float = 1.0, rng: RandomState = None) -> np.ndarray:
    """Glorot & Bengio (2010) uniform init: U(-b, b), b = gain * sqrt(6 / (fan_in + fan_out))."""
    gain = check_positive(gain, "gain")
    fan_in, fan_out = _fans(as_float_array(array, "array"))
    return _fill_uniform(array, gain * math.sqrt(6.0 / (fan_in + fan_out)), rng)


def xavier_normal_(array: np.ndarray, gain: float = 1.0, rng: RandomState = None) -> np.ndarray:
    """Glorot & Bengio (2010) normal init: std = gain * sqrt(2 / (fan_in + fan_out))."""
    gain = check_positive(gain, "gain")
    fan_in, fan_out = _fans(as_float_array(array, "array"))
    return _fill_normal(array, gain * math.sqrt(2.0 / (fan_in + fan_out)), rng)


def zeros_(array: np.ndarray) -> np.ndarray:
    array = as_float_array(array, "array")
    array.fill(0)
    return array


def ones_(array: np.ndarray) -> np.ndarray:
    array = as_float_array(array, "array")
    array.fill(1)
    return array
