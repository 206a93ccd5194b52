"""SGD (torch.optim.SGD) and Momentum (the textbook v = beta*v + (1-beta)*g)."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Tuple

import numpy as np

from ..reference import optim as reference
from . import _fused
from .optimizer import (KernelSpec, Optimizer, check_flags, check_non_negative, check_reals,
                        check_unit_interval, hyperparameter_name)

__all__ = ["SGD", "Momentum"]


class SGD(Optimizer):
    """Stochastic gradient descent, optionally with momentum (PyTorch's form).

    With g the gradient (negated when `maximize`) plus weight_decay * param:
    the first step sets b = g, later steps b = momentum * b + (1 - dampening) * g;
    the direction is g + momentum * b with `nesterov`, else b (g without
    momentum); param -= lr * direction.

    Parameters
    ----------
    params : iterable of Parameter or of dict
    lr : float, default 1e-3
    momentum : float, default 0
    dampening : float, default 0
    weight_decay : float, default 0
        L2 penalty added to the gradient.
    nesterov : bool, default False
        Needs momentum > 0 and dampening == 0.
    maximize : bool, default False
    state_dtype : {"float32", "bfloat16"}, default "float32"
    stochastic_rounding : bool, default True
        bfloat16 optimizer state, see `Optimizer`.

    State: ``momentum_buffer`` (when momentum != 0).
    """

    _kernel_family = "sgd"

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 *, maximize: bool = False, state_dtype: str = "float32",
                 stochastic_rounding: bool = True) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      maximize=maximize),
                         state_dtype=state_dtype, stochastic_rounding=stochastic_rounding)

    def _check_hyperparameters(self, group: Dict[str, Any], where: str) -> None:
        check_non_negative(group, where, "lr", "momentum", "weight_decay")
        check_reals(group, where, "dampening")
        check_flags(group, where, "nesterov", "maximize")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                f"{hyperparameter_name(where, 'nesterov')}: Nesterov momentum expects momentum > 0 "
                f"and dampening == 0, got momentum={group['momentum']!r}, "
                f"dampening={group['dampening']!r}")

    def _reference_update(self, data: np.ndarray, grad: np.ndarray, state: Dict[str, Any],
                          group: Dict[str, Any], fresh: bool) -> None:
        # A buffer created for this step means "first step": b = g.
        buffer = None if fresh else state.get("momentum_buffer")
        buffer = reference.sgd_update(
            data, grad, buffer, lr=group["lr"], momentum=group["momentum"],
            dampening=group["dampening"], weight_decay=group["weight_decay"],
            nesterov=group["nesterov"], maximize=group["maximize"])
        if buffer is not None:
            state["momentum_buffer"] = buffer

    def _kernel_spec(self, group: Dict[str, Any]) -> KernelSpec:
        slots = ("momentum_buffer",) if group["momentum"] != 0 else ()
        momentum = float(group["momentum"])
        flags = _fused.common_flags(group)
        if momentum != 0:
            flags |= _fused.FLAG_MOMENTUM
        if group["nesterov"]:
            flags |= _fused.FLAG_NESTEROV
        steady = (momentum, 1.0 - float(group["dampening"]))
        # On a buffer's first step b = 0 * b + 1 * g = g (the buffer starts at zero).
        first = (0.0, 1.0)

        def buffer_coefficients(step: int, fresh: bool) -> Tuple[float, float]:
            return first if fresh else steady

        scalars = (float(group["lr"]), float(group["weight_decay"]), momentum)
        # Without momentum the kernel reads no coefficients.
        return KernelSpec(slots, scalars, flags, buffer_coefficients if momentum != 0 else None)


class Momentum(Optimizer):
    """Gradient descent with the textbook (exponential moving average) momentum.

    v = momentum * v + (1 - momentum) * g;  param -= lr * v, with v starting
    at zero and g the gradient (negated when `maximize`) plus
    weight_decay * param.  Equals ``SGD(lr=lr * (1 - momentum),
    momentum=momentum)`` (dampening 0), not ``SGD(lr, momentum,
    dampening=momentum)``, whose first step uses b = g.  The coefficient is
    named ``momentum`` (it is the textbook beta) so that CyclicLR/OneCycleLR
    can cycle it.

    Parameters
    ----------
    params : iterable of Parameter or of dict
    lr : float, default 1e-3
    momentum : float in [0, 1), default 0.9
    weight_decay : float, default 0
    maximize : bool, default False
    state_dtype : {"float32", "bfloat16"}, default "float32"
    stochastic_rounding : bool, default True
        bfloat16 optimizer state, see `Optimizer`.

    State: ``momentum_buffer`` (v).
    """

    _kernel_family = "momentum"

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.9,
                 weight_decay: float = 0.0, *, maximize: bool = False, state_dtype: str = "float32",
                 stochastic_rounding: bool = True) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      maximize=maximize),
                         state_dtype=state_dtype, stochastic_rounding=stochastic_rounding)

    def _check_hyperparameters(self, group: Dict[str, Any], where: str) -> None:
        check_non_negative(group, where, "lr", "weight_decay")
        check_unit_interval(group, where, "momentum")
        check_flags(group, where, "maximize")

    def _reference_update(self, data: np.ndarray, grad: np.ndarray, state: Dict[str, Any],
                          group: Dict[str, Any], fresh: bool) -> None:
        reference.momentum_update(data, grad, state["momentum_buffer"], lr=group["lr"],
                                  momentum=group["momentum"], weight_decay=group["weight_decay"],
                                  maximize=group["maximize"])

    def _kernel_spec(self, group: Dict[str, Any]) -> KernelSpec:
        slots = ("momentum_buffer",)
        beta = float(group["momentum"])
        scalars = (float(group["lr"]), float(group["weight_decay"]), beta, 1.0 - beta)
        return KernelSpec(slots, scalars, _fused.common_flags(group), None)
