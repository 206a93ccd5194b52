"""Adadelta (torch.optim.Adadelta)."""
from __future__ import annotations

from typing import Any, Dict, Iterable

import numpy as np

from .._validation import check_range
from ..reference import optim as reference
from . import _fused
from .optimizer import KernelSpec, Optimizer, check_flags, check_non_negative, hyperparameter_name

__all__ = ["Adadelta"]


class Adadelta(Optimizer):
    """Adadelta, PyTorch's formulation.

    g is the gradient (negated when `maximize`) plus weight_decay * param;
    s = rho * s + (1 - rho) * g**2; delta = sqrt(a + eps) / sqrt(s + eps) * g;
    a = rho * a + (1 - rho) * delta**2; param -= lr * delta.

    Parameters
    ----------
    params : iterable of Parameter or of dict
    lr : float, default 1.0
    rho : float, default 0.9, in [0, 1]
    eps : float, default 1e-6
    weight_decay : float, default 0
    maximize : bool, default False

    State: ``step``, ``square_avg`` (s), ``acc_delta`` (a).
    """

    _kernel_family = "adadelta"
    _counts_steps = True

    def __init__(self, params: Iterable, lr: float = 1.0, rho: float = 0.9, eps: float = 1e-6,
                 weight_decay: float = 0.0, *, maximize: bool = False) -> None:
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay,
                                      maximize=maximize))

    def _check_hyperparameters(self, group: Dict[str, Any], where: str) -> None:
        check_non_negative(group, where, "lr", "eps", "weight_decay")
        check_range(group["rho"], hyperparameter_name(where, "rho"), 0.0, 1.0)
        check_flags(group, where, "maximize")

    def _reference_update(self, data: np.ndarray, grad: np.ndarray, state: Dict[str, Any],
                          group: Dict[str, Any], fresh: bool) -> None:
        reference.adadelta_update(data, grad, state["square_avg"], state["acc_delta"],
                                  lr=group["lr"], rho=group["rho"], eps=group["eps"],
                                  weight_decay=group["weight_decay"], maximize=group["maximize"])

    def _kernel_spec(self, group: Dict[str, Any]) -> KernelSpec:
        slots = ("square_avg", "acc_delta")
        rho = float(group["rho"])
        scalars = (float(group["lr"]), float(group["weight_decay"]), rho, 1.0 - rho,
                   float(group["eps"]))
        return KernelSpec(slots, scalars, _fused.common_flags(group), None)
