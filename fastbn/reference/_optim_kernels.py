"""The reference backend's optimizer kernels: the optimizer methods of the
fast kernels object (fastbn/optim/_optim.pyx, bound by fastbn._backend)
with the same names, signatures and contract, in NumPy.

`ReferenceStepPlan` follows the compiled StepPlan's protocol, so the
optimizers run one step routine (validate, allocate, then fill and commit a
plan) on both backends.  It differs where the oracle should: it takes no
parameter as kernel-ready (`scan_group` hands every parameter with a
gradient back to the Python checks), needs no per-step coefficients (the
update reads the group's hyperparameters, as fastbn.reference.optim's
formulas do), and its commit updates one parameter at a time through the
optimizer's reference update, after attaching the new state and counting
the step.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

import numpy as np

from . import optim as _formulas


class ReferenceStepPlan:
    """One `Optimizer.step` on the reference backend (see the module docstring)."""

    def __init__(self, optimizer: Any) -> None:
        self._optimizer = optimizer
        self._groups: List[list] = []        # each group's parameter list, in scan order
        self._tensors: List[Tuple[int, int, np.ndarray, np.ndarray, bool]] = []
        self._insertions: List[tuple] = []
        self._steps: List[Tuple[dict, int]] = []

    def scan_group(self, family: str, params: list, slots: tuple, scalars: tuple, flags: int,
                   state_type: int = -1, rounding_seed: int = 0, bf16_type: int = -1,
                   master: bool = False) -> List[int]:
        """Start the next group; return the positions of its parameters that
        have a gradient (all of them go through the Python checks)."""
        self._groups.append(params)
        return [position for position, param in enumerate(params) if param.grad is not None]

    def add_tensor(self, group: int, data: np.ndarray, grad: np.ndarray, arrays: tuple,
                   new_step: int, fresh: bool, step_owner: Optional[dict], insertions: list,
                   *, scalar_owner: Optional[dict] = None, scalar: float = 0.0,
                   position: int = -1, master: Optional[np.ndarray] = None) -> None:
        """Add one validated parameter (arguments as the compiled plan's; the
        state arrays and the scalar are read from the entry at commit)."""
        self._tensors.append((group, position, data, grad, fresh))
        if step_owner is not None:
            self._steps.append((step_owner, new_step))
        self._insertions.extend(insertions)

    def coefficient_keys(self, group: int) -> list:
        """No coefficient rows: the reference update computes its own."""
        return []

    def set_coefficients(self, group: int, rows: list) -> None:
        if rows:
            raise ValueError(f"set_coefficients: expected no rows (see coefficient_keys), got {len(rows)}")

    def set_scalar_values(self, group: int, values: list) -> None:
        if values:
            raise ValueError(f"set_scalar_values: expected no values (see coefficient_keys), got {len(values)}")

    def commit_and_run(self) -> None:
        """Attach the new state, count the step, then update each parameter
        in NumPy, one after another."""
        for mapping, key, value in self._insertions:
            mapping[key] = value
        for owner, new_step in self._steps:
            owner["step"] = new_step
        optimizer = self._optimizer
        state, groups = optimizer.state, optimizer.param_groups
        for group, position, data, grad, fresh in self._tensors:
            param = self._groups[group][position]
            optimizer._reference_tensor_update(data, grad, state[param], groups[group], fresh,
                                               position)


def optim_plan(optimizer: Any) -> ReferenceStepPlan:
    """An empty plan for one step of `optimizer`."""
    return ReferenceStepPlan(optimizer)


def grad_norm(grads: list, inf_norm: bool) -> float:
    """The global norm of `grads` (float64): max |g| when `inf_norm`, else the 2-norm."""
    return _formulas.grad_norm(grads, math.inf if inf_norm else 2.0)


def scale_grads(grads: list, factor: float) -> None:
    """grad *= factor in place for every gradient."""
    with np.errstate(invalid="ignore"):  # inf * 0 -> nan, as the kernel gives
        for grad in grads:
            grad *= factor


def lerp_(averages: list, currents: list, weight: float) -> None:
    """averages[i] += weight * (currents[i] - averages[i]) in place (torch.lerp's form)."""
    _formulas.lerp_(averages, currents, weight)
