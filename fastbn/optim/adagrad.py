"""Adagrad (torch.optim.Adagrad)."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Tuple

import numpy as np

from ..reference import optim as reference
from . import _fused
from .optimizer import KernelSpec, Optimizer, check_flags, check_non_negative

__all__ = ["Adagrad"]


class Adagrad(Optimizer):
    """Adagrad, PyTorch's formulation.

    t += 1; g is the gradient (negated when `maximize`) plus
    weight_decay * param; clr = lr / (1 + (t - 1) * lr_decay);
    sum += g**2; param -= clr * g / (sqrt(sum) + eps).

    Parameters
    ----------
    params : iterable of Parameter or of dict
    lr : float, default 1e-2
    lr_decay : float, default 0
    weight_decay : float, default 0
    initial_accumulator_value : float, default 0
    eps : float, default 1e-10
    maximize : bool, default False

    State: ``step``, ``sum``; created for every parameter at construction
    (as PyTorch does), and on first use for parameters added later.
    """

    _kernel_family = "adagrad"
    _counts_steps = True

    def __init__(self, params: Iterable, lr: float = 1e-2, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0,
                 eps: float = 1e-10, *, maximize: bool = False) -> None:
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value,
                                      eps=eps, maximize=maximize))
        for group in self.param_groups:
            for param in group["params"]:
                self.state[param] = self._initial_state(param, group)

    def _check_hyperparameters(self, group: Dict[str, Any], where: str) -> None:
        check_non_negative(group, where, "lr", "lr_decay", "weight_decay",
                           "initial_accumulator_value", "eps")
        check_flags(group, where, "maximize")

    def _initial_fill(self, key: str, group: Dict[str, Any]) -> float:
        return group["initial_accumulator_value"]

    def _reference_update(self, data: np.ndarray, grad: np.ndarray, state: Dict[str, Any],
                          group: Dict[str, Any], fresh: bool) -> None:
        reference.adagrad_update(data, grad, state["sum"], step=state["step"], lr=group["lr"],
                                 lr_decay=group["lr_decay"], weight_decay=group["weight_decay"],
                                 eps=group["eps"], maximize=group["maximize"])

    def _kernel_spec(self, group: Dict[str, Any]) -> KernelSpec:
        slots = ("sum",)
        lr, lr_decay = float(group["lr"]), float(group["lr_decay"])
        scalars = (float(group["weight_decay"]), float(group["eps"]))

        def decayed_lr(step: int, fresh: bool) -> Tuple[float]:
            return (lr / (1 + (step - 1) * lr_decay),)

        return KernelSpec(slots, scalars, _fused.common_flags(group), decayed_lr)
