"""The kernel seam: every public function validates its arguments, then calls
the methods of the CURRENT KERNELS OBJECT, chosen once per context:

- "fast": `FastKernels`, the Cython bridge functions (fastbn/_bn.pyx) bound
  as they are (no Python frame between the caller and the bridge);
- "reference": `fastbn.reference._kernels.ReferenceKernels`, the same
  methods with the same signatures and contract, in NumPy.

A kernel method takes kernel-ready arrays: the input viewed as (outer,
channels, inner) (argument names carry the layout), per-channel vectors and
scalars.  It returns None, having written nothing, when an array is not
kernel-ready, so a caller may try it first and run the validators only then
(the layers do: one bridge call per warm forward or backward).  The
split-phase methods (stats, merge_stats, apply, backward_reduce,
backward_apply) are called only with validated arguments and have no such
test.

The optimizer family is four more methods (fastbn/optim/_fused.py and
fastbn/reference/_optim_kernels.py): `optim_plan(optimizer)`, a plan object
with the compiled StepPlan's protocol (scan_group, add_tensor,
coefficient_keys, set_coefficients, set_scalar_values, commit_and_run),
which the optimizers fill after their shared validation and allocation
phases; `grad_norm(grads, inf_norm)`, `scale_grads(grads, factor)` and
`lerp_(averages, currents, weight)` for clip_grad_norm_ and the weight
averaging.  The fast ones are looked up in fastbn.optim on first use
(fastbn.optim imports this module, so it cannot be imported here).

The choice lives in a ContextVar, so `use_backend` in one thread (or asyncio
task) does not change what another thread runs.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
from typing import Any, Iterator

from . import _bn

BACKENDS = ("fast", "reference")


class _Deferred:
    """A kernel method found in `module` on first use, then bound on the
    class as a staticmethod (later calls go straight to it, no frame)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __set_name__(self, owner: type, attribute: str) -> None:
        self.attribute = attribute

    def __get__(self, instance: Any, owner: type) -> Any:
        function = getattr(importlib.import_module(self.module), self.name)
        setattr(owner, self.attribute, staticmethod(function))
        return function


class FastKernels:
    """The compiled kernels (see fastbn/_bn.pyx for each method's contract)."""

    name = "fast"
    eval_forward = staticmethod(_bn.eval_forward)
    train_forward = staticmethod(_bn.train_forward)
    backward = staticmethod(_bn.backward)
    backward_eval = staticmethod(_bn.backward_eval)
    eval_forward_at = staticmethod(_bn.eval_forward_at)
    train_forward_at = staticmethod(_bn.train_forward_at)
    backward_at = staticmethod(_bn.backward_at)
    backward_eval_at = staticmethod(_bn.backward_eval_at)
    stats = staticmethod(_bn.stats)
    merge_stats = staticmethod(_bn.merge_stats)
    apply = staticmethod(_bn.apply)
    backward_reduce = staticmethod(_bn.backward_reduce)
    backward_apply = staticmethod(_bn.backward_apply)
    optim_plan = _Deferred("fastbn.optim._fused", "step_plan")
    grad_norm = _Deferred("fastbn.optim._optim", "grad_norm")
    scale_grads = _Deferred("fastbn.optim._optim", "scale_grads")
    lerp_ = _Deferred("fastbn.optim._optim", "lerp_")


FAST = FastKernels()
_current = contextvars.ContextVar("fastbn_kernels", default=FAST)
#: The active kernels object; the per-call paths call this (a C method, no frame).
current_kernels = _current.get


def kernels_for(name: str):
    """The kernels object of backend `name` ("fast" or "reference")."""
    if name == "fast":
        return FAST
    if not isinstance(name, str):
        raise TypeError(f"name: expected a backend name (a str, one of {BACKENDS}), "
                        f"got {type(name).__name__} {name!r}")
    if name not in BACKENDS:
        raise ValueError(f"name: expected a backend name, one of {BACKENDS}, got {name!r}")
    # imported here: fastbn.reference imports fastbn.functional, which imports this module
    from .reference._kernels import REFERENCE
    return REFERENCE


def get_backend() -> str:
    """Return the active backend name: "fast" (C kernels) or "reference" (NumPy)."""
    return _current.get().name


def set_backend(name: str) -> None:
    """Select the backend for the current thread/context ("fast" or "reference").

    Raises
    ------
    TypeError
        `name` is not a str.
    ValueError
        `name` is not one of the backend names.
    """
    _current.set(kernels_for(name))


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Context manager running the public API on the named backend.

    >>> with fastbn.use_backend("reference"):
    ...     y = fastbn.functional.batch_norm(x, mean, var)
    """
    token = _current.set(kernels_for(name))
    try:
        yield name
    finally:
        _current.reset(token)

