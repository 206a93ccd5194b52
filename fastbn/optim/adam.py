"""Adam and AdamW (torch.optim.Adam / AdamW), with an uncorrected option."""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Tuple

import numpy as np

from ..reference import optim as reference
from . import _fused
from .optimizer import KernelSpec, Optimizer, check_betas, check_flags, check_non_negative

__all__ = ["Adam", "AdamW"]


class Adam(Optimizer):
    """Adam, PyTorch's formulation.

    t += 1; g is the gradient (negated when `maximize`); L2 decay adds
    weight_decay * param to g, or with `decoupled_weight_decay` (AdamW)
    param *= 1 - lr * weight_decay first; m = beta1 * m + (1 - beta1) * g;
    v = beta2 * v + (1 - beta2) * g**2; with `amsgrad` vmax = max(vmax, v)
    replaces v below;
    param -= (lr / (1 - beta1**t)) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps).
    With ``bias_correction=False``: param -= lr * m / (sqrt(v) + eps) (the
    textbook update without the bias corrections).

    Parameters
    ----------
    params : iterable of Parameter or of dict
    lr : float, default 1e-3
    betas : (float, float), default (0.9, 0.999), each in [0, 1)
    eps : float, default 1e-8
    weight_decay : float, default 0
    amsgrad : bool, default False
    maximize : bool, default False
    bias_correction : bool, default True
    decoupled_weight_decay : bool, default False
        True gives AdamW.
    state_dtype : {"float32", "bfloat16"}, default "float32"
    stochastic_rounding : bool, default True
        bfloat16 optimizer state, see `Optimizer`.

    State: ``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (amsgrad).

    Notes
    -----
    The fused kernel evaluates the same update with one square root and one
    division per element, as param -= a * m / (sqrt(v) + b) with
    a = lr * sqrt(1 - beta2**t) / (1 - beta1**t) and b = eps * sqrt(1 - beta2**t);
    it agrees with the formula above to rounding.
    """

    _kernel_family = "adam"
    _counts_steps = True

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *,
                 maximize: bool = False, bias_correction: bool = True,
                 decoupled_weight_decay: bool = False, state_dtype: str = "float32",
                 stochastic_rounding: bool = True) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, maximize=maximize,
                                      bias_correction=bias_correction,
                                      decoupled_weight_decay=decoupled_weight_decay),
                         state_dtype=state_dtype, stochastic_rounding=stochastic_rounding)

    def _check_hyperparameters(self, group: Dict[str, Any], where: str) -> None:
        check_non_negative(group, where, "lr", "eps", "weight_decay")
        check_betas(group, where)
        check_flags(group, where, "amsgrad", "maximize", "bias_correction", "decoupled_weight_decay")

    def _reference_update(self, data: np.ndarray, grad: np.ndarray, state: Dict[str, Any],
                          group: Dict[str, Any], fresh: bool) -> None:
        beta1, beta2 = group["betas"]
        reference.adam_update(
            data, grad, state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq"),
            step=state["step"], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], amsgrad=group["amsgrad"],
            maximize=group["maximize"], bias_correction=group["bias_correction"],
            decoupled_weight_decay=group["decoupled_weight_decay"])

    def _kernel_spec(self, group: Dict[str, Any]) -> KernelSpec:
        slots = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq" if group["amsgrad"] else None)
        beta1, beta2 = (float(b) for b in group["betas"])
        lr, eps = float(group["lr"]), float(group["eps"])
        weight_decay = float(group["weight_decay"])
        flags = _fused.common_flags(group)
        if group["amsgrad"]:
            flags |= _fused.FLAG_AMSGRAD
        if group["decoupled_weight_decay"]:
            flags |= _fused.FLAG_DECOUPLED
        scalars = (weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2, 1.0 - lr * weight_decay)
        bias_correction = bool(group["bias_correction"])

        def update_coefficients(step: int, fresh: bool) -> Tuple[float, float]:
            if not bias_correction:
                return lr, eps
            bias_correction1 = 1.0 - beta1 ** step
            bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** step)
            return lr * bias_correction2_sqrt / bias_correction1, eps * bias_correction2_sqrt

        return KernelSpec(slots, scalars, flags, update_coefficients)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): param *= 1 -
    lr * weight_decay before the moment updates.  Same parameters as `Adam`,
    with weight_decay defaulting to 1e-2."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, bias_correction: bool = True, state_dtype: str = "float32",
                 stochastic_rounding: bool = True) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, bias_correction=bias_correction,
                         decoupled_weight_decay=True, state_dtype=state_dtype,
                         stochastic_rounding=stochastic_rounding)
