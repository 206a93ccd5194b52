"""NAdam (torch.optim.NAdam): Adam with Nesterov momentum and momentum decay."""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Tuple

import numpy as np

from ..reference import optim as reference
from . import _fused
from .optimizer import KernelSpec, Optimizer, check_betas, check_flags, check_non_negative

__all__ = ["NAdam"]


class NAdam(Optimizer):
    """NAdam, PyTorch's formulation.

    t += 1; g is the gradient (negated when `maximize`); L2 decay adds
    weight_decay * param to g, or with `decoupled_weight_decay` param *= 1 -
    lr * weight_decay first; mu_t = beta1 * (1 - 0.5 * 0.96**(t * momentum_decay));
    mu_product *= mu_t; m = beta1 * m + (1 - beta1) * g;
    v = beta2 * v + (1 - beta2) * g**2; denom = sqrt(v / (1 - beta2**t)) + eps;
    param -= lr * (1 - mu_t) / (1 - mu_product) * g / denom
             + lr * mu_{t+1} / (1 - mu_product * mu_{t+1}) * m / denom.

    Parameters
    ----------
    params : iterable of Parameter or of dict
    lr : float, default 2e-3
    betas : (float, float), default (0.9, 0.999), each in [0, 1)
    eps : float, default 1e-8
    weight_decay : float, default 0
    momentum_decay : float, default 4e-3
    decoupled_weight_decay : bool, default False
    maximize : bool, default False

    State: ``step``, ``mu_product`` (a float, the product of every mu_t so
    far; PyTorch keeps a 0-d tensor, which `load_state_dict` accepts),
    ``exp_avg``, ``exp_avg_sq``.

    Notes
    -----
    The fused kernel computes the two terms over one denominator with
    sqrt(1 - beta2**t) folded into the coefficients (one square root and one
    division per element); it agrees with the formula above to rounding.
    """

    _kernel_family = "nadam"
    _counts_steps = True
    _scalar_state = "mu_product"

    def __init__(self, params: Iterable, lr: float = 2e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum_decay: float = 4e-3,
                 decoupled_weight_decay: bool = False, *, maximize: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      momentum_decay=momentum_decay,
                                      decoupled_weight_decay=decoupled_weight_decay,
                                      maximize=maximize))

    def _check_hyperparameters(self, group: Dict[str, Any], where: str) -> None:
        check_non_negative(group, where, "lr", "eps", "weight_decay", "momentum_decay")
        check_betas(group, where)
        check_flags(group, where, "decoupled_weight_decay", "maximize")

    def _reference_update(self, data: np.ndarray, grad: np.ndarray, state: Dict[str, Any],
                          group: Dict[str, Any], fresh: bool) -> None:
        beta1, beta2 = group["betas"]
        state["mu_product"] = reference.nadam_update(
            data, grad, state["exp_avg"], state["exp_avg_sq"], step=state["step"],
            mu_product=float(state["mu_product"]), lr=group["lr"], beta1=beta1, beta2=beta2,
            eps=group["eps"], weight_decay=group["weight_decay"],
            momentum_decay=group["momentum_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"], maximize=group["maximize"])

    def _kernel_spec(self, group: Dict[str, Any]) -> KernelSpec:
        slots = ("exp_avg", "exp_avg_sq")
        beta1, beta2 = (float(b) for b in group["betas"])
        lr, eps = float(group["lr"]), float(group["eps"])
        weight_decay = float(group["weight_decay"])
        momentum_decay = float(group["momentum_decay"])
        flags = _fused.common_flags(group)
        if group["decoupled_weight_decay"]:
            flags |= _fused.FLAG_DECOUPLED
        scalars = (weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2, 1.0 - lr * weight_decay)

        def update_coefficients(step: int, fresh: bool, mu_product: float):
            mu = beta1 * (1.0 - 0.5 * 0.96 ** (step * momentum_decay))
            mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * momentum_decay))
            mu_product = mu_product * mu
            bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** step)
            grad_weight = lr * (1.0 - mu) / (1.0 - mu_product) * bias_correction2_sqrt
            avg_weight = lr * mu_next / (1.0 - mu_product * mu_next) * bias_correction2_sqrt
            return (grad_weight, avg_weight, eps * bias_correction2_sqrt), mu_product

        return KernelSpec(slots, scalars, flags, update_coefficients)
