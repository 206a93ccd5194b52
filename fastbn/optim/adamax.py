"""Adamax (torch.optim.Adamax): Adam with an infinity-norm second moment."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Tuple

import numpy as np

from ..reference import optim as reference
from . import _fused
from .optimizer import KernelSpec, Optimizer, check_betas, check_flags, check_non_negative

__all__ = ["Adamax"]


class Adamax(Optimizer):
    """Adamax, PyTorch's formulation.

    t += 1; g is the gradient (negated when `maximize`) plus
    weight_decay * param; m = beta1 * m + (1 - beta1) * g;
    u = max(beta2 * u, |g| + eps); param -= lr / (1 - beta1**t) * m / u.

    Parameters
    ----------
    params : iterable of Parameter or of dict
    lr : float, default 2e-3
    betas : (float, float), default (0.9, 0.999), each in [0, 1)
    eps : float, default 1e-8
    weight_decay : float, default 0
    maximize : bool, default False

    State: ``step``, ``exp_avg`` (m), ``exp_inf`` (u).
    """

    _kernel_family = "adamax"
    _counts_steps = True

    def __init__(self, params: Iterable, lr: float = 2e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, maximize: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      maximize=maximize))

    def _check_hyperparameters(self, group: Dict[str, Any], where: str) -> None:
        check_non_negative(group, where, "lr", "eps", "weight_decay")
        check_betas(group, where)
        check_flags(group, where, "maximize")

    def _reference_update(self, data: np.ndarray, grad: np.ndarray, state: Dict[str, Any],
                          group: Dict[str, Any], fresh: bool) -> None:
        beta1, beta2 = group["betas"]
        reference.adamax_update(data, grad, state["exp_avg"], state["exp_inf"], step=state["step"],
                                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                                weight_decay=group["weight_decay"], maximize=group["maximize"])

    def _kernel_spec(self, group: Dict[str, Any]) -> KernelSpec:
        slots = ("exp_avg", "exp_inf")
        beta1, beta2 = (float(b) for b in group["betas"])
        lr = float(group["lr"])
        scalars = (float(group["weight_decay"]), beta1, 1.0 - beta1, beta2, float(group["eps"]))

        def decayed_lr(step: int, fresh: bool) -> Tuple[float]:
            return (lr / (1.0 - beta1 ** step),)

        return KernelSpec(slots, scalars, _fused.common_flags(group), decayed_lr)
