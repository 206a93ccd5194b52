"""Glue between the optimizers and the compiled multi-tensor kernels
(fastbn/optim/_optim.pyx -> src_c/optim).

The option flags below are the bits of the kernels' ``flags`` argument; they
must equal the FASTBN_OPTIM_* values in src_c/optim/optim_kernels.h (a test
checks it).
"""
from __future__ import annotations

import functools
from typing import Any, Dict, List, Tuple

try:
    from . import _optim
except ImportError:  # not built yet: every step runs the NumPy reference
    _optim = None

FLAG_MAXIMIZE = 1 << 0
FLAG_WEIGHT_DECAY = 1 << 1
FLAG_MOMENTUM = 1 << 2
FLAG_NESTEROV = 1 << 3
FLAG_CENTERED = 1 << 4
FLAG_AMSGRAD = 1 << 5
FLAG_DECOUPLED = 1 << 6


def available() -> bool:
    """True when the compiled kernels can be imported."""
    return _optim is not None


def common_flags(group: Dict[str, Any]) -> int:
    """The maximize and weight-decay bits every family shares."""
    flags = 0
    if group.get("maximize", False):
        flags |= FLAG_MAXIMIZE
    if group.get("weight_decay", 0) != 0:
        flags |= FLAG_WEIGHT_DECAY
    return flags


def step_groups(optimizer, groups: List[Tuple[int, Dict[str, Any]]]) -> None:
    """One fused kernel call per group (and dtype) for every parameter that
    has a gradient.  Every gradient of every group is validated before any
    state or parameter changes (see fastbn/optim/_optim.pyx)."""
    plans = []
    for index, group in groups:
        scalars, flags, coefficients = optimizer._kernel_arguments(group)
        plan = _optim.GroupPlan(optimizer._kernel_family, group["params"], index, scalars, flags)
        plans.append((plan, group, coefficients))
    for plan, group, coefficients in plans:
        plan.bind_state(optimizer.state, optimizer._state_slots(group), optimizer._counts_steps,
                        coefficients, functools.partial(_ensure_state, optimizer, group))
    for plan, group, _ in plans:
        plan.commit_and_run(len(optimizer._state_slots(group)))


def _ensure_state(optimizer, group, param):
    return optimizer._ensure_state(param, group)
