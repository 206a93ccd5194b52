"""Glue between the optimizers and the compiled multi-tensor kernels
(fastbn/optim/_optim.pyx -> src_c/optim).

The option flags below are the bits of the kernels' ``flags`` argument; they
must equal the FASTBN_OPTIM_* values in src_c/optim/optim_kernels.h (a test
checks it).
"""
from __future__ import annotations

from typing import Any, Dict

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


def group_step(optimizer, group: Dict[str, Any], group_index: int) -> None:
    """One fused kernel call (per dtype) for every parameter of `group` that
    has a gradient."""
    scalars, flags, coefficients = optimizer._kernel_arguments(group)
    _optim.group_step(
        optimizer._kernel_family, group["params"], optimizer.state,
        optimizer._state_slots(group), optimizer._counts_steps, group_index,
        scalars, flags, coefficients, lambda param: optimizer._ensure_state(param, group))
