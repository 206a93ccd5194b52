"""RAdam (torch.optim.RAdam): Adam with the variance of the adaptive rate rectified."""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Tuple

import numpy as np

from ..reference import optim as reference
from . import _fused
from .optimizer import KernelSpec, Optimizer, check_betas, check_flags, check_non_negative

__all__ = ["RAdam"]


class RAdam(Optimizer):
    """RAdam, PyTorch's formulation.

    t += 1; g is the gradient (negated when `maximize`); L2 decay adds
    weight_decay * param to g, or with `decoupled_weight_decay` param *= 1 -
    lr * weight_decay first; m, v as Adam; m_hat = m / (1 - beta1**t);
    rho_inf = 2 / (1 - beta2) - 1, rho_t = rho_inf - 2 t beta2**t / (1 - beta2**t);
    while rho_t > 5: r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf /
    ((rho_inf - 4)(rho_inf - 2) rho_t)) and
    param -= lr * m_hat * r_t * sqrt(1 - beta2**t) / (sqrt(v) + eps);
    before that (the first steps) param -= lr * m_hat.

    Parameters
    ----------
    params : iterable of Parameter or of dict
    lr : float, default 1e-3
    betas : (float, float), default (0.9, 0.999), each in [0, 1)
    eps : float, default 1e-8
    weight_decay : float, default 0
    decoupled_weight_decay : bool, default False
    maximize : bool, default False

    State: ``step``, ``exp_avg``, ``exp_avg_sq``.

    Notes
    -----
    r_t and the branch are computed once per step (as scalars); the kernel
    runs Adam's element loop with a = lr r_t sqrt(1 - beta2**t) / (1 - beta1**t)
    and b = eps, or param -= (lr / (1 - beta1**t)) m.
    """

    _kernel_family = "radam"
    _counts_steps = True

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled_weight_decay: bool = False,
                 *, maximize: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      decoupled_weight_decay=decoupled_weight_decay,
                                      maximize=maximize))

    def _check_hyperparameters(self, group: Dict[str, Any], where: str) -> None:
        check_non_negative(group, where, "lr", "eps", "weight_decay")
        check_betas(group, where)
        check_flags(group, where, "decoupled_weight_decay", "maximize")

    def _reference_update(self, data: np.ndarray, grad: np.ndarray, state: Dict[str, Any],
                          group: Dict[str, Any], fresh: bool) -> None:
        beta1, beta2 = group["betas"]
        reference.radam_update(data, grad, state["exp_avg"], state["exp_avg_sq"], step=state["step"],
                               lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                               weight_decay=group["weight_decay"],
                               decoupled_weight_decay=group["decoupled_weight_decay"],
                               maximize=group["maximize"])

    def _kernel_spec(self, group: Dict[str, Any]) -> KernelSpec:
        slots = ("exp_avg", "exp_avg_sq")
        beta1, beta2 = (float(b) for b in group["betas"])
        lr, eps = float(group["lr"]), float(group["eps"])
        weight_decay = float(group["weight_decay"])
        flags = _fused.common_flags(group)
        if group["decoupled_weight_decay"]:
            flags |= _fused.FLAG_DECOUPLED
        scalars = (weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2, 1.0 - lr * weight_decay)

        def update_coefficients(step: int, fresh: bool) -> Tuple[float, float, float]:
            bias_correction1 = 1.0 - beta1 ** step
            rectification = reference.radam_rectification(step, beta2)
            if rectification is None:
                return lr / bias_correction1, 0.0, 0.0
            step_size = lr * rectification * math.sqrt(1.0 - beta2 ** step) / bias_correction1
            return step_size, eps, 1.0

        return KernelSpec(slots, scalars, flags, update_coefficients)
