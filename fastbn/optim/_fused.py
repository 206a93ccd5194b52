"""Glue between the optimizers and the compiled multi-tensor kernels
(fastbn/optim/_optim.pyx -> src_c/optim).

The option flags below are the bits of the kernels' ``flags`` argument; they
must equal the FASTBN_OPTIM_* values in src_c/optim/optim_kernels.h (a test
checks it).  The compiled module is required: a build without it fails here,
loudly, instead of quietly running every step on the NumPy reference.
"""
from __future__ import annotations

from typing import Any, Dict

try:
    from . import _optim  # the bridge the optimizers and clip_grad_norm_ call
except ImportError as error:  # pragma: no cover - depends on how fastbn was built
    raise ImportError(
        "fastbn.optim: the compiled optimizer kernels (fastbn/optim/_optim) are missing; "
        "build them with `python setup.py build_ext --inplace` or reinstall fastbn") from error

FLAG_MAXIMIZE = 1 << 0
FLAG_WEIGHT_DECAY = 1 << 1
FLAG_MOMENTUM = 1 << 2
FLAG_NESTEROV = 1 << 3
FLAG_CENTERED = 1 << 4
FLAG_AMSGRAD = 1 << 5
FLAG_DECOUPLED = 1 << 6
FLAG_STOCHASTIC_ROUNDING = 1 << 16  # bfloat16 state kernels only


def common_flags(group: Dict[str, Any]) -> int:
    """The maximize and weight-decay bits every family shares."""
    flags = 0
    if group.get("maximize", False):
        flags |= FLAG_MAXIMIZE
    if group.get("weight_decay", 0) != 0:
        flags |= FLAG_WEIGHT_DECAY
    return flags


def step_plan(optimizer: Any) -> "_optim.StepPlan":
    """The fast kernels' `optim_plan`: an empty compiled StepPlan for one
    step of `optimizer` (fastbn._backend.FastKernels binds it)."""
    return _optim.StepPlan(optimizer.state, optimizer._counts_steps,
                           scalar_key=optimizer._scalar_state)
