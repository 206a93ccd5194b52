"""Losses with torch.nn's names and reductions: `CrossEntropyLoss`, `MSELoss`.

A loss is a Module whose forward takes ``(input, target)`` and returns the
loss, and whose ``backward(grad_output=1.0)`` returns the gradient with
respect to `input` (the start of a network's backward pass)::

    loss = criterion(logits, labels)
    dlogits = criterion.backward()
    model.backward(dlogits)

Losses are computed in the input's dtype, as torch does; a scalar loss is a
NumPy scalar of that dtype (``float(loss)`` for a Python number).
"""
from __future__ import annotations

import numbers
from typing import Union

import numpy as np

from .._validation import as_float_array, check_range, check_same_dtype, check_shape, describe
from .module import Module

__all__ = ["CrossEntropyLoss", "MSELoss"]

REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def _reduce(values: np.ndarray, reduction: str, count: float):
    if reduction == "none":
        return values
    total = values.sum(dtype=values.dtype)
    if reduction == "sum":
        return total
    return values.dtype.type(total / values.dtype.type(count))


class _Loss(Module):
    """Shared plumbing: the reduction, the saved forward state, and the
    scale of the gradient for the reduction."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = _check_reduction(reduction)
        self._saved = None

    def _saved_or_raise(self):
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward: call forward(input, target) first")
        return self._saved

    def _gradient_scale(self, grad_output, shape, dtype: np.dtype, count: float):
        """grad_output as something to multiply the per-element gradient by:
        a scalar (mean/sum, divided by `count` for mean) or an array of the
        unreduced loss's shape ('none')."""
        if self.reduction == "none":
            if np.isscalar(grad_output):
                return dtype.type(grad_output)
            grad = as_float_array(grad_output, "grad_output")
            check_same_dtype("grad_output", grad, "the input", dtype)
            check_shape("grad_output", grad, shape)
            return grad
        if isinstance(grad_output, np.ndarray) and grad_output.size == 1:
            grad_output = grad_output.reshape(()).item()
        if isinstance(grad_output, bool) or not isinstance(grad_output, numbers.Real):
            raise TypeError(f"grad_output: expected a real number (the loss is a scalar), "
                            f"got {describe(grad_output)}")
        scale = float(grad_output)
        if self.reduction == "mean":
            scale /= count
        return dtype.type(scale)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """log(softmax(logits)) without overflow: the row maximum is subtracted
    before exponentiating, and log-sum-exp is added back in log space."""
    shifted = logits - logits.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


class CrossEntropyLoss(_Loss):
    """Cross entropy between logits and class targets (torch.nn.CrossEntropyLoss).

    ``loss_i = -sum_c q_ic * log_softmax(input)_ic``, where q is the one-hot
    of the class index (or the given class probabilities), smoothed to
    ``(1 - label_smoothing) * q + label_smoothing / C``.

    Parameters
    ----------
    reduction : {'mean', 'sum', 'none'}, default 'mean'
        'mean' averages over the samples whose target is not `ignore_index`.
    ignore_index : int, default -100
        Class-index targets equal to this contribute no loss and no gradient.
    label_smoothing : float in [0, 1], default 0

    Shapes: input (N, C) float32/float64 logits; target (N,) integer class
    indices in [0, C), or (N, C) class probabilities of the input's dtype.
    """

    def __init__(self, reduction: str = "mean", ignore_index: int = -100,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(reduction)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index: expected an int, got {describe(ignore_index)}")
        self.ignore_index = int(ignore_index)
        self.label_smoothing = check_range(label_smoothing, "label_smoothing", 0.0, 1.0)

    def _check(self, input, target):
        logits = as_float_array(input, "input")
        if logits.ndim != 2:
            raise ValueError(f"input: expected logits of shape (N, C), got shape {logits.shape}")
        if logits.shape[1] == 0:
            raise ValueError(f"input: expected logits of shape (N, C) with at least one class "
                             f"(C >= 1), got shape {logits.shape}")
        if not isinstance(target, np.ndarray):
            target = np.asarray(target)
        if target.dtype.kind in "iu":
            if target.shape != logits.shape[:1]:
                raise ValueError(f"target: expected class indices of shape {logits.shape[:1]} "
                                 f"(one per row of input), got shape {target.shape}")
            valid = target != self.ignore_index
            classes = logits.shape[1]
            bad = valid & ((target < 0) | (target >= classes))
            if bad.any():
                raise ValueError(f"target: class indices must be in [0, {classes}) or equal "
                                 f"ignore_index={self.ignore_index}, got {target[bad][0]}")
            return logits, target.astype(np.intp, copy=False), valid
        if target.dtype.kind == "f":
            check_same_dtype("target", target, "the input", logits.dtype)
            check_shape("target", target, logits.shape)
            return logits, target, None
        raise TypeError(f"target: expected integer class indices or float class probabilities, "
                        f"got dtype {target.dtype}")

    def forward(self, input: np.ndarray, target: np.ndarray):
        """The loss (a scalar of the input's dtype, or (N,) for 'none')."""
        logits, target, valid = self._check(input, target)
        log_probs = log_softmax(logits, axis=1)
        n, classes = logits.shape
        smoothing = logits.dtype.type(self.label_smoothing)
        if valid is None:     # class probabilities
            q = target * (1 - smoothing) + smoothing / classes if smoothing else target
            losses = -(q * log_probs).sum(axis=1)
            count = n
        else:
            rows = np.arange(n)
            picked = log_probs[rows, np.where(valid, target, 0)]
            losses = -picked * (1 - smoothing)
            if smoothing:
                losses -= smoothing / classes * log_probs.sum(axis=1)
            losses = np.where(valid, losses, logits.dtype.type(0))
            count = int(valid.sum())
        self._saved = (log_probs, target, valid, count)
        if self.reduction == "mean" and count == 0:
            return logits.dtype.type(np.nan)   # torch: 0/0 when every target is ignored
        return _reduce(losses.astype(logits.dtype, copy=False), self.reduction, count)

    def backward(self, grad_output: Union[float, np.ndarray] = 1.0) -> np.ndarray:
        """d loss / d input, shape (N, C): (softmax(input) - q) * grad_output
        (divided by the number of counted samples for 'mean')."""
        log_probs, target, valid, count = self._saved_or_raise()
        n, classes = log_probs.shape
        dtype = log_probs.dtype
        scale = self._gradient_scale(grad_output, (n,), dtype, max(count, 1))
        smoothing = dtype.type(self.label_smoothing)
        grad = np.exp(log_probs)
        if valid is None:
            grad -= target * (1 - smoothing) + smoothing / classes if smoothing else target
        else:
            if smoothing:
                grad -= smoothing / classes
            rows = np.arange(n)
            grad[rows, np.where(valid, target, 0)] -= 1 - smoothing
            grad[~valid] = 0
        grad *= scale[:, None] if np.ndim(scale) else scale
        return grad


class MSELoss(_Loss):
    """Mean squared error (torch.nn.MSELoss): ``(input - target) ** 2``,
    averaged over every element ('mean'), summed, or kept ('none').

    input and target: same shape and dtype (float32/float64).
    """

    def forward(self, input: np.ndarray, target: np.ndarray):
        prediction = as_float_array(input, "input")
        target = as_float_array(target, "target")
        check_same_dtype("target", target, "the input", prediction.dtype)
        check_shape("target", target, prediction.shape)
        difference = prediction - target
        self._saved = difference
        return _reduce(difference * difference, self.reduction, difference.size)

    def backward(self, grad_output: Union[float, np.ndarray] = 1.0) -> np.ndarray:
        """d loss / d input = 2 * (input - target) * grad_output (/ numel for 'mean')."""
        difference = self._saved_or_raise()
        scale = self._gradient_scale(grad_output, difference.shape, difference.dtype,
                                     max(difference.size, 1))
        grad = difference * difference.dtype.type(2)
        grad *= scale
        return grad
