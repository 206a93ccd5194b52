"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms")."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Tuple

import numpy as np

from ..reference import optim as reference
from . import _fused
from .optimizer import KernelSpec, Optimizer, check_betas, check_flags, check_non_negative

__all__ = ["Lion"]


class Lion(Optimizer):
    """Lion: the sign of an interpolated momentum.

    g is the gradient (negated when `maximize`);
    c = beta1 * m + (1 - beta1) * g; param -= lr * (sign(c) + weight_decay * param);
    m = beta2 * m + (1 - beta2) * g.  Not in torch.optim; the state key
    follows lion-pytorch.

    Parameters
    ----------
    params : iterable of Parameter or of dict
    lr : float, default 1e-4
    betas : (float, float), default (0.9, 0.99), each in [0, 1)
    weight_decay : float, default 0 (decoupled)
    maximize : bool, default False
    state_dtype : {"float32", "bfloat16"}, default "float32"
    stochastic_rounding : bool, default True
        bfloat16 optimizer state, see `Optimizer`.

    State: ``exp_avg`` (m).
    """

    _kernel_family = "lion"

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: Tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, maximize: bool = False, state_dtype: str = "float32",
                 stochastic_rounding: bool = True) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay,
                                      maximize=maximize),
                         state_dtype=state_dtype, stochastic_rounding=stochastic_rounding)

    def _check_hyperparameters(self, group: Dict[str, Any], where: str) -> None:
        check_non_negative(group, where, "lr", "weight_decay")
        check_betas(group, where)
        check_flags(group, where, "maximize")

    def _reference_update(self, data: np.ndarray, grad: np.ndarray, state: Dict[str, Any],
                          group: Dict[str, Any], fresh: bool) -> None:
        beta1, beta2 = group["betas"]
        reference.lion_update(data, grad, state["exp_avg"], lr=group["lr"], beta1=beta1,
                              beta2=beta2, weight_decay=group["weight_decay"],
                              maximize=group["maximize"])

    def _kernel_spec(self, group: Dict[str, Any]) -> KernelSpec:
        slots = ("exp_avg",)
        beta1, beta2 = (float(b) for b in group["betas"])
        scalars = (float(group["lr"]), float(group["weight_decay"]),
                   beta1, 1.0 - beta1, beta2, 1.0 - beta2)
        return KernelSpec(slots, scalars, _fused.common_flags(group), None)
