"""`Linear`: y = x W^T + b, with torch's weight layout (out_features, in_features)
so that a torch state_dict converted with ``.numpy()`` loads as is."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .._validation import (as_float_array, check_float_dtype, check_grad_target, check_int,
                           check_same_dtype)
from ..parameter import Parameter
from . import init as initializers
from .init import RandomState
from .module import Module, accumulate_grads

__all__ = ["Linear"]

INITS = ("kaiming", "kaiming_uniform", "xavier", "xavier_normal", "torch")


class Linear(Module):
    """Fully connected layer (torch.nn.Linear): ``y = x @ weight.T + bias``.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool, default True
    init : str, default 'kaiming'
        Weight initialization:

        - 'kaiming': He et al. normal, std = sqrt(2 / in_features) (for ReLU
          networks); bias zero.
        - 'kaiming_uniform': He uniform, bound sqrt(6 / in_features); bias zero.
        - 'xavier': Glorot uniform, bound sqrt(6 / (in + out)) (for tanh or
          linear layers); bias zero.
        - 'xavier_normal': Glorot normal, std sqrt(2 / (in + out)); bias zero.
        - 'torch': torch.nn.Linear's default, weight and bias
          U(-1/sqrt(in_features), 1/sqrt(in_features)).
    rng : None, int or numpy.random.Generator, keyword-only
        Source of the initial weights: a seed, or a Generator shared by
        several layers (each layer advances it), or None for fresh entropy.
    dtype : float32 or float64, keyword-only, default float32

    Attributes
    ----------
    weight : Parameter (out_features, in_features)
    bias : Parameter (out_features,) or None

    Shapes: input (*, in_features) -> output (*, out_features).
    ``backward(dy)`` returns dx and adds dy^T x to ``weight.grad`` and the sum
    of dy to ``bias.grad`` (creating them when None).  Existing grads must
    have the parameter's shape and dtype (TypeError for another dtype, never
    a silent upcast) and be writeable; both are checked before either is
    written, and both change or neither does.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 init: str = "kaiming", rng: RandomState = None, dtype=np.float32) -> None:
        super().__init__()
        self.in_features = check_int(in_features, "in_features", minimum=1)
        self.out_features = check_int(out_features, "out_features", minimum=1)
        if init not in INITS:
            raise ValueError(f"init: expected one of {INITS}, got {init!r}")
        dtype = check_float_dtype(dtype)
        generator = initializers.as_generator(rng)
        weight = np.empty((self.out_features, self.in_features), dtype=dtype)
        bias_data = np.zeros(self.out_features, dtype=dtype) if bias else None
        if init == "kaiming":
            initializers.kaiming_normal_(weight, rng=generator)
        elif init == "kaiming_uniform":
            initializers.kaiming_uniform_(weight, rng=generator)
        elif init == "xavier":
            initializers.xavier_uniform_(weight, rng=generator)
        elif init == "xavier_normal":
            initializers.xavier_normal_(weight, rng=generator)
        else:
            bound = 1.0 / math.sqrt(self.in_features)
            weight[...] = generator.uniform(-bound, bound, size=weight.shape)
            if bias_data is not None:
                bias_data[...] = generator.uniform(-bound, bound, size=bias_data.shape)
        self.weight = Parameter(weight)
        self.bias: Optional[Parameter] = Parameter(bias_data) if bias else None
        self._input: Optional[np.ndarray] = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = as_float_array(x, "input")
        check_same_dtype("input", x, "the layer's weight", self.weight.data.dtype)
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"input: expected shape (*, {self.in_features}) "
                             f"(in_features={self.in_features}), got shape {x.shape}")
        self._input = x
        y = np.matmul(x, self.weight.data.T)
        if self.bias is not None:
            y += self.bias.data
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        x = self._input
        if x is None:
            raise RuntimeError("Linear.backward: call forward first")
        dy = as_float_array(dy, "dy")
        check_same_dtype("dy", dy, "the layer's weight", self.weight.data.dtype)
        expected = x.shape[:-1] + (self.out_features,)
        if dy.shape != expected:
            raise ValueError(f"dy: expected shape {expected} (the forward output's), got {dy.shape}")
        params = [("weight", self.weight)] + ([("bias", self.bias)] if self.bias is not None
                                               else [])
        for name, param in params:
            check_grad_target(f"{name}.grad", param.grad, param.data)
        dy_rows = dy.reshape(-1, self.out_features)
        x_rows = x.reshape(-1, self.in_features)
        dx = np.matmul(dy, self.weight.data)
        # computed in full before any grad is written; then written all or
        # nothing
        fresh = [np.ascontiguousarray(dy_rows.T @ x_rows)]
        if self.bias is not None:
            fresh.append(dy_rows.sum(axis=0))
        accumulate_grads([(param, grad) for (_, param), grad in zip(params, fresh)])
        return dx

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")
