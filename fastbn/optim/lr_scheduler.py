"""Learning-rate schedulers with ``torch.optim.lr_scheduler``'s classes, names,
arguments, defaults and behaviour.

A scheduler drives any optimizer whose ``param_groups`` is a list of dicts
holding ``'lr'`` (every fastbn optimizer; momentum cycling also needs
``'momentum'`` or ``'betas'``)::

    opt = fastbn.optim.SGD(params, lr=0.1, momentum=0.9)
    sched = fastbn.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    for epoch in range(100):
        train_one_epoch(opt)        # calls opt.step()
        sched.step()

Construction performs the first step (``last_epoch`` becomes 0) and records
each group's starting learning rate as ``group['initial_lr']`` (the scheduler's
``base_lrs``). One base learning rate per param group.

Where the formulas live
-----------------------
Every curve is implemented once, in :mod:`fastbn.schedules`; the classes
evaluate those functions at ``last_epoch``. PyTorch updates several
schedulers recursively (StepLR, MultiStepLR, ConstantLR, LinearLR,
ExponentialLR, PolynomialLR, CosineAnnealingLR: "chainable"): each step
scales the optimizer's *current* lr by the curve's relative change, so that
schedulers composed with :class:`ChainedScheduler`, or combined with manual
lr changes, multiply. fastbn keeps that observable behaviour with one rule
(``_chain``): if the group's lr is still exactly the curve's previous value,
the new value is the curve's value (so a scheduler on its own gives exactly
the closed form, with no rounding drift); otherwise the curve's relative
change is applied to the current lr, as PyTorch does. On its own a chainable
scheduler therefore matches PyTorch up to PyTorch's own accumulated rounding
(about 1e-15 relative per step).

Deviations from PyTorch (all on inputs PyTorch mishandles or accepts silently)
------------------------------------------------------------------------------
- Arguments are validated (negative step sizes, ``total_iters <= 0``,
  unknown modes, decreasing milestones, ...) with messages naming the
  argument, the expectation and the value. PyTorch accepts several of these
  and fails later (ZeroDivisionError) or silently.
- ``SequentialLR`` requires strictly increasing milestones; ``MultiStepLR``
  requires non-decreasing ones (repeats still multiply by ``gamma ** n``).
- ``CyclicLR`` always starts at ``base_lr``, also when the optimizer already
  carries an ``'initial_lr'`` from another scheduler (PyTorch's first value is
  then that stale ``initial_lr``).
- ``OneCycleLR`` with ``pct_start * total_steps == 1`` (a warm-up phase of
  zero length) starts at the peak; PyTorch raises ZeroDivisionError.
  ``pct_start`` may be any real in [0, 1] (PyTorch requires a float).
- ``ConstantLR(factor=0)`` restores the base lr at ``total_iters``; PyTorch
  divides by zero.
- ``CosineAnnealingWarmRestarts.step(epoch)`` places epochs on cycle
  boundaries exactly (PyTorch's float logarithm can put e.g. epoch 111 with
  ``T_0=1, T_mult=10`` at the end of the previous cycle instead of the start
  of the next).
- The optimizer is duck-typed (``param_groups``), not required to be a
  ``torch.optim.Optimizer``. Learning rates (arguments and the groups' ``'lr'``)
  may be given as 0-d or one-element arrays or tensors, as PyTorch accepts;
  they are converted to Python floats, and the groups hold floats afterwards
  (PyTorch keeps a tensor lr a tensor).
- Hyperparameters must be finite; periods, ``T_0``, ``T_mult`` and steps at
  most 2**53 (ValueError naming the argument). A value returned by an
  ``lr_lambda`` or ``scale_fn`` that is not a finite real number raises
  TypeError/ValueError naming the function and the step.
- A constructor that takes the first step (every scheduler but SequentialLR,
  ChainedScheduler and ReduceLROnPlateau) and raises leaves the optimizer's
  param groups (and its ``step`` method) as they were.

PyTorch behaviours kept on purpose
----------------------------------
- Resuming with ``last_epoch >= 0``: the construction step applies the
  schedule's change for StepLR, MultiStepLR and ConstantLR but leaves the lr
  unchanged for LinearLR, ExponentialLR, PolynomialLR, CosineAnnealingLR and
  MultiplicativeLR.
- ``OneCycleLR`` accepts ``last_epoch == total_steps`` (one step past the
  final value, extrapolated) and raises ValueError on the step after.
- ``CosineAnnealingLR`` is not clamped at ``T_max``.

Cost: a scheduler evaluates its curve through
:meth:`fastbn.schedules.Schedule.at`, which computes blocks of steps in one
vectorized call, so a ``step()`` is mostly Python bookkeeping (tens of
microseconds), negligible beside a training step.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import types
import warnings
import weakref
from collections import Counter
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

from .. import schedules
from .._validation import check_int, check_range, describe

__all__ = [
    "LRScheduler", "LambdaLR", "MultiplicativeLR", "StepLR", "MultiStepLR", "ConstantLR",
    "LinearLR", "ExponentialLR", "SequentialLR", "PolynomialLR", "CosineAnnealingLR",
    "ChainedScheduler", "ReduceLROnPlateau", "CyclicLR", "CosineAnnealingWarmRestarts",
    "OneCycleLR",
]

EPOCH_DEPRECATION_WARNING = (
    "The epoch parameter in `scheduler.step()` was not necessary and is being deprecated "
    "where possible. Please use `scheduler.step()` to step the scheduler. During the "
    "deprecation, if epoch is different from None, the closed form is used instead of the "
    "new chainable form, where available.")

#: Where the call-order warnings send the user: PyTorch's documentation of the
#: training loop with a scheduler, which fastbn's schedulers follow.
CALL_ORDER_GUIDANCE = (
    "See more details at https://pytorch.org/docs/stable/optim.html#how-to-adjust-learning-rate")

FloatOrList = Union[float, Sequence[float]]


# ---- the optimizer seen by a scheduler -------------------------------------------

def _check_optimizer(optimizer, owner: str) -> None:
    groups = getattr(optimizer, "param_groups", None)
    if (not isinstance(groups, (list, tuple)) or not groups
            or not all(isinstance(group, dict) and "lr" in group for group in groups)):
        raise TypeError(
            f"{owner}: optimizer: expected an optimizer whose `param_groups` is a non-empty list "
            f"of dicts with an 'lr' entry (e.g. fastbn.optim.SGD), got {describe(optimizer)}")


def _group_lrs(optimizer, key: str = "lr") -> List[float]:
    """Each group's `key` (a learning rate) as a float: a 0-d array or tensor
    set by the user (torch accepts those) is converted."""
    return [_as_lr(group[key], f"param_groups[{index}][{key!r}]")
            for index, group in enumerate(optimizer.param_groups)]


# A learning rate, momentum or factor: a finite real, or a one-element array
# or tensor. The schedules' own checks, so a scheduler accepts exactly the
# values its curve in fastbn.schedules accepts.
_as_lr = schedules.as_real
_nonnegative = schedules._nonnegative
_positive = schedules._positive


def _per_group(name: str, optimizer, value, *, check=_as_lr) -> list:
    """One value per param group: a scalar is repeated, a list must match."""
    count = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name}: expected one value per param group ({count}), "
                             f"got {len(value)} values")
        return [check(item, f"{name}[{index}]") for index, item in enumerate(value)]
    return [check(value, name)] * count


def _momentum_key(optimizer, owner: str) -> str:
    """'betas' (Adam-like: cycle beta1) or 'momentum' (SGD-like), as torch decides."""
    groups = optimizer.param_groups
    defaults = getattr(optimizer, "defaults", None)
    if isinstance(defaults, dict) and ("betas" in defaults or "momentum" in defaults):
        key = "betas" if "betas" in defaults else "momentum"
        if all(key in group for group in groups):
            return key
    for key in ("betas", "momentum"):
        if all(key in group for group in groups):
            return key
    raise ValueError(
        f"{owner}: cycle_momentum=True needs an optimizer whose param groups have 'momentum' "
        f"(SGD, RMSprop) or 'betas' (Adam, AdamW, Lion), got param group keys "
        f"{sorted(groups[0])}; pass cycle_momentum=False to schedule only the learning rate")


def _set_momentum(group: dict, key: str, value: float) -> None:
    if key == "betas":
        group["betas"] = (value, *tuple(group["betas"])[1:])
    else:
        group["momentum"] = value


_MISSING = object()


@contextlib.contextmanager
def _unchanged_on_error(optimizer) -> Iterator[None]:
    """Undo the changes a scheduler's construction made to the optimizer (its
    param groups' entries and the ``step`` wrapper) if the construction raises:
    an exception leaves the optimizer as it was."""
    saved_groups = [dict(group) for group in optimizer.param_groups]
    instance_attributes = getattr(optimizer, "__dict__", None)
    saved_step = instance_attributes.get("step", _MISSING) if instance_attributes is not None else None
    try:
        yield
    except BaseException:
        # Entries are replaced, never mutated in place (betas is a new tuple),
        # so the shallow copies hold the old values.
        for group, saved in zip(optimizer.param_groups, saved_groups):
            group.clear()
            group.update(saved)
        if instance_attributes is not None:
            if saved_step is _MISSING:
                instance_attributes.pop("step", None)
            else:
                instance_attributes["step"] = saved_step
        raise


class _RecordingStep:
    """``optimizer.step`` wrapped to record that it ran (``optimizer._opt_called``).

    Installed as an instance attribute of the optimizer, so it holds the
    optimizer through a weak reference (as PyTorch's wrapper does): a strong
    one would make every optimizer with a scheduler a reference cycle, whose
    state arrays stay alive until the cyclic garbage collector runs. Copies
    of the optimizer (``copy.deepcopy``, pickle) get a wrapper of their own
    that steps the copy, not the original.
    """

    _wrapped_by_lr_sched = True

    def __init__(self, optimizer, function: Callable) -> None:
        functools.update_wrapper(self, function)
        self._optimizer_ref = weakref.ref(optimizer)
        self._function = function

    def _optimizer(self):
        optimizer = self._optimizer_ref()
        if optimizer is None:
            raise ReferenceError("optimizer.step: the optimizer this step method belongs to "
                                 "no longer exists")
        return optimizer

    def __call__(self, *args, **kwargs):
        optimizer = self._optimizer()
        optimizer._opt_called = True
        return self._function(optimizer, *args, **kwargs)

    def __deepcopy__(self, memo: dict) -> "_RecordingStep":
        # Inside copy.deepcopy(optimizer) the memo already maps the optimizer
        # to its copy, which this returns.
        return _RecordingStep(copy.deepcopy(self._optimizer(), memo), self._function)

    def __reduce__(self):
        return _RecordingStep, (self._optimizer(), self._function)


def _track_optimizer_step(optimizer) -> None:
    """Wrap ``optimizer.step`` to record that it ran (for the call-order warning).

    As PyTorch does; skipped silently for optimizers whose ``step`` is not a
    bound method or that cannot take an instance attribute.
    """
    step = getattr(optimizer, "step", None)
    function = getattr(step, "__func__", None)
    if function is None or getattr(step, "_wrapped_by_lr_sched", False):
        return
    try:
        optimizer.step = _RecordingStep(optimizer, function)
    except (AttributeError, TypeError):  # no instance attributes or no weak references
        return


@functools.lru_cache(maxsize=512)
def _cached_schedule(factory: Callable[..., schedules.Schedule], *args, **kwargs) -> schedules.Schedule:
    return factory(*args, **kwargs)


def _schedule(factory: Callable[..., schedules.Schedule], *args, **kwargs) -> schedules.Schedule:
    """``factory(*args, **kwargs)``, memoized: schedulers rebuild the same
    Schedule every step, and building one validates every argument. Schedules
    holding a user function are not memoized (the cache would keep it alive)."""
    if any(callable(value) for value in (*args, *kwargs.values())):
        return factory(*args, **kwargs)
    try:
        return _cached_schedule(factory, *args, **kwargs)
    except TypeError as error:
        if "unhashable" not in str(error):
            raise
        return factory(*args, **kwargs)


def _chain(lr: float, previous: float, target: float, floor: float = 0.0) -> float:
    """The chainable update shared by every recursive scheduler.

    `previous` and `target` are the curve's values at the last and the current
    step, `lr` the optimizer's current value. If the lr still equals the
    curve's previous value the curve's value is returned as is; otherwise the
    curve's relative change (around `floor`, the curve's asymptote: eta_min
    for cosine) is applied to the lr, as PyTorch's recursive formulas do. When
    the previous value sits on the floor the change is applied additively
    (PyTorch's special case at a cosine trough).
    """
    if target == previous:
        return lr
    if lr == previous:
        return target
    if previous == floor:
        return lr + (target - previous)
    return floor + (lr - floor) * ((target - floor) / (previous - floor))


def _warn_get_lr_called_outside_step(scheduler: "LRScheduler") -> None:
    if not scheduler._get_lr_called_within_step:
        warnings.warn("To get the last learning rate computed by the scheduler, "
                      "please use `get_last_lr()`.", UserWarning, stacklevel=3)


def _state_without(scheduler, excluded: Sequence[str]) -> Dict[str, Any]:
    return {key: copy.deepcopy(value) for key, value in scheduler.__dict__.items()
            if key not in excluded}


def _function_state(function) -> Optional[dict]:
    """What a state_dict keeps of a user function: the attributes of a callable
    object, nothing of a plain function or lambda (as PyTorch)."""
    if function is None or isinstance(function, (types.FunctionType, functools.partial)):
        return None
    return copy.deepcopy(function.__dict__) if hasattr(function, "__dict__") else None


# ---- base class ---------------------------------------------------------------------

class LRScheduler:
    """Base class of the learning-rate schedulers.

    Subclasses implement :meth:`get_lr` (the lrs at ``last_epoch``).

    Parameters
    ----------
    optimizer : Optimizer
        Any object with ``param_groups``, a list of dicts holding ``'lr'``.
    last_epoch : int, default -1
        Index of the last step taken. -1 starts fresh (and sets each group's
        ``'initial_lr'`` to its current lr); a value >= 0 resumes, and then
        every group must already have ``'initial_lr'`` (KeyError otherwise).

    Attributes
    ----------
    optimizer
        The optimizer whose ``group['lr']`` values are set.
    base_lrs : list of float
        One base learning rate per param group (``group['initial_lr']``).
    last_epoch : int
        Number of ``step()`` calls since step 0 (construction is step 0).

    Notes
    -----
    Call ``optimizer.step()`` before ``scheduler.step()``; the first
    ``scheduler.step()`` warns when the optimizer has not stepped yet, as
    PyTorch does (the first value of the schedule would be skipped).
    Constructing a scheduler overwrites ``group['lr']``: when resuming,
    construct it before loading the optimizer's state.
    """

    _get_lr_called_within_step: bool = False
    _is_initial: bool = False

    def __init__(self, optimizer, last_epoch: int = -1) -> None:
        _check_optimizer(optimizer, type(self).__name__)
        with _unchanged_on_error(optimizer):
            self._attach(optimizer, last_epoch)

    def _attach(self, optimizer, last_epoch: int) -> None:
        """Check the groups, set 'initial_lr', wrap ``optimizer.step`` and take step 0."""
        last_epoch = check_int(last_epoch, "last_epoch", minimum=-1)
        self.optimizer = optimizer
        if last_epoch == -1:
            # Every lr is checked (and converted to a float) before any group is changed.
            lrs = _group_lrs(optimizer)
            for index, group in enumerate(optimizer.param_groups):
                if "initial_lr" in group:
                    _as_lr(group["initial_lr"], f"param_groups[{index}]['initial_lr']")
            for lr, group in zip(lrs, optimizer.param_groups):
                group.setdefault("initial_lr", lr)
        else:
            for index, group in enumerate(optimizer.param_groups):
                if "initial_lr" not in group:
                    raise KeyError(
                        f"param 'initial_lr' is not specified in param_groups[{index}] when "
                        f"resuming a scheduler with last_epoch={last_epoch} >= 0: load the "
                        "optimizer's state (which holds 'initial_lr') first, or use "
                        "last_epoch=-1 for a fresh run")
        self.base_lrs: List[float] = self._resolve_base_lrs()
        self.last_epoch = last_epoch
        _track_optimizer_step(optimizer)
        self._initial_step()

    def _resolve_base_lrs(self) -> List[float]:
        return _group_lrs(self.optimizer, "initial_lr")

    def _initial_step(self) -> None:
        """Reset the step count and take step 0."""
        self._step_count = 0
        self._is_initial = True
        try:
            self.step()
        finally:
            self._is_initial = False

    def state_dict(self) -> Dict[str, Any]:
        """The scheduler's state: every attribute except the optimizer (a copy)."""
        return _state_without(self, ("optimizer",))

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a state returned by :meth:`state_dict`.

        The optimizer's lrs are not part of it: restore the optimizer's own
        state as well (its ``param_groups`` hold the current lrs).
        """
        self.__dict__.update(copy.deepcopy(state_dict))

    def get_last_lr(self) -> List[float]:
        """The learning rates set by the last step, one per param group."""
        return list(self._last_lr)

    def get_lr(self) -> List[float]:
        """The learning rates at ``last_epoch`` (called by :meth:`step`;
        use :meth:`get_last_lr` to read the current values)."""
        raise NotImplementedError

    def step(self, epoch: Optional[int] = None) -> None:
        """Advance one step and set every group's lr.

        Parameters
        ----------
        epoch : int, optional
            Deprecated (as in PyTorch): jump to this step, using the closed
            form where the scheduler has one. Emits a UserWarning.
        """
        if self._step_count == 1:
            self._warn_if_optimizer_not_stepped()
        self._step_count += 1
        if epoch is not None:
            warnings.warn(EPOCH_DEPRECATION_WARNING, UserWarning, stacklevel=2)
        self._update_lr(epoch)

    def _warn_if_optimizer_not_stepped(self) -> None:
        step = getattr(self.optimizer, "step", None)
        if step is None:
            return
        if not getattr(step, "_wrapped_by_lr_sched", False):
            if getattr(step, "__func__", None) is not None:
                warnings.warn(
                    "Seems like `optimizer.step()` has been overridden after learning rate "
                    "scheduler initialization. Please, make sure to call `optimizer.step()` "
                    "before `lr_scheduler.step()`. " + CALL_ORDER_GUIDANCE,
                    UserWarning, stacklevel=3)
        elif not getattr(self.optimizer, "_opt_called", False):
            warnings.warn(
                "Detected call of `lr_scheduler.step()` before `optimizer.step()`. As in PyTorch "
                "1.1.0 and later, you should call them in the opposite order: "
                "`optimizer.step()` before `lr_scheduler.step()`. Failure to do this will result "
                "in skipping the first value of the learning rate schedule. "
                + CALL_ORDER_GUIDANCE, UserWarning, stacklevel=3)

    def _update_lr(self, epoch: Optional[int] = None) -> None:
        self._get_lr_called_within_step = True
        try:
            if epoch is None:
                self.last_epoch += 1
                values = self.get_lr()
            else:
                self.last_epoch = epoch
                closed_form = getattr(self, "_get_closed_form_lr", None)
                values = closed_form() if closed_form is not None else self.get_lr()
        finally:
            self._get_lr_called_within_step = False
        groups = self.optimizer.param_groups
        if len(values) != len(groups):
            raise ValueError(
                f"{type(self).__name__}: the optimizer has {len(groups)} param groups but the "
                f"scheduler computed {len(values)} learning rates; param groups added after "
                "the scheduler was created are not supported")
        for group, lr in zip(groups, values):
            group["lr"] = lr
        self._last_lr = _group_lrs(self.optimizer)


class _ChainableLRScheduler(LRScheduler):
    """A scheduler PyTorch updates recursively: see the module docstring.

    Subclasses give `_curve(base_lr)` (a :class:`fastbn.schedules.Schedule`)
    and, for an affine curve, `_curve_floor()`.
    """

    #: PyTorch leaves the lr unchanged on the construction step when resuming
    #: (last_epoch >= 0) for some schedulers and applies the step for others.
    _resume_keeps_lr = True

    def _curve(self, base_lr: float) -> schedules.Schedule:
        raise NotImplementedError

    def _curve_floor(self) -> float:
        return 0.0

    def get_lr(self) -> List[float]:
        _warn_get_lr_called_outside_step(self)
        current = _group_lrs(self.optimizer)
        epoch = self.last_epoch
        if self._is_initial and epoch > 0 and self._resume_keeps_lr:
            return current
        floor = self._curve_floor()
        lrs = []
        for lr, base_lr in zip(current, self.base_lrs):
            curve = self._curve(base_lr)
            # Step 0 is relative to the unscheduled lr, i.e. the base lr.
            previous = base_lr if epoch == 0 else curve.at(epoch - 1)
            target = curve.at(epoch)
            lrs.append(_chain(lr, previous, target, floor))
        return lrs

    def _get_closed_form_lr(self) -> List[float]:
        return [self._curve(base_lr).at(self.last_epoch) for base_lr in self.base_lrs]


def _check_lr_lambdas(optimizer, lr_lambda, owner: str) -> list:
    count = len(optimizer.param_groups)
    if isinstance(lr_lambda, (list, tuple)):
        if len(lr_lambda) != count:
            raise ValueError(f"{owner}: lr_lambda: expected {count} functions (one per param "
                             f"group), got {len(lr_lambda)}")
        functions = list(lr_lambda)
    else:
        functions = [lr_lambda] * count
    for index, function in enumerate(functions):
        if not callable(function):
            raise TypeError(f"{owner}: lr_lambda: expected a function of the epoch, got "
                            f"{describe(function)}" + (f" at index {index}" if count > 1 else ""))
    return functions


class _LambdaLRScheduler(LRScheduler):
    """Schedulers built on user functions of the epoch, one per param group,
    held in ``lr_lambdas`` (their state_dict keeps what PyTorch keeps)."""

    def __init__(self, optimizer, lr_lambda: Union[Callable[[int], float], Sequence[Callable]],
                 last_epoch: int = -1) -> None:
        owner = type(self).__name__
        _check_optimizer(optimizer, owner)
        self.optimizer = optimizer
        self.lr_lambdas = _check_lr_lambdas(optimizer, lr_lambda, owner)
        super().__init__(optimizer, last_epoch)

    def state_dict(self) -> Dict[str, Any]:
        state = _state_without(self, ("optimizer", "lr_lambdas"))
        state["lr_lambdas"] = [_function_state(function) for function in self.lr_lambdas]
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state = dict(state_dict)
        lambda_states = state.pop("lr_lambdas")
        self.__dict__.update(copy.deepcopy(state))
        for function, saved in zip(self.lr_lambdas, lambda_states):
            if saved is not None:
                function.__dict__.update(copy.deepcopy(saved))


# ---- schedulers built on a user function ---------------------------------------------

class LambdaLR(_LambdaLRScheduler):
    """``lr = base_lr * lr_lambda(epoch)``.

    Parameters
    ----------
    optimizer : Optimizer
    lr_lambda : callable or list of callables
        A function of the (integer) epoch returning a factor, or one per
        param group.
    last_epoch : int, default -1

    Notes
    -----
    ``state_dict`` keeps the attributes of callable objects but not plain
    functions or lambdas (as PyTorch). Pure form:
    :func:`fastbn.schedules.lambda_schedule`.
    """

    def get_lr(self) -> List[float]:
        _warn_get_lr_called_outside_step(self)
        return [_schedule(schedules.lambda_schedule, base_lr, function).at(self.last_epoch)
                for function, base_lr in zip(self.lr_lambdas, self.base_lrs)]


class MultiplicativeLR(_LambdaLRScheduler):
    """``lr = lr * lr_lambda(epoch)`` at every step after construction.

    Parameters
    ----------
    optimizer : Optimizer
    lr_lambda : callable or list of callables
        Factor applied at each step (one function, or one per param group).
    last_epoch : int, default -1

    Notes
    -----
    Recursive by definition: the scheduler multiplies the current lr, and
    :func:`fastbn.schedules.multiplicative` is the running product of the
    same factors.
    """

    def get_lr(self) -> List[float]:
        _warn_get_lr_called_outside_step(self)
        current = _group_lrs(self.optimizer)
        if self._is_initial:
            return current
        return [lr * schedules.user_function_value(function, self.last_epoch, "lr_lambda")
                for lr, function in zip(current, self.lr_lambdas)]


# ---- chainable schedulers ---------------------------------------------------------------

class StepLR(_ChainableLRScheduler):
    """Multiply the lr by `gamma` every `step_size` epochs:
    ``base_lr * gamma ** (epoch // step_size)``.

    Parameters
    ----------
    optimizer : Optimizer
    step_size : int
        Period of the decay (>= 1).
    gamma : float, default 0.1
        Multiplicative factor (>= 0).
    last_epoch : int, default -1

    Notes
    -----
    Pure form: :func:`fastbn.schedules.step_decay`.
    """

    _resume_keeps_lr = False

    def __init__(self, optimizer, step_size: int, gamma: float = 0.1, last_epoch: int = -1) -> None:
        self.step_size = check_int(step_size, "step_size", minimum=1)
        self.gamma = _nonnegative(gamma, "gamma")
        super().__init__(optimizer, last_epoch)

    def _curve(self, base_lr: float) -> schedules.Schedule:
        return _schedule(schedules.step_decay, base_lr, self.step_size, self.gamma)


class MultiStepLR(_ChainableLRScheduler):
    """Multiply the lr by `gamma` at each milestone:
    ``base_lr * gamma ** bisect_right(milestones, epoch)``.

    Parameters
    ----------
    optimizer : Optimizer
    milestones : sequence of int
        Non-decreasing epochs >= 0; a milestone repeated ``n`` times
        multiplies by ``gamma ** n``.
    gamma : float, default 0.1
    last_epoch : int, default -1

    Notes
    -----
    Pure form: :func:`fastbn.schedules.multistep`.
    """

    _resume_keeps_lr = False

    def __init__(self, optimizer, milestones: Sequence[int], gamma: float = 0.1,
                 last_epoch: int = -1) -> None:
        self.milestones = Counter(schedules.check_milestones(milestones, strict=False))
        self.gamma = _nonnegative(gamma, "gamma")
        super().__init__(optimizer, last_epoch)

    def _curve(self, base_lr: float) -> schedules.Schedule:
        return _schedule(schedules.multistep, base_lr, tuple(sorted(self.milestones.elements())),
                         self.gamma)


class ConstantLR(_ChainableLRScheduler):
    """``base_lr * factor`` until epoch `total_iters`, then ``base_lr``.

    Parameters
    ----------
    optimizer : Optimizer
    factor : float, default 1/3
        In [0, 1].
    total_iters : int, default 5
        Number of epochs (>= 0) at the reduced lr.
    last_epoch : int, default -1

    Notes
    -----
    Pure form: :func:`fastbn.schedules.constant_warmup`.
    """

    _resume_keeps_lr = False

    def __init__(self, optimizer, factor: float = 1.0 / 3, total_iters: int = 5,
                 last_epoch: int = -1) -> None:
        self.factor = check_range(factor, "factor", 0.0, 1.0)
        self.total_iters = check_int(total_iters, "total_iters", minimum=0)
        super().__init__(optimizer, last_epoch)

    def _curve(self, base_lr: float) -> schedules.Schedule:
        return _schedule(schedules.constant_warmup, base_lr, self.factor, self.total_iters)


class LinearLR(_ChainableLRScheduler):
    """Linear change of the lr's multiplier from `start_factor` to `end_factor`
    over `total_iters` epochs (a linear warm-up by default).

    Parameters
    ----------
    optimizer : Optimizer
    start_factor : float, default 1/3
        In (0, 1].
    end_factor : float, default 1.0
        In [0, 1].
    total_iters : int, default 5
        Length of the ramp (>= 1).
    last_epoch : int, default -1

    Notes
    -----
    Pure form: :func:`fastbn.schedules.linear` (and :func:`~fastbn.schedules.warmup`).
    """

    def __init__(self, optimizer, start_factor: float = 1.0 / 3, end_factor: float = 1.0,
                 total_iters: int = 5, last_epoch: int = -1) -> None:
        self.start_factor = check_range(start_factor, "start_factor", 0.0, 1.0, low_inclusive=False)
        self.end_factor = check_range(end_factor, "end_factor", 0.0, 1.0)
        self.total_iters = check_int(total_iters, "total_iters", minimum=1)
        super().__init__(optimizer, last_epoch)

    def _curve(self, base_lr: float) -> schedules.Schedule:
        return _schedule(schedules.linear, base_lr, self.start_factor, self.end_factor,
                         self.total_iters)


class ExponentialLR(_ChainableLRScheduler):
    """``base_lr * gamma ** epoch``.

    Parameters
    ----------
    optimizer : Optimizer
    gamma : float
        Multiplicative factor per epoch (>= 0).
    last_epoch : int, default -1

    Notes
    -----
    Pure form: :func:`fastbn.schedules.exponential_decay`.
    """

    def __init__(self, optimizer, gamma: float, last_epoch: int = -1) -> None:
        self.gamma = _nonnegative(gamma, "gamma")
        super().__init__(optimizer, last_epoch)

    def _curve(self, base_lr: float) -> schedules.Schedule:
        return _schedule(schedules.exponential_decay, base_lr, self.gamma)


class PolynomialLR(_ChainableLRScheduler):
    """``base_lr * (1 - min(epoch, total_iters) / total_iters) ** power``.

    Parameters
    ----------
    optimizer : Optimizer
    total_iters : int, default 5
        Epochs until the lr reaches 0 (>= 1).
    power : float, default 1.0
        Exponent (>= 0).
    last_epoch : int, default -1

    Notes
    -----
    Pure form: :func:`fastbn.schedules.polynomial`.
    """

    def __init__(self, optimizer, total_iters: int = 5, power: float = 1.0,
                 last_epoch: int = -1) -> None:
        self.total_iters = check_int(total_iters, "total_iters", minimum=1)
        self.power = _nonnegative(power, "power")
        super().__init__(optimizer, last_epoch)

    def _curve(self, base_lr: float) -> schedules.Schedule:
        return _schedule(schedules.polynomial, base_lr, self.total_iters, self.power)


class CosineAnnealingLR(_ChainableLRScheduler):
    """Cosine annealing:
    ``eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2``.

    Not clamped: after `T_max` epochs the lr rises again (as in PyTorch).

    Parameters
    ----------
    optimizer : Optimizer
    T_max : int
        Half period, in epochs (> 0).
    eta_min : float, default 0.0
        Minimum learning rate.
    last_epoch : int, default -1

    Notes
    -----
    Pure form: :func:`fastbn.schedules.cosine`. Chained with other
    schedulers, the distance to `eta_min` is scaled (PyTorch's recursive form).
    """

    def __init__(self, optimizer, T_max: int, eta_min: float = 0.0, last_epoch: int = -1) -> None:
        self.T_max = _positive(T_max, "T_max")
        self.eta_min = _as_lr(eta_min, "eta_min")
        super().__init__(optimizer, last_epoch)

    def _curve(self, base_lr: float) -> schedules.Schedule:
        return _schedule(schedules.cosine, base_lr, self.T_max, self.eta_min)

    def _curve_floor(self) -> float:
        return self.eta_min


# ---- composition -------------------------------------------------------------------------

def _check_sub_schedulers(owner: str, schedulers, optimizer) -> list:
    schedulers = list(schedulers)
    if not schedulers:
        raise ValueError(f"{owner}: schedulers: expected at least one scheduler, got none")
    for index, scheduler in enumerate(schedulers):
        if not hasattr(scheduler, "optimizer"):
            raise TypeError(f"{owner}: schedulers[{index}]: expected a scheduler with an "
                            f"`optimizer` attribute, got {describe(scheduler)}")
        if isinstance(scheduler, ReduceLROnPlateau):
            raise ValueError(f"{owner}: schedulers[{index}]: ReduceLROnPlateau is not supported "
                             "(its step() needs the metric)")
        if optimizer is not None and scheduler.optimizer is not optimizer:
            raise ValueError(f"{owner}: schedulers[{index}] ({type(scheduler).__name__}) drives a "
                             "different optimizer; every scheduler must belong to the same one")
    return schedulers


def _composite_state(scheduler) -> Dict[str, Any]:
    state = _state_without(scheduler, ("optimizer", "_schedulers"))
    state["_schedulers"] = [inner.state_dict() for inner in scheduler._schedulers]
    return state


def _load_composite_state(scheduler, state_dict: Dict[str, Any]) -> None:
    state = dict(state_dict)
    inner_states = state.pop("_schedulers")
    scheduler.__dict__.update(copy.deepcopy(state))
    for inner, inner_state in zip(scheduler._schedulers, inner_states):
        inner.load_state_dict(inner_state)


class SequentialLR(LRScheduler):
    """Run `schedulers` one after another, switching at `milestones`.

    At milestone ``m`` the next scheduler restarts from its own epoch 0
    (set from its closed form). Build the inner schedulers on the same
    optimizer first; SequentialLR undoes their construction steps.

    Parameters
    ----------
    optimizer : Optimizer
    schedulers : list of LRScheduler
        At least one; not ReduceLROnPlateau.
    milestones : list of int
        ``len(schedulers) - 1`` strictly increasing epochs.
    last_epoch : int, default -1

    Notes
    -----
    Pure form: :func:`fastbn.schedules.join`.
    """

    def __init__(self, optimizer, schedulers: Sequence[LRScheduler], milestones: Sequence[int],
                 last_epoch: int = -1) -> None:
        _check_optimizer(optimizer, "SequentialLR")
        schedulers = _check_sub_schedulers("SequentialLR", schedulers, optimizer)
        milestones = schedules.check_milestones(milestones)
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(f"SequentialLR: milestones: expected {len(schedulers) - 1} values "
                             f"(one fewer than the {len(schedulers)} schedulers), got "
                             f"{len(milestones)}")
        last_epoch = check_int(last_epoch, "last_epoch", minimum=-1)
        self._schedulers = schedulers
        self._milestones = milestones
        self.last_epoch = last_epoch + 1
        self.optimizer = optimizer
        for index, group in enumerate(optimizer.param_groups):
            if "initial_lr" not in group:
                raise KeyError(f"SequentialLR: param_groups[{index}] has no 'initial_lr'; build "
                               "the inner schedulers on this optimizer first")
            group["lr"] = group["initial_lr"]
        self._undo_construction_steps(self)
        first = self._schedulers[int(schedules.segment_index(self._milestones, 0))]
        first._initial_step()
        self._last_lr = first.get_last_lr()

    def _undo_construction_steps(self, scheduler) -> None:
        if hasattr(scheduler, "_schedulers"):
            for inner in scheduler._schedulers:
                self._undo_construction_steps(inner)
        elif hasattr(scheduler, "last_epoch"):
            scheduler.last_epoch -= 1

    def step(self) -> None:  # type: ignore[override]
        """Advance one epoch: step the active scheduler (restart it at a milestone)."""
        self.last_epoch += 1
        index = int(schedules.segment_index(self._milestones, self.last_epoch))
        scheduler = self._schedulers[index]
        if index > 0 and self._milestones[index - 1] == self.last_epoch:
            scheduler._update_lr(0)
        else:
            scheduler.step()
        self._last_lr = scheduler.get_last_lr()

    def state_dict(self) -> Dict[str, Any]:
        """Own state plus each inner scheduler's state under ``'_schedulers'``."""
        return _composite_state(self)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        _load_composite_state(self, state_dict)


class ChainedScheduler(LRScheduler):
    """Step several schedulers together; their chainable updates multiply.

    Parameters
    ----------
    schedulers : sequence of LRScheduler
        Built on the same optimizer; not ReduceLROnPlateau.
    optimizer : Optimizer, optional
        Defaults to the first scheduler's optimizer.
    """

    def __init__(self, schedulers: Sequence[LRScheduler], optimizer=None) -> None:
        schedulers = list(schedulers) if schedulers is not None else []
        if not schedulers:
            raise ValueError("ChainedScheduler: schedulers: expected at least one scheduler, "
                             "got none")
        optimizer = optimizer if optimizer is not None else getattr(schedulers[0], "optimizer", None)
        self._schedulers = _check_sub_schedulers("ChainedScheduler", schedulers, optimizer)
        self.optimizer = optimizer
        self._last_lr = _group_lrs(self._schedulers[-1].optimizer)

    def step(self) -> None:  # type: ignore[override]
        """Step every scheduler, in order."""
        for scheduler in self._schedulers:
            scheduler.step()
        self._last_lr = _group_lrs(self._schedulers[-1].optimizer)

    def state_dict(self) -> Dict[str, Any]:
        """Own state plus each inner scheduler's state under ``'_schedulers'``."""
        return _composite_state(self)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        _load_composite_state(self, state_dict)


# ---- metric-driven ------------------------------------------------------------------------

class ReduceLROnPlateau(LRScheduler):
    """Multiply the lr by `factor` when a metric has stopped improving.

    After more than `patience` epochs without improvement the lr of every
    group becomes ``max(lr * factor, min_lr)`` (skipped if the change is
    smaller than `eps`), then `cooldown` epochs pass before counting again.

    Parameters
    ----------
    optimizer : Optimizer
    mode : {'min', 'max'}, default 'min'
        Whether the metric should decrease (loss) or increase (accuracy).
    factor : float, default 0.1
        In [0, 1).
    patience : int, default 10
        Epochs without improvement tolerated (>= 0).
    threshold : float, default 1e-4
        Minimum change counted as an improvement (>= 0).
    threshold_mode : {'rel', 'abs'}, default 'rel'
        'rel': better than ``best * (1 -/+ threshold)``; 'abs': ``best -/+ threshold``.
    cooldown : int, default 0
        Epochs to wait after a reduction (>= 0).
    min_lr : float or list of float, default 0
        Lower bound, one for all groups or one per group.
    eps : float, default 1e-8
        Reductions smaller than this are skipped.

    Notes
    -----
    No construction step: the lrs are left as they are until the first
    ``step(metrics)``.
    """

    def __init__(self, optimizer, mode: str = "min", factor: float = 0.1, patience: int = 10,
                 threshold: float = 1e-4, threshold_mode: str = "rel", cooldown: int = 0,
                 min_lr: FloatOrList = 0, eps: float = 1e-8) -> None:
        _check_optimizer(optimizer, "ReduceLROnPlateau")
        self.factor = check_range(factor, "factor", 0.0, 1.0, high_inclusive=False)
        self.optimizer = optimizer
        check_nonnegative = _nonnegative
        if isinstance(min_lr, (list, tuple)):
            self.default_min_lr = None
            self.min_lrs = _per_group("min_lr", optimizer, min_lr, check=check_nonnegative)
        else:
            self.default_min_lr = check_nonnegative(min_lr, "min_lr")
            self.min_lrs = [self.default_min_lr] * len(optimizer.param_groups)
        self.patience = check_int(patience, "patience", minimum=0)
        self.cooldown = check_int(cooldown, "cooldown", minimum=0)
        self.eps = check_nonnegative(eps, "eps")
        self.last_epoch = 0
        self._last_lr = _group_lrs(optimizer)
        self._init_is_better(mode, check_nonnegative(threshold, "threshold"), threshold_mode)
        self._reset()

    def _reset(self) -> None:
        self.best = self.mode_worse
        self.cooldown_counter = 0
        self.num_bad_epochs = 0

    def _init_is_better(self, mode: str, threshold: float, threshold_mode: str) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode: expected 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode: expected 'rel' or 'abs', got {threshold_mode!r}")
        self.mode_worse = math.inf if mode == "min" else -math.inf
        self.mode = mode
        self.threshold = threshold
        self.threshold_mode = threshold_mode

    @property
    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    def _is_better(self, current: float, best: float) -> bool:
        if self.mode == "min" and self.threshold_mode == "rel":
            return current < best * (1.0 - self.threshold)
        if self.mode == "min":
            return current < best - self.threshold
        if self.threshold_mode == "rel":
            return current > best * (self.threshold + 1.0)
        return current > best + self.threshold

    def step(self, metrics, epoch: Optional[int] = None) -> None:  # type: ignore[override]
        """Record one epoch's metric and reduce the lrs if it has plateaued."""
        try:
            current = float(metrics)
        except (TypeError, ValueError):
            raise TypeError(f"metrics: expected a number (the monitored quantity), "
                            f"got {describe(metrics)}") from None
        if epoch is None:
            epoch = self.last_epoch + 1
        else:
            warnings.warn(EPOCH_DEPRECATION_WARNING, UserWarning, stacklevel=2)
        self.last_epoch = epoch
        if self._is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.in_cooldown:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            self._reduce_lr()
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lr = _group_lrs(self.optimizer)

    def _reduce_lr(self) -> None:
        groups = self.optimizer.param_groups
        if len(groups) != len(self.min_lrs):
            if self.default_min_lr is None:
                raise RuntimeError(
                    f"ReduceLROnPlateau: the optimizer has {len(groups)} param groups but min_lr "
                    f"has {len(self.min_lrs)} values (a group was added after the scheduler was "
                    "created); set `min_lrs` to one value per group")
            self.min_lrs = [self.default_min_lr] * len(groups)
        for group, min_lr in zip(groups, self.min_lrs):
            old_lr = float(group["lr"])
            new_lr = max(old_lr * self.factor, min_lr)
            if old_lr - new_lr > self.eps:
                group["lr"] = new_lr

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._init_is_better(self.mode, self.threshold, self.threshold_mode)


# ---- closed-form schedulers ------------------------------------------------------------------

class CyclicLR(LRScheduler):
    """Cyclical learning rate (Smith 2017), updated every batch.

    The lr goes from `base_lr` up to `max_lr` in `step_size_up` steps and
    back in `step_size_down` steps; momentum (or Adam's first beta) moves
    inversely between `max_momentum` and `base_momentum`.

    Parameters
    ----------
    optimizer : Optimizer
    base_lr, max_lr : float or list of float
        Bounds, one value or one per param group. Construction sets each
        group's lr to `base_lr`.
    step_size_up : float, default 2000
        Steps of the rising half (> 0).
    step_size_down : float, optional
        Steps of the falling half (>= 0); defaults to `step_size_up`.
    mode : {'triangular', 'triangular2', 'exp_range'}, default 'triangular'
        Amplitude policy: constant, halved every cycle, or ``gamma ** step``.
        Ignored when `scale_fn` is given.
    gamma : float, default 1.0
        Base of 'exp_range'.
    scale_fn : callable, optional
        Custom amplitude scale, a function of the cycle number or the step.
    scale_mode : {'cycle', 'iterations'}, default 'cycle'
        Argument of `scale_fn`.
    cycle_momentum : bool, default True
        Also cycle ``group['momentum']`` or ``group['betas'][0]``; the
        optimizer must have one of them (ValueError otherwise).
    base_momentum, max_momentum : float or list of float
        Momentum bounds (0.8 and 0.9).
    last_epoch : int, default -1

    Notes
    -----
    Pure form: :func:`fastbn.schedules.cyclical` (the momentum is the same
    function with the bounds swapped).
    """

    def __init__(self, optimizer, base_lr: FloatOrList, max_lr: FloatOrList,
                 step_size_up: float = 2000, step_size_down: Optional[float] = None,
                 mode: str = "triangular", gamma: float = 1.0,
                 scale_fn: Optional[Callable[[float], float]] = None, scale_mode: str = "cycle",
                 cycle_momentum: bool = True, base_momentum: FloatOrList = 0.8,
                 max_momentum: FloatOrList = 0.9, last_epoch: int = -1) -> None:
        _check_optimizer(optimizer, "CyclicLR")
        with _unchanged_on_error(optimizer):
            self.optimizer = optimizer
            base_lrs = _per_group("base_lr", optimizer, base_lr)
            self.max_lrs = _per_group("max_lr", optimizer, max_lr)
            # Validates the shape arguments once (and normalizes scale_mode as torch does).
            shape = schedules.cyclical(0.0, 1.0, step_size_up, step_size_down, mode, gamma,
                                       scale_fn, scale_mode).params
            self.step_size_up = shape["step_size_up"]
            self.step_size_down = shape["step_size_down"]
            self.total_size = self.step_size_up + self.step_size_down
            self.step_ratio = self.step_size_up / self.total_size
            self.mode = mode
            self.gamma = shape["gamma"]
            self._scale_fn_custom = scale_fn
            self.scale_mode = shape["scale_mode"]
            self.cycle_momentum = bool(cycle_momentum)
            last_epoch = check_int(last_epoch, "last_epoch", minimum=-1)
            if last_epoch == -1:
                for lr, group in zip(base_lrs, optimizer.param_groups):
                    group["lr"] = lr
            if self.cycle_momentum:
                momentum_key = _momentum_key(optimizer, "CyclicLR")
                self.use_beta1 = momentum_key == "betas"
                self.base_momentums = _per_group("base_momentum", optimizer, base_momentum)
                self.max_momentums = _per_group("max_momentum", optimizer, max_momentum)
                if last_epoch == -1:
                    for max_m, base_m, group in zip(self.max_momentums, self.base_momentums,
                                                    optimizer.param_groups):
                        _set_momentum(group, momentum_key, max_m)
                        group["max_momentum"] = max_m
                        group["base_momentum"] = base_m
            self._cyclic_base_lrs = base_lrs
            super().__init__(optimizer, last_epoch)
            del self._cyclic_base_lrs

    def _resolve_base_lrs(self) -> List[float]:
        return list(self._cyclic_base_lrs)

    def _schedule(self, low: float, high: float) -> schedules.Schedule:
        return _schedule(schedules.cyclical, low, high, self.step_size_up, self.step_size_down,
                         self.mode, self.gamma, self._scale_fn_custom, self.scale_mode)

    def scale_fn(self, x: float) -> float:
        """The amplitude scale at `x` (a cycle number or a step, see `scale_mode`)."""
        if self._scale_fn_custom is not None:
            return self._scale_fn_custom(x)
        if self.mode == "triangular":
            return 1.0
        if self.mode == "triangular2":
            return 1 / (2.0 ** (x - 1))
        return self.gamma ** x

    def get_lr(self) -> List[float]:
        _warn_get_lr_called_outside_step(self)
        epoch = self.last_epoch
        lrs = [self._schedule(base_lr, max_lr).at(epoch)
               for base_lr, max_lr in zip(self.base_lrs, self.max_lrs)]
        if self.cycle_momentum:
            key = "betas" if self.use_beta1 else "momentum"
            for group, base_m, max_m in zip(self.optimizer.param_groups, self.base_momentums,
                                            self.max_momentums):
                _set_momentum(group, key, self._schedule(max_m, base_m).at(epoch))
        return lrs

    def state_dict(self) -> Dict[str, Any]:
        """State without the custom `scale_fn` (a callable object keeps its attributes)."""
        state = _state_without(self, ("optimizer", "_scale_fn_custom"))
        state["_scale_fn_custom"] = _function_state(self._scale_fn_custom)
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state = dict(state_dict)
        saved_fn_state = state.pop("_scale_fn_custom", None)
        self.__dict__.update(copy.deepcopy(state))
        if saved_fn_state is not None and self._scale_fn_custom is not None:
            self._scale_fn_custom.__dict__.update(copy.deepcopy(saved_fn_state))


class CosineAnnealingWarmRestarts(LRScheduler):
    """Cosine annealing with warm restarts (SGDR, Loshchilov & Hutter).

    ``eta_min + (base_lr - eta_min) * (1 + cos(pi * T_cur / T_i)) / 2``, where
    ``T_cur`` counts epochs since the last restart and ``T_i`` is the length
    of the current cycle (`T_0`, then multiplied by `T_mult` at each restart).

    Parameters
    ----------
    optimizer : Optimizer
    T_0 : int
        Length of the first cycle (>= 1).
    T_mult : int, default 1
        Growth of the cycle length (>= 1).
    eta_min : float, default 0.0
    last_epoch : int, default -1

    Notes
    -----
    ``step(epoch)`` accepts fractional epochs (e.g. ``epoch + batch / n_batches``)
    without a deprecation warning, as in PyTorch. Pure form:
    :func:`fastbn.schedules.cosine_warm_restarts`.
    """

    def __init__(self, optimizer, T_0: int, T_mult: int = 1, eta_min: float = 0.0,
                 last_epoch: int = -1) -> None:
        self.T_0 = schedules.check_count(T_0, "T_0")
        self.T_i = self.T_0
        self.T_mult = schedules.check_count(T_mult, "T_mult")
        self.eta_min = _as_lr(eta_min, "eta_min")
        self.T_cur = check_int(last_epoch, "last_epoch", minimum=-1)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> List[float]:
        _warn_get_lr_called_outside_step(self)
        return [_schedule(schedules.cosine, base_lr, self.T_i, self.eta_min).at(self.T_cur)
                for base_lr in self.base_lrs]

    def step(self, epoch: Optional[float] = None) -> None:
        """Advance one epoch, or jump to `epoch` (may be fractional)."""
        if epoch is None and self.last_epoch < 0:
            epoch = 0
        if epoch is None:
            epoch = self.last_epoch + 1
            self.T_cur = self.T_cur + 1
            if self.T_cur >= self.T_i:
                self.T_cur = self.T_cur % self.T_i
                self.T_i = self.T_i * self.T_mult
        else:
            epoch = schedules.as_real(epoch, "epoch")
            if epoch < 0:
                raise ValueError(f"epoch: expected a value >= 0, got {epoch!r}")
            if epoch > schedules.MAX_STEP:
                raise ValueError(f"epoch: expected a value <= 2**53 (the largest step), got {epoch!r}")
            T_cur, T_i = schedules.warm_restart_position(epoch, self.T_0, self.T_mult)
            self.T_cur, self.T_i = float(T_cur), int(T_i)
            if float(self.T_cur).is_integer():
                self.T_cur = int(self.T_cur)
        self.last_epoch = math.floor(epoch)
        self._get_lr_called_within_step = True
        try:
            values = self.get_lr()
        finally:
            self._get_lr_called_within_step = False
        for group, lr in zip(self.optimizer.param_groups, values):
            group["lr"] = lr
        self._last_lr = _group_lrs(self.optimizer)


class OneCycleLR(LRScheduler):
    """The 1cycle policy (Smith & Topin 2018), updated every batch.

    The lr rises from ``max_lr / div_factor`` to `max_lr` during the first
    ``pct_start`` of the `total_steps`, then anneals to ``initial_lr /
    final_div_factor``; momentum moves inversely between `max_momentum` and
    `base_momentum`. The values are read from each group's ``'initial_lr'``,
    ``'max_lr'``, ``'min_lr'``, ``'max_momentum'`` and ``'base_momentum'``.

    Parameters
    ----------
    optimizer : Optimizer
    max_lr : float or list of float
        Peak lr, one value or one per group.
    total_steps : int, optional
        Number of steps in the cycle (>= 1); otherwise ``epochs *
        steps_per_epoch``.
    epochs, steps_per_epoch : int, optional
    pct_start : float, default 0.3
        Fraction of the cycle spent increasing, in [0, 1].
    anneal_strategy : {'cos', 'linear'}, default 'cos'
    cycle_momentum : bool, default True
        Cycle ``group['momentum']`` or ``group['betas'][0]`` (ValueError if
        the optimizer has neither).
    base_momentum, max_momentum : float or list of float
        0.85 and 0.95.
    div_factor : float, default 25
    final_div_factor : float, default 1e4
    three_phase : bool, default False
        Anneal back to the initial lr symmetrically, then to the minimum.
    last_epoch : int, default -1

    Notes
    -----
    As in PyTorch, ``last_epoch`` may reach `total_steps` (that value
    extrapolates the last phase); the next ``step()`` raises ValueError.
    Pure form: :func:`fastbn.schedules.one_cycle` and
    :func:`~fastbn.schedules.one_cycle_momentum`.
    """

    def __init__(self, optimizer, max_lr: FloatOrList, total_steps: Optional[int] = None,
                 epochs: Optional[int] = None, steps_per_epoch: Optional[int] = None,
                 pct_start: float = 0.3, anneal_strategy: str = "cos", cycle_momentum: bool = True,
                 base_momentum: FloatOrList = 0.85, max_momentum: FloatOrList = 0.95,
                 div_factor: float = 25.0, final_div_factor: float = 1e4,
                 three_phase: bool = False, last_epoch: int = -1) -> None:
        _check_optimizer(optimizer, "OneCycleLR")
        with _unchanged_on_error(optimizer):
            self.optimizer = optimizer
            if total_steps is not None:
                self.total_steps = check_int(total_steps, "total_steps", minimum=1)
            elif epochs is not None and steps_per_epoch is not None:
                self.total_steps = (check_int(epochs, "epochs", minimum=1)
                                    * check_int(steps_per_epoch, "steps_per_epoch", minimum=1))
            else:
                raise ValueError("OneCycleLR: expected total_steps, or both epochs and "
                                 f"steps_per_epoch, got total_steps={total_steps!r}, "
                                 f"epochs={epochs!r}, steps_per_epoch={steps_per_epoch!r}")
            self.pct_start = check_range(pct_start, "pct_start", 0.0, 1.0)
            if anneal_strategy not in schedules.ANNEAL_STRATEGIES:
                raise ValueError(f"anneal_strategy: expected one of {schedules.ANNEAL_STRATEGIES}, "
                                 f"got {anneal_strategy!r}")
            self._anneal_func_type = anneal_strategy
            self.three_phase = bool(three_phase)
            div_factor = _positive(div_factor, "div_factor")
            final_div_factor = _positive(final_div_factor, "final_div_factor")
            max_lrs = _per_group("max_lr", optimizer, max_lr)
            last_epoch = check_int(last_epoch, "last_epoch", minimum=-1)
            if last_epoch == -1:
                for peak, group in zip(max_lrs, optimizer.param_groups):
                    group["initial_lr"] = peak / div_factor
                    group["max_lr"] = peak
                    group["min_lr"] = group["initial_lr"] / final_div_factor
            self.cycle_momentum = bool(cycle_momentum)
            if self.cycle_momentum:
                momentum_key = _momentum_key(optimizer, "OneCycleLR")
                self.use_beta1 = momentum_key == "betas"
                max_momentums = _per_group("max_momentum", optimizer, max_momentum)
                base_momentums = _per_group("base_momentum", optimizer, base_momentum)
                if last_epoch == -1:
                    for max_m, base_m, group in zip(max_momentums, base_momentums,
                                                    optimizer.param_groups):
                        _set_momentum(group, momentum_key, max_m)
                        group["max_momentum"] = max_m
                        group["base_momentum"] = base_m
            super().__init__(optimizer, last_epoch)

    def get_lr(self) -> List[float]:
        _warn_get_lr_called_outside_step(self)
        step_num = self.last_epoch
        if step_num > self.total_steps:
            raise ValueError(
                f"OneCycleLR: tried to step {step_num} times, but total_steps is "
                f"{self.total_steps} (the schedule covers steps 0..{self.total_steps}); create "
                "the scheduler with a larger total_steps (or epochs * steps_per_epoch)")
        shape = dict(pct_start=self.pct_start, anneal_strategy=self._anneal_func_type,
                     three_phase=self.three_phase)
        key = "betas" if getattr(self, "use_beta1", False) else "momentum"
        groups = self.optimizer.param_groups
        # Floats first (a checkpoint may hold 0-d tensors), so that memoized
        # schedules are found again at the next step.
        bounds = [{name: _as_lr(group[name], f"param_groups[{index}][{name!r}]")
                   for name in ("initial_lr", "max_lr", "min_lr")} for index, group in enumerate(groups)]
        momenta = [{name: _as_lr(group[name], f"param_groups[{index}][{name!r}]")
                    for name in ("base_momentum", "max_momentum")} if self.cycle_momentum else {}
                   for index, group in enumerate(groups)]
        lrs = []
        for group, bound, momentum_bound in zip(groups, bounds, momenta):
            lrs.append(_schedule(schedules.one_cycle, bound["max_lr"], self.total_steps, **shape,
                                 initial_lr=bound["initial_lr"], min_lr=bound["min_lr"]).at(step_num))
            if self.cycle_momentum:
                momentum = _schedule(schedules.one_cycle_momentum, self.total_steps,
                                     momentum_bound["base_momentum"], momentum_bound["max_momentum"],
                                     **shape)
                _set_momentum(group, key, momentum.at(step_num))
        return lrs

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a state returned by :meth:`state_dict`, also one saved by an
        older PyTorch that holds the annealing function itself (``'anneal_func'``,
        PyTorch's ``_annealing_cos`` or ``_annealing_linear``) instead of
        ``'_anneal_func_type'``: it is mapped to ``'cos'`` or ``'linear'``.
        """
        state = dict(state_dict)
        if "anneal_func" in state:
            legacy = state.pop("anneal_func")
            if "_anneal_func_type" not in state:
                state["_anneal_func_type"] = _legacy_anneal_strategy(legacy)
        strategy = state.get("_anneal_func_type", self._anneal_func_type)
        if strategy not in schedules.ANNEAL_STRATEGIES:
            raise ValueError(f"state_dict['_anneal_func_type']: expected one of "
                             f"{schedules.ANNEAL_STRATEGIES}, got {strategy!r}")
        super().load_state_dict(state)


def _legacy_anneal_strategy(function) -> str:
    """'cos' or 'linear' for the annealing function an old PyTorch OneCycleLR saved."""
    name = getattr(function, "__name__", None)
    strategy = {"_annealing_cos": "cos", "_annealing_linear": "linear"}.get(name)
    if strategy is None:
        raise ValueError("state_dict['anneal_func']: expected PyTorch's OneCycleLR._annealing_cos "
                         f"or _annealing_linear (a legacy OneCycleLR state), got {describe(function)}")
    return strategy
