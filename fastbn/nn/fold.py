"""Folding eval-mode BatchNorm into the preceding Linear, for inference.

In eval mode BatchNorm is a per-feature affine map of the Linear's output,
``bn(z) = (z - running_mean) * s + bias`` with
``s = weight / sqrt(running_var + eps)``, so ``bn(x W^T + b)`` is itself a
Linear layer with ``W' = W * s`` (row-wise, per output feature) and
``b' = (b - running_mean) * s + bias``.  The folded model does one matrix
product per layer and no normalization pass.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Optional, Union

import numpy as np

from .._validation import describe
from .container import Sequential
from .linear import Linear
from .module import Module

__all__ = ["fold_batchnorm"]


def _batchnorm_classes():
    from .batchnorm import BatchNorm1d
    return BatchNorm1d


def _is_batchnorm1d(module) -> bool:
    return isinstance(module, _batchnorm_classes())


def _applies_relu(module) -> bool:
    """A fused BatchNorm+ReLU layer: folding leaves a ReLU behind."""
    return bool(getattr(module, "fused_relu", False))


def _fold_pair(linear: Linear, bn: Module) -> Linear:
    if not isinstance(linear, Linear):
        raise TypeError(f"linear: expected a fastbn.nn.Linear, got {describe(linear)}")
    if not _is_batchnorm1d(bn):
        raise TypeError(f"bn: expected a fastbn.nn.BatchNorm1d, got {describe(bn)}")
    if bn.num_features != linear.out_features:
        raise ValueError(f"bn: expected {linear.out_features} features (the Linear's "
                         f"out_features), got a BatchNorm1d of {bn.num_features}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn: has no running statistics (track_running_stats=False), so it "
                         "normalizes with batch statistics even in eval mode and cannot be folded")
    dtype = linear.weight.data.dtype
    if bn.running_mean.dtype != dtype:
        raise TypeError(f"bn: expected dtype {dtype} (the Linear's), got {bn.running_mean.dtype}")
    # computed in float64, rounded once to the layer's dtype
    scale = 1.0 / np.sqrt(bn.running_var.astype(np.float64) + bn.eps)
    if bn.weight is not None:
        scale *= bn.weight.data
    bias = np.zeros(linear.out_features) if linear.bias is None else linear.bias.data.astype(np.float64)
    bias = (bias - bn.running_mean) * scale
    if bn.bias is not None:
        bias += bn.bias.data
    folded = Linear(linear.in_features, linear.out_features, bias=True, rng=0, dtype=dtype)
    folded.weight.data[...] = linear.weight.data * scale[:, None]
    folded.bias.data[...] = bias
    folded.train(linear.training)
    return folded


def _fold_sequential(model: Sequential) -> Sequential:
    from .activation import ReLU
    modules = list(model._modules.items())
    folded: "OrderedDict[str, Module]" = OrderedDict()
    index = 0
    while index < len(modules):
        name, module = modules[index]
        following = modules[index + 1][1] if index + 1 < len(modules) else None
        if (isinstance(module, Linear) and _is_batchnorm1d(following)
                and following.running_mean is not None):
            folded[name] = _fold_pair(module, following)
            if _applies_relu(following):
                folded[modules[index + 1][0]] = ReLU()
            index += 2
            continue
        if isinstance(module, Sequential):
            folded[name] = _fold_sequential(module)
        else:
            folded[name] = copy.deepcopy(module)
        index += 1
    # renumber when the children were numbered by position (the usual case)
    names = [name for name, _ in modules]
    if names == [str(i) for i in range(len(names))]:
        return Sequential(*folded.values()).eval()
    return Sequential(folded).eval()


def fold_batchnorm(module: Union[Linear, Sequential], bn: Optional[Module] = None
                   ) -> Union[Linear, Sequential]:
    """Fold eval-mode BatchNorm1d layers into the Linear layers before them.

    Parameters
    ----------
    module : Linear or Sequential
        With `bn`: the Linear whose output `bn` normalizes.  Without: a
        Sequential in which every Linear directly followed by a BatchNorm1d
        (or a fused BatchNormReLU1d, which leaves a ReLU behind) is folded;
        nested Sequentials are folded too.
    bn : BatchNorm1d, optional
        Must have running statistics (``track_running_stats=True``) of the
        Linear's dtype and ``out_features`` features.

    Returns
    -------
    Linear or Sequential
        A NEW module (the inputs are not modified): with `bn`, a Linear with
        ``W' = W * s[:, None]`` and ``b' = (b - running_mean) * s + bn.bias``,
        ``s = bn.weight / sqrt(running_var + eps)``, computed in float64 and
        rounded once; for a Sequential, a copy in eval mode with the pairs
        replaced (renumbered "0", "1", ... when the children were numbered).

    Notes
    -----
    Only eval-mode outputs are preserved: training-mode BatchNorm uses batch
    statistics, which no fixed Linear reproduces.  The BatchNorm is assumed to
    normalize the Linear's output features, i.e. 2-D (N, features) inputs
    (or ``axis=-1``), which is how an MLP uses BatchNorm1d.
    """
    if bn is not None:
        return _fold_pair(module, bn)
    if isinstance(module, Sequential):
        return _fold_sequential(module)
    raise TypeError(f"fold_batchnorm: expected a Linear and a BatchNorm1d, or a Sequential, "
                    f"got {describe(module)}")
