"""RMSprop (torch.optim.RMSprop: eps outside the square root)."""
from __future__ import annotations

from typing import Any, Dict, Iterable

import numpy as np

from ..reference import optim as reference
from . import _fused
from .optimizer import KernelSpec, Optimizer, check_flags, check_non_negative

__all__ = ["RMSprop"]


class RMSprop(Optimizer):
    """RMSprop, PyTorch's formulation.

    With g the gradient (negated when `maximize`) plus weight_decay * param:
    v = alpha * v + (1 - alpha) * g**2; centered: gbar = alpha * gbar +
    (1 - alpha) * g and denom = sqrt(v - gbar**2) + eps, else
    denom = sqrt(v) + eps (eps OUTSIDE the square root, unlike Keras/optax);
    with momentum: b = momentum * b + g / denom, param -= lr * b; else
    param -= lr * g / denom.

    Parameters
    ----------
    params : iterable of Parameter or of dict
    lr : float, default 1e-2
    alpha : float, default 0.99
    eps : float, default 1e-8
    weight_decay : float, default 0
    momentum : float, default 0
    centered : bool, default False
    maximize : bool, default False
    state_dtype : {"float32", "bfloat16"}, default "float32"
    stochastic_rounding : bool, default True
        bfloat16 optimizer state, see `Optimizer`.

    State: ``step``, ``square_avg``, ``momentum_buffer`` (momentum > 0),
    ``grad_avg`` (centered).
    """

    _kernel_family = "rmsprop"
    _counts_steps = True

    def __init__(self, params: Iterable, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False,
                 *, maximize: bool = False, state_dtype: str = "float32",
                 stochastic_rounding: bool = True) -> None:
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                      momentum=momentum, centered=centered, maximize=maximize),
                         state_dtype=state_dtype, stochastic_rounding=stochastic_rounding)

    def _check_hyperparameters(self, group: Dict[str, Any], where: str) -> None:
        check_non_negative(group, where, "lr", "eps", "momentum", "weight_decay", "alpha")
        check_flags(group, where, "centered", "maximize")

    def _reference_update(self, data: np.ndarray, grad: np.ndarray, state: Dict[str, Any],
                          group: Dict[str, Any], fresh: bool) -> None:
        reference.rmsprop_update(
            data, grad, state["square_avg"], state.get("grad_avg"), state.get("momentum_buffer"),
            lr=group["lr"], alpha=group["alpha"], eps=group["eps"],
            weight_decay=group["weight_decay"], momentum=group["momentum"],
            centered=group["centered"], maximize=group["maximize"])

    def _kernel_spec(self, group: Dict[str, Any]) -> KernelSpec:
        slots = ("square_avg",
                 "grad_avg" if group["centered"] else None,
                 "momentum_buffer" if group["momentum"] > 0 else None)
        alpha = float(group["alpha"])
        momentum = float(group["momentum"])
        flags = _fused.common_flags(group)
        if group["centered"]:
            flags |= _fused.FLAG_CENTERED
        if momentum > 0:
            flags |= _fused.FLAG_MOMENTUM
        scalars = (float(group["lr"]), float(group["weight_decay"]), alpha, 1.0 - alpha,
                   float(group["eps"]), momentum)
        return KernelSpec(slots, scalars, flags, None)
