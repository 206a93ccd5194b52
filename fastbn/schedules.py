"""Learning-rate schedules as pure functions of the step.

Every function here returns a :class:`Schedule`: a small callable object that
maps a step (an int, a float, or an array of them) to the learning rate at
that step. Arrays are evaluated in one vectorized pass, so a whole schedule
can be precomputed or plotted::

    >>> import numpy as np
    >>> from fastbn import schedules
    >>> sched = schedules.cosine(0.1, T_max=100, eta_min=1e-4)
    >>> sched(0)
    0.1
    >>> curve = sched(np.arange(200))          # ndarray of 200 float64 values

These are the formulas of the scheduler classes in
:mod:`fastbn.optim.lr_scheduler` (PyTorch's ``torch.optim.lr_scheduler``
semantics): each class evaluates the function listed below at its
``last_epoch``, so there is one implementation of every curve.

=======================  ======================================
function                 scheduler class
=======================  ======================================
``lambda_schedule``      ``LambdaLR``
``multiplicative``       ``MultiplicativeLR``
``step_decay``           ``StepLR``
``multistep``            ``MultiStepLR``
``constant_warmup``      ``ConstantLR``
``linear``               ``LinearLR``
``exponential_decay``    ``ExponentialLR`` (and ``StepLR``)
``polynomial``           ``PolynomialLR``
``cosine``               ``CosineAnnealingLR``
``cosine_warm_restarts`` ``CosineAnnealingWarmRestarts``
``cyclical``             ``CyclicLR`` (learning rate and momentum)
``one_cycle``            ``OneCycleLR`` (``one_cycle_momentum``)
``join``                 ``SequentialLR``
=======================  ======================================

A scalar step gives a Python float; an array gives a float64 ndarray of the
same shape. Steps must be finite, >= 0 and <= 2**53 (up to 2**53 float64
holds every integer, so an int step and its float64 value are the same step).
``schedule.at(step)`` gives the same value as ``schedule(step)`` and is fast
for consecutive integer steps (the schedulers use it).

Hyperparameters are real numbers (a 0-d or one-element array or tensor is
accepted and converted to a Python float) and must be finite.

Reproducibility: one code path for every step
----------------------------------------------
A schedule's value at a step does not depend on the CPU, on the NumPy build,
or on whether the step came alone or in an array. Arithmetic (+, -, *, /,
floor, min, comparisons) is done with NumPy: IEEE 754 rounds those exactly,
in SIMD loops and in scalar code alike. Every transcendental function (every
power with a non-constant exponent, cos, log) is evaluated element by element
with Python's :mod:`math` module (``math.pow``, ``math.cos``, ``math.log``)
through :func:`_power`, :func:`_cos` and :func:`_log`, also for integer
exponents. NumPy's own ``np.power``/``np.cos``/``np.log`` are not used:
their vectorized loops (SVML on AVX-512 CPUs) round differently from the
scalar C library by an ulp, so an array and a scalar step would disagree.
The values are those of the platform's C library, the same as Python's
``x ** y`` and ``math.cos`` give, which is also what PyTorch's schedulers
compute. The cost is about 50 ns per element, paid once per block of
:attr:`Schedule.BLOCK_SIZE` steps by the schedulers.
"""
from __future__ import annotations

import itertools
import math
import numbers
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from ._validation import check_int, check_positive, check_range, describe

__all__ = [
    "Schedule", "constant", "constant_warmup", "linear", "warmup", "exponential_decay",
    "step_decay", "multistep", "polynomial", "cosine", "cosine_warm_restarts",
    "cyclical", "one_cycle", "one_cycle_momentum", "lambda_schedule", "multiplicative",
    "join", "cyclical_mode_names", "warm_restart_position",
]

Steps = Union[numbers.Real, np.ndarray, Sequence[numbers.Real]]

CYCLICAL_MODES = ("triangular", "triangular2", "exp_range")
SCALE_MODES = ("cycle", "iterations")
ANNEAL_STRATEGIES = ("cos", "linear")


#: Largest step accepted: every integer up to 2**53 is exact in float64.
MAX_STEP = 2 ** 53


def cyclical_mode_names() -> Tuple[str, ...]:
    """The built-in ``mode`` names of :func:`cyclical` / ``CyclicLR``."""
    return CYCLICAL_MODES


# ---- transcendental functions: Python's math module, element by element -----
# See "Reproducibility" in the module docstring: these are the only places a
# schedule evaluates pow, cos or log.

def _is_odd_integer(value: float) -> bool:
    return value.is_integer() and math.fmod(value, 2.0) != 0.0


def _pow_ieee(base: float, exponent: float) -> float:
    """``math.pow`` with C99's results where it raises instead."""
    try:
        return math.pow(base, exponent)
    except OverflowError:
        return math.copysign(math.inf, base) if _is_odd_integer(exponent) else math.inf
    except ValueError:
        if base == 0.0:  # 0 ** negative
            return math.copysign(math.inf, base) if _is_odd_integer(exponent) else math.inf
        return math.nan  # negative ** non-integer


def _cos_ieee(value: float) -> float:
    return math.cos(value) if math.isfinite(value) else math.nan


def _log_ieee(value: float) -> float:
    if value > 0.0:
        return math.log(value)
    return -math.inf if value == 0.0 else math.nan


def _elementwise(function: Callable[..., float], fallback: Callable[..., float],
                 *operands) -> Union[np.ndarray, np.float64]:
    """``function`` applied to each element of the broadcast `operands`.

    `function` is a math-module function; `fallback` is its IEEE-valued
    version, used only when `function` raised (domain or range error).
    """
    if all(isinstance(operand, float) or (type(operand) is np.ndarray and operand.ndim == 0)
           for operand in operands):  # np.float64 is a float
        # One step (schedule(step) with a scalar): no lists, no broadcasting.
        scalars = [float(operand) for operand in operands]
        try:
            return np.float64(function(*scalars))
        except (OverflowError, ValueError):
            return np.float64(fallback(*scalars))
    arrays = [np.asarray(operand, dtype=np.float64) for operand in operands]
    shapes = {array.shape for array in arrays}
    shape = shapes.pop() if len(shapes) == 1 else np.broadcast_shapes(*shapes)
    # A scalar operand (the usual base of a power) is repeated, not broadcast:
    # np.broadcast_arrays costs more than the whole evaluation of one step.
    size = math.prod(shape)
    columns = [array.ravel().tolist() if array.shape == shape
               else itertools.repeat(float(array), size) if array.ndim == 0
               else np.broadcast_to(array, shape).ravel().tolist()
               for array in arrays]
    try:
        values = list(map(function, *columns))
    except (OverflowError, ValueError):
        columns = [np.broadcast_to(array, shape).ravel().tolist() for array in arrays]
        values = list(map(fallback, *columns))
    return np.array(values, dtype=np.float64).reshape(shape)


def _power(base, exponent) -> np.ndarray:
    """``base ** exponent`` element-wise with ``math.pow`` (broadcasting)."""
    return _elementwise(math.pow, _pow_ieee, base, exponent)


def _cos(values) -> np.ndarray:
    """``cos`` element-wise with ``math.cos``."""
    return _elementwise(math.cos, _cos_ieee, values)


def _log(values) -> np.ndarray:
    """Natural logarithm element-wise with ``math.log``."""
    return _elementwise(math.log, _log_ieee, values)


# ---- the Schedule object ---------------------------------------------------

def _too_large_step(name: str, value) -> ValueError:
    return ValueError(f"{name}: expected steps <= 2**53 = {MAX_STEP} (float64 holds every integer "
                      f"only up to there), got {value}")


def _as_steps(step: Steps, name: str = "step") -> Tuple[np.ndarray, bool]:
    """Steps as a float64 array (and whether the input was a scalar)."""
    if isinstance(step, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a real number or an array of them, got {describe(step)}")
    if type(step) in (int, float) or isinstance(step, (np.integer, np.floating)):
        # Scalar fast path: schedulers evaluate one step at a time.
        if isinstance(step, (int, np.integer)) and step > MAX_STEP:
            # Compared as ints: float(2**53 + 1) would already be 2**53.
            raise _too_large_step(name, step)
        value = float(step)
        if not math.isfinite(value):
            raise ValueError(f"{name}: expected finite steps, got {step!r}")
        if value < 0:
            raise ValueError(f"{name}: expected steps >= 0, got {value:g}")
        if value > MAX_STEP:
            raise _too_large_step(name, step)
        return np.array(value), True
    is_scalar = isinstance(step, numbers.Real)
    array = np.asarray(step)
    if array.dtype.kind not in "iuf":
        raise TypeError(f"{name}: expected a real number or an array of real numbers, got {describe(step)}")
    if array.dtype.kind in "iu" and array.size and array.max() > MAX_STEP:
        raise _too_large_step(name, array.max())
    array = array.astype(np.float64, copy=False)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: expected finite steps, got {step!r}")
    if array.size and array.min() < 0:
        raise ValueError(f"{name}: expected steps >= 0, got {array.min():g}")
    if array.size and array.max() > MAX_STEP:
        raise _too_large_step(name, array.max())
    return array, is_scalar


def as_real(value, name: str) -> float:
    """A finite real hyperparameter (learning rate, factor, period) as a float.

    Accepts a real number, or an array or tensor with exactly one real
    element (e.g. a 0-d ``np.ndarray`` or a 0-d ``torch.Tensor``), or any
    object with ``__float__`` that is not a container of several values.

    Raises
    ------
    TypeError
        `value` is not a real number (bool, str, complex, None, ...).
    ValueError
        NaN, infinite, too large for a float, or an array of other than one element.
    """
    if type(value) is float:
        result = value
    elif isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a real number, got {describe(value)}")
    elif isinstance(value, numbers.Real):
        try:
            result = float(value)
        except OverflowError:
            raise ValueError(f"{name}: expected a finite real number, got {value!r:.60} "
                             "(too large for a float)") from None
    else:
        result = _one_element_as_float(value, name)
    if not math.isfinite(result):
        raise ValueError(f"{name}: expected a finite real number, got {result!r}")
    return result


def _one_element_as_float(value, name: str) -> float:
    """The float of an array, tensor or other ``__float__`` object holding one real value."""
    if not hasattr(type(value), "__float__"):
        raise TypeError(f"{name}: expected a real number, got {describe(value)}")
    numel = getattr(value, "numel", None)  # torch.Tensor
    size = numel() if callable(numel) else getattr(value, "size", 1)  # np.ndarray
    if isinstance(size, numbers.Integral) and size != 1:
        raise ValueError(f"{name}: expected a real number or an array with one element, "
                         f"got {type(value).__name__} of shape {tuple(getattr(value, 'shape', ()))}")
    dtype = getattr(value, "dtype", None)
    if dtype is not None:
        kind = getattr(dtype, "kind", None)  # NumPy dtypes have a kind, torch dtypes flags
        real = (kind in ("i", "u", "f") if kind is not None
                else not getattr(dtype, "is_complex", False) and not str(dtype).endswith("bool"))
        if not real:
            raise TypeError(f"{name}: expected a real number, got {type(value).__name__} "
                            f"of dtype {dtype}")
    if isinstance(value, np.ndarray):
        value = value.reshape(())  # NumPy >= 2.? converts only 0-d arrays with float()
    try:
        return float(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name}: expected a real number, got {describe(value)} ({error})") from None
    except OverflowError:
        raise ValueError(f"{name}: expected a finite real number, got a value too large "
                         "for a float") from None


class Schedule:
    """A learning-rate curve: ``schedule(step)`` is the value at ``step``.

    Built by the functions of :mod:`fastbn.schedules`; not usually created
    directly.

    Parameters
    ----------
    name : str
        Name of the function that built it (for ``repr``).
    curve : callable
        ``curve(steps, **params) -> ndarray``, vectorized over a float64
        array of steps.
    params : dict
        The schedule's hyperparameters (read them back with ``.params``).
    last_step : int, optional
        Largest valid step (``one_cycle``: total_steps), if any.
    precompute : bool, default True
        Whether :meth:`at` may evaluate steps ahead of time. False for
        schedules that call user functions, which may have side effects or
        depend on state that changes during training.
    """

    __slots__ = ("name", "_curve", "_params", "_last_step", "_precompute", "_block")

    #: Steps evaluated together by :meth:`at`.
    BLOCK_SIZE = 128

    def __init__(self, name: str, curve: Callable[..., np.ndarray], params: Dict[str, Any], *,
                 last_step: Optional[int] = None, precompute: bool = True) -> None:
        self.name = name
        self._curve = curve
        self._params = dict(params)
        self._last_step = last_step
        self._precompute = precompute
        self._block: Optional[Tuple[int, list]] = None

    @property
    def params(self) -> Dict[str, Any]:
        """A copy of the hyperparameters this schedule was built with."""
        return dict(self._params)

    def __call__(self, step: Steps) -> Union[float, np.ndarray]:
        """Value at `step` (float) or at every step of an array (float64 ndarray)."""
        steps, is_scalar = _as_steps(step)
        values = np.asarray(self._curve(steps, **self._params), dtype=np.float64)
        if is_scalar:
            return float(values.reshape(()))
        return values.reshape(steps.shape)

    def at(self, step: numbers.Real) -> float:
        """Value at one step, the same as ``schedule(step)``, but fast when
        called for consecutive integer steps (what a scheduler does).

        Integer steps are served from a block of :attr:`BLOCK_SIZE` steps
        evaluated in one vectorized call, which amortizes NumPy's per-call
        overhead; other steps are evaluated directly.
        """
        if (not self._precompute or isinstance(step, bool) or not isinstance(step, numbers.Integral)
                or step < 0 or step > MAX_STEP
                or (self._last_step is not None and step > self._last_step)):
            return self(step)
        step = int(step)
        block = self._block
        first = step - step % self.BLOCK_SIZE
        if block is None or block[0] != first:
            stop = first + self.BLOCK_SIZE
            if self._last_step is not None:
                stop = min(stop, self._last_step + 1)
            values = self._curve(np.arange(first, stop, dtype=np.float64), **self._params)
            block = (first, np.asarray(values, dtype=np.float64).tolist())
            self._block = block
        return block[1][step - first]

    def __repr__(self) -> str:
        shown = ", ".join(f"{key}={value!r}" for key, value in self._params.items())
        return f"{self.name}({shown})"


# ---- argument checks shared by several schedules --------------------------

def _positive(value, name: str) -> float:
    """A finite real > 0."""
    return check_positive(as_real(value, name), name)


def _nonnegative(value, name: str) -> float:
    """A finite real >= 0."""
    return check_positive(as_real(value, name), name, strict=False)


def _fraction(value, name: str) -> float:
    """A real in [0, 1]."""
    return check_range(as_real(value, name), name, 0.0, 1.0)


def check_count(value, name: str, *, minimum: int = 1) -> int:
    """An int in [minimum, 2**53]: a cycle length, total_steps or milestone
    (larger ones cannot be compared exactly with float64 steps)."""
    value = check_int(value, name, minimum=minimum)
    if value > MAX_STEP:
        shown = value if value < 10 ** 20 else f"about 2**{value.bit_length() - 1}"
        raise ValueError(f"{name}: expected an int <= 2**53 = {MAX_STEP} (float64 steps are exact "
                         f"only up to there), "
                         f"got {shown}")
    return value


def _check_steps_count(value, name: str, *, allow_zero: bool = False) -> float:
    """A step count (step size, total_iters, ...): finite, > 0 (or >= 0).

    A non-finite period would make the curve NaN (inf / inf) or constant.
    """
    return _nonnegative(value, name) if allow_zero else _positive(value, name)


def check_milestones(milestones, name: str = "milestones", *, strict: bool = True) -> list:
    """Milestones: a sequence of ints >= 0, increasing (strictly, or allowing
    repeats when `strict` is False). Returns them as a list of ints."""
    if isinstance(milestones, (str, bytes)) or not hasattr(milestones, "__iter__"):
        raise TypeError(f"{name}: expected a sequence of ints, got {describe(milestones)}")
    values = [check_count(value, f"{name}[{index}]", minimum=0) for index, value in enumerate(milestones)]
    for index in range(1, len(values)):
        previous, current = values[index - 1], values[index]
        if current < previous or (strict and current == previous):
            order = "strictly increasing" if strict else "non-decreasing"
            raise ValueError(f"{name}: expected {order} values, got {values} "
                             f"({name}[{index}]={current} after {previous})")
    return values


# ---- constant, warm-up and decays -----------------------------------------

def _constant_curve(steps: np.ndarray, value: float) -> np.ndarray:
    return np.full(steps.shape, value, dtype=np.float64)


def constant(value: float) -> Schedule:
    """A constant learning rate (useful as a piece of :func:`join`)."""
    return Schedule("constant", _constant_curve, {"value": as_real(value, "value")})


def _constant_factor_curve(steps: np.ndarray, init_lr: float, factor: float,
                           total_iters: float) -> np.ndarray:
    return init_lr * np.where(steps >= total_iters, 1.0, factor)


def constant_warmup(init_lr: float, factor: float = 1.0 / 3, total_iters: float = 5) -> Schedule:
    """``init_lr * factor`` for ``step < total_iters``, then ``init_lr`` (``ConstantLR``).

    Parameters
    ----------
    init_lr : float
        The learning rate after the warm-up.
    factor : float, default 1/3
        Multiplier in [0, 1] applied during the first `total_iters` steps.
    total_iters : float, default 5
        Number of steps (>= 0) at the reduced learning rate.
    """
    return Schedule("constant_warmup", _constant_factor_curve, {
        "init_lr": as_real(init_lr, "init_lr"),
        "factor": _fraction(factor, "factor"),
        "total_iters": _check_steps_count(total_iters, "total_iters", allow_zero=True),
    })


def _linear_curve(steps: np.ndarray, init_lr: float, start_factor: float, end_factor: float,
                  total_iters: float) -> np.ndarray:
    # Operation order follows torch's LinearLR closed form.
    return init_lr * (start_factor + (end_factor - start_factor) * np.minimum(total_iters, steps)
                      / total_iters)


def linear(init_lr: float, start_factor: float = 1.0 / 3, end_factor: float = 1.0,
           total_iters: float = 5) -> Schedule:
    """Linear ramp of the multiplier from `start_factor` to `end_factor` (``LinearLR``).

    ``init_lr * (start_factor + (end_factor - start_factor) * min(step, total_iters) / total_iters)``

    Parameters
    ----------
    init_lr : float
        Base learning rate the factors multiply.
    start_factor, end_factor : float
        Multipliers at step 0 and from step `total_iters` on (any reals >= 0
        here; ``LinearLR`` itself requires ``0 < start_factor <= 1`` and
        ``0 <= end_factor <= 1`` as PyTorch does).
    total_iters : float, default 5
        Length of the ramp in steps (> 0).
    """
    return Schedule("linear", _linear_curve, {
        "init_lr": as_real(init_lr, "init_lr"),
        "start_factor": _nonnegative(start_factor, "start_factor"),
        "end_factor": _nonnegative(end_factor, "end_factor"),
        "total_iters": _check_steps_count(total_iters, "total_iters"),
    })


def warmup(peak_lr: float, warmup_steps: float, start_lr: float = 0.0) -> Schedule:
    """Linear warm-up from `start_lr` to `peak_lr` over `warmup_steps`, then flat.

    The same curve as :func:`linear` with ``start_factor = start_lr / peak_lr``
    and ``end_factor = 1``. Combine it with a decay through :func:`join`.
    """
    peak_lr = _positive(peak_lr, "peak_lr")
    start_lr = _nonnegative(start_lr, "start_lr")
    return linear(peak_lr, start_lr / peak_lr, 1.0, warmup_steps)


def _exponential_curve(steps: np.ndarray, init_lr: float, decay_rate: float, decay_steps: float,
                       staircase: bool) -> np.ndarray:
    exponent = np.floor_divide(steps, decay_steps) if staircase else steps / decay_steps
    return init_lr * _power(decay_rate, exponent)


def exponential_decay(init_lr: float, decay_rate: float, decay_steps: float = 1,
                      staircase: bool = False) -> Schedule:
    """``init_lr * decay_rate ** (step / decay_steps)`` (``ExponentialLR`` with decay_steps=1).

    Parameters
    ----------
    init_lr : float
        Learning rate at step 0.
    decay_rate : float
        Factor (>= 0) applied every `decay_steps` steps; > 1 grows.
    decay_steps : float, default 1
        Steps per application of `decay_rate` (> 0).
    staircase : bool, default False
        If True, the exponent is ``floor(step / decay_steps)``: the rate
        changes in discrete jumps (``StepLR``).
    """
    return Schedule("exponential_decay", _exponential_curve, {
        "init_lr": as_real(init_lr, "init_lr"),
        "decay_rate": _nonnegative(decay_rate, "decay_rate"),
        "decay_steps": _check_steps_count(decay_steps, "decay_steps"),
        "staircase": bool(staircase),
    })


def step_decay(init_lr: float, step_size: float, gamma: float = 0.1) -> Schedule:
    """``init_lr * gamma ** floor(step / step_size)`` (``StepLR``).

    The lesson's "reduce the learning rate by a fixed factor every few epochs".
    Same formula as ``exponential_decay(init_lr, gamma, step_size, staircase=True)``.
    """
    step_size = _check_steps_count(step_size, "step_size")
    gamma = _nonnegative(gamma, "gamma")
    return exponential_decay(init_lr, gamma, step_size, staircase=True)


def _multistep_curve(steps: np.ndarray, init_lr: float, milestones: Tuple[int, ...],
                     gamma: float) -> np.ndarray:
    passed = np.searchsorted(np.asarray(milestones, dtype=np.float64), steps, side="right")
    return init_lr * _power(gamma, passed)


def multistep(init_lr: float, milestones: Sequence[int], gamma: float = 0.1) -> Schedule:
    """``init_lr * gamma ** (number of milestones <= step)`` (``MultiStepLR``).

    `milestones` must be non-decreasing ints >= 0; a milestone listed ``n``
    times multiplies by ``gamma ** n`` (as in PyTorch).
    """
    return Schedule("multistep", _multistep_curve, {
        "init_lr": as_real(init_lr, "init_lr"),
        "milestones": tuple(check_milestones(milestones, strict=False)),
        "gamma": _nonnegative(gamma, "gamma"),
    })


def _polynomial_curve(steps: np.ndarray, init_lr: float, total_iters: float,
                      power: float) -> np.ndarray:
    return init_lr * _power(1.0 - np.minimum(total_iters, steps) / total_iters, power)


def polynomial(init_lr: float, total_iters: float = 5, power: float = 1.0) -> Schedule:
    """``init_lr * (1 - min(step, total_iters) / total_iters) ** power`` (``PolynomialLR``).

    Reaches 0 at `total_iters` and stays there.
    """
    return Schedule("polynomial", _polynomial_curve, {
        "init_lr": as_real(init_lr, "init_lr"),
        "total_iters": _check_steps_count(total_iters, "total_iters"),
        "power": _nonnegative(power, "power"),
    })


# ---- cosine ------------------------------------------------------------------

def _cosine_curve(steps: np.ndarray, init_lr: float, T_max: Union[float, np.ndarray],
                  eta_min: float) -> np.ndarray:
    return eta_min + (init_lr - eta_min) * (1.0 + _cos(math.pi * steps / T_max)) / 2.0


def cosine(init_lr: float, T_max: float, eta_min: float = 0.0) -> Schedule:
    """Cosine annealing (``CosineAnnealingLR``).

    ``eta_min + (init_lr - eta_min) * (1 + cos(pi * step / T_max)) / 2``.
    Not clamped: after `T_max` the curve rises again (period ``2 * T_max``),
    exactly as PyTorch's scheduler does.
    """
    return Schedule("cosine", _cosine_curve, {
        "init_lr": as_real(init_lr, "init_lr"),
        "T_max": _check_steps_count(T_max, "T_max"),
        "eta_min": as_real(eta_min, "eta_min"),
    })


def warm_restart_position(steps: Steps, T_0: int, T_mult: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """Where each step falls in SGDR's cycles: ``(T_cur, T_i)``.

    Cycle ``n`` (0-based) has length ``T_i = T_0 * T_mult ** n`` and starts at
    ``T_0 * (T_mult ** n - 1) / (T_mult - 1)`` (``n * T_0`` when T_mult = 1);
    ``T_cur`` is the step's offset inside its cycle. The cycle index comes
    from a logarithm and is then corrected against the exact cycle starts, so
    steps on a boundary land at ``T_cur = 0`` of the new cycle.
    """
    steps, _ = _as_steps(steps)
    T_0 = check_count(T_0, "T_0")
    T_mult = check_count(T_mult, "T_mult")
    if T_mult == 1:
        return np.mod(steps, T_0), np.full(steps.shape, float(T_0))

    def cycle_start(n: np.ndarray) -> np.ndarray:
        return T_0 * (_power(float(T_mult), n) - 1.0) / (T_mult - 1)

    cycle = np.floor(_log(steps / T_0 * (T_mult - 1) + 1.0) / math.log(T_mult))
    cycle = np.where(cycle_start(cycle) > steps, cycle - 1, cycle)
    cycle = np.where(cycle_start(cycle + 1) <= steps, cycle + 1, cycle)
    return steps - cycle_start(cycle), T_0 * _power(float(T_mult), cycle)


def _warm_restarts_curve(steps: np.ndarray, init_lr: float, T_0: int, T_mult: int,
                         eta_min: float) -> np.ndarray:
    T_cur, T_i = warm_restart_position(steps, T_0, T_mult)
    return _cosine_curve(T_cur, init_lr, T_i, eta_min)


def cosine_warm_restarts(init_lr: float, T_0: int, T_mult: int = 1, eta_min: float = 0.0) -> Schedule:
    """Cosine annealing with warm restarts, SGDR (``CosineAnnealingWarmRestarts``).

    ``eta_min + (init_lr - eta_min) * (1 + cos(pi * T_cur / T_i)) / 2`` where
    ``(T_cur, T_i)`` is :func:`warm_restart_position` of the step: the first
    cycle lasts `T_0` steps, each next one `T_mult` times longer.
    """
    return Schedule("cosine_warm_restarts", _warm_restarts_curve, {
        "init_lr": as_real(init_lr, "init_lr"),
        "T_0": check_count(T_0, "T_0"),
        "T_mult": check_count(T_mult, "T_mult"),
        "eta_min": as_real(eta_min, "eta_min"),
    })


# ---- cyclical (Smith's CLR) ---------------------------------------------------

def user_function_value(function: Callable, argument, name: str) -> float:
    """``function(argument)`` checked to be a finite real number (a float)."""
    return as_real(function(argument), f"the value returned by {name}({argument!r})")


def _apply_elementwise(function: Callable, values: np.ndarray, name: str) -> np.ndarray:
    """Call a user's scalar function on each value (ints where integral, as torch passes)."""
    flat = [user_function_value(function, int(value) if value.is_integer() else value, name)
            for value in values.ravel().tolist()]
    return np.asarray(flat, dtype=np.float64).reshape(values.shape)


def _cyclical_curve(steps: np.ndarray, base_lr: float, max_lr: float, step_size_up: float,
                    step_size_down: float, mode: str, gamma: float,
                    scale_fn: Optional[Callable[[float], float]], scale_mode: str) -> np.ndarray:
    total_size = step_size_up + step_size_down
    step_ratio = step_size_up / total_size
    cycle = np.floor(1.0 + steps / total_size)
    x = 1.0 + steps / total_size - cycle
    with np.errstate(divide="ignore", invalid="ignore"):
        rising = x / step_ratio
        falling = (x - 1.0) / (step_ratio - 1.0)
    scale_factor = np.where(x <= step_ratio, rising, falling)
    if scale_fn is not None:
        scale = _apply_elementwise(scale_fn, cycle if scale_mode == "cycle" else steps, "scale_fn")
    elif mode == "triangular":
        scale = 1.0
    elif mode == "triangular2":
        scale = 1.0 / _power(2.0, cycle - 1.0)
    else:  # exp_range
        scale = _power(gamma, steps)
    # Operation order follows torch's CyclicLR.
    return base_lr + (max_lr - base_lr) * scale_factor * scale


def cyclical(base_lr: float, max_lr: float, step_size_up: float = 2000,
             step_size_down: Optional[float] = None, mode: str = "triangular", gamma: float = 1.0,
             scale_fn: Optional[Callable[[float], float]] = None,
             scale_mode: str = "cycle") -> Schedule:
    """Cyclical learning rate (Smith 2017; ``CyclicLR``).

    With ``total = step_size_up + step_size_down``, ``ratio = step_size_up / total``,
    ``cycle = floor(1 + step / total)`` and ``x = 1 + step / total - cycle``, the
    position in the cycle is ``s = x / ratio`` while rising (``x <= ratio``)
    and ``(x - 1) / (ratio - 1)`` while falling, and
    ``lr = base_lr + (max_lr - base_lr) * s * scale``.

    Parameters
    ----------
    base_lr, max_lr : float
        The two bounds (the lower is reached at cycle boundaries). Swapping
        them gives the inverse curve, which is how ``CyclicLR`` cycles momentum.
    step_size_up : float, default 2000
        Steps from `base_lr` to `max_lr` (> 0).
    step_size_down : float, optional
        Steps back down (>= 0); defaults to `step_size_up`.
    mode : {'triangular', 'triangular2', 'exp_range'}
        ``scale`` is 1, ``1 / 2 ** (cycle - 1)`` (amplitude halves every
        cycle) or ``gamma ** step``. Ignored when `scale_fn` is given.
    gamma : float, default 1.0
        Decay base of 'exp_range'.
    scale_fn : callable, optional
        Custom ``scale = scale_fn(arg)``, called with the cycle number
        (``scale_mode='cycle'``) or the step (``scale_mode='iterations'``).
    scale_mode : {'cycle', 'iterations'}
        Argument of `scale_fn`; built-in modes use 'cycle' for the triangular
        modes and 'iterations' for 'exp_range', whatever is passed.
    """
    step_size_up = _check_steps_count(step_size_up, "step_size_up")
    step_size_down = (step_size_up if step_size_down is None
                      else _check_steps_count(step_size_down, "step_size_down", allow_zero=True))
    if scale_fn is None:
        if mode not in CYCLICAL_MODES:
            raise ValueError(f"mode: expected one of {CYCLICAL_MODES} (or pass scale_fn), got {mode!r}")
        scale_mode = "iterations" if mode == "exp_range" else "cycle"
    else:
        if not callable(scale_fn):
            raise TypeError(f"scale_fn: expected a callable or None, got {describe(scale_fn)}")
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode: expected one of {SCALE_MODES}, got {scale_mode!r}")
    return Schedule("cyclical", _cyclical_curve, {
        "base_lr": as_real(base_lr, "base_lr"),
        "max_lr": as_real(max_lr, "max_lr"),
        "step_size_up": step_size_up,
        "step_size_down": step_size_down,
        "mode": mode,
        "gamma": as_real(gamma, "gamma"),
        "scale_fn": scale_fn,
        "scale_mode": scale_mode,
    }, precompute=scale_fn is None)


# ---- one cycle -----------------------------------------------------------------

def _anneal(start: float, end: float, pct: np.ndarray, anneal_strategy: str) -> np.ndarray:
    # Operation order follows torch's OneCycleLR._annealing_cos/_annealing_linear.
    if anneal_strategy == "cos":
        return end + (start - end) / 2.0 * (_cos(math.pi * pct) + 1.0)
    return (end - start) * pct + start


def _one_cycle_curve(steps: np.ndarray, total_steps: int, pct_start: float, three_phase: bool,
                     anneal_strategy: str, start: float, peak: float, end: float) -> np.ndarray:
    """Piecewise anneal start -> peak -> end (three_phase: start -> peak -> start -> end).

    Phase ends are torch's: ``pct_start * total - 1`` (peak), ``2 * pct_start
    * total - 2`` (back to start, three-phase only), ``total - 1`` (end). A
    step belongs to the first phase whose end it does not pass.
    """
    if steps.size and steps.max() > total_steps:
        raise ValueError(f"step: expected steps <= total_steps ({total_steps}), got {steps.max():g}")
    if three_phase:
        phase_ends = [pct_start * total_steps - 1.0, 2.0 * pct_start * total_steps - 2.0,
                      total_steps - 1.0]
        phase_from, phase_to = [start, peak, start], [peak, start, end]
    else:
        phase_ends = [pct_start * total_steps - 1.0, total_steps - 1.0]
        phase_from, phase_to = [start, peak], [peak, end]
    ends = np.asarray(phase_ends)
    starts = np.asarray([0.0] + phase_ends[:-1])
    last = len(phase_ends) - 1
    # Checked in order, as torch does (the ends need not be sorted when
    # pct_start * total_steps < 1); the last phase takes every other step.
    phase = np.full(steps.shape, last, dtype=np.intp)
    for index in reversed(range(last)):
        phase = np.where(steps <= ends[index], index, phase)
    length = ends[phase] - starts[phase]
    # A phase of zero length (pct_start * total_steps == 1) is already at its
    # end value; torch divides by zero there.
    with np.errstate(divide="ignore", invalid="ignore"):
        pct = np.where(length != 0, (steps - starts[phase]) / length, 1.0)
    return _anneal(np.asarray(phase_from)[phase], np.asarray(phase_to)[phase], pct, anneal_strategy)


def _check_one_cycle_shape(total_steps, pct_start, anneal_strategy) -> Tuple[int, float, str]:
    total_steps = check_count(total_steps, "total_steps")
    pct_start = _fraction(pct_start, "pct_start")
    if anneal_strategy not in ANNEAL_STRATEGIES:
        raise ValueError(f"anneal_strategy: expected one of {ANNEAL_STRATEGIES}, got {anneal_strategy!r}")
    return total_steps, pct_start, anneal_strategy


def one_cycle(max_lr: float, total_steps: int, pct_start: float = 0.3, anneal_strategy: str = "cos",
              div_factor: float = 25.0, final_div_factor: float = 1e4, three_phase: bool = False,
              *, initial_lr: Optional[float] = None, min_lr: Optional[float] = None) -> Schedule:
    """The 1cycle learning rate (Smith & Topin; ``OneCycleLR``).

    Anneals from ``initial_lr = max_lr / div_factor`` up to `max_lr` during the
    first ``pct_start * total_steps - 1`` steps, then down to ``min_lr =
    initial_lr / final_div_factor`` at step ``total_steps - 1``. With
    `three_phase`, it goes back to `initial_lr` first (symmetric around the
    peak) and then down to `min_lr`. Steps above `total_steps` raise
    ValueError (step ``total_steps`` itself extrapolates, as in PyTorch).

    Parameters
    ----------
    max_lr : float
        Peak learning rate.
    total_steps : int
        Length of the cycle (>= 1).
    pct_start : float, default 0.3
        Fraction of the cycle spent increasing, in [0, 1].
    anneal_strategy : {'cos', 'linear'}
        Cosine or linear interpolation inside each phase.
    div_factor, final_div_factor : float
        ``initial_lr = max_lr / div_factor``; ``min_lr = initial_lr / final_div_factor``.
    three_phase : bool, default False
        Use the three-phase variant.
    initial_lr, min_lr : float, optional
        Override the derived start and end values (``OneCycleLR`` passes the
        values stored in each param group).
    """
    total_steps, pct_start, anneal_strategy = _check_one_cycle_shape(total_steps, pct_start,
                                                                     anneal_strategy)
    max_lr = as_real(max_lr, "max_lr")
    if initial_lr is None:
        initial_lr = max_lr / _positive(div_factor, "div_factor")
    if min_lr is None:
        min_lr = as_real(initial_lr, "initial_lr") / _positive(final_div_factor, "final_div_factor")
    return Schedule("one_cycle", _one_cycle_curve, {
        "total_steps": total_steps, "pct_start": pct_start, "three_phase": bool(three_phase),
        "anneal_strategy": anneal_strategy, "start": as_real(initial_lr, "initial_lr"),
        "peak": max_lr, "end": as_real(min_lr, "min_lr"),
    }, last_step=total_steps)


def one_cycle_momentum(total_steps: int, base_momentum: float = 0.85, max_momentum: float = 0.95,
                       pct_start: float = 0.3, anneal_strategy: str = "cos",
                       three_phase: bool = False) -> Schedule:
    """The momentum that goes with :func:`one_cycle`: inverse to the learning rate.

    From `max_momentum` down to `base_momentum` while the learning rate rises,
    then back up to `max_momentum` (three-phase: back up, then flat).
    """
    total_steps, pct_start, anneal_strategy = _check_one_cycle_shape(total_steps, pct_start,
                                                                     anneal_strategy)
    max_momentum = as_real(max_momentum, "max_momentum")
    return Schedule("one_cycle_momentum", _one_cycle_curve, {
        "total_steps": total_steps, "pct_start": pct_start, "three_phase": bool(three_phase),
        "anneal_strategy": anneal_strategy, "start": max_momentum,
        "peak": as_real(base_momentum, "base_momentum"), "end": max_momentum,
    }, last_step=total_steps)


# ---- user functions --------------------------------------------------------------

def _lambda_curve(steps: np.ndarray, init_lr: float, lr_lambda: Callable[[int], float]) -> np.ndarray:
    return init_lr * _apply_elementwise(lr_lambda, steps, "lr_lambda")


def _check_callable(function, name: str) -> Callable:
    if not callable(function):
        raise TypeError(f"{name}: expected a function of the step, got {describe(function)}")
    return function


def lambda_schedule(init_lr: float, lr_lambda: Callable[[int], float]) -> Schedule:
    """``init_lr * lr_lambda(step)`` (``LambdaLR``); `lr_lambda` is called once per step."""
    return Schedule("lambda_schedule", _lambda_curve, {
        "init_lr": as_real(init_lr, "init_lr"),
        "lr_lambda": _check_callable(lr_lambda, "lr_lambda"),
    }, precompute=False)


def _multiplicative_curve(steps: np.ndarray, init_lr: float,
                          lr_lambda: Callable[[int], float]) -> np.ndarray:
    if not np.all(steps == np.floor(steps)):
        raise ValueError("step: multiplicative schedules are defined at integer steps only, "
                         f"got {steps[steps != np.floor(steps)][0]:g}")
    last = int(steps.max()) if steps.size else 0
    factors = [1.0] + [user_function_value(lr_lambda, step, "lr_lambda") for step in range(1, last + 1)]
    factors = np.asarray(factors, dtype=np.float64)
    return init_lr * np.cumprod(factors)[steps.astype(np.int64)]


def multiplicative(init_lr: float, lr_lambda: Callable[[int], float]) -> Schedule:
    """``init_lr * lr_lambda(1) * ... * lr_lambda(step)`` (``MultiplicativeLR``).

    ``MultiplicativeLR`` applies the same factors one step at a time
    (``lr *= lr_lambda(step)``); this is their running product.
    """
    return Schedule("multiplicative", _multiplicative_curve, {
        "init_lr": as_real(init_lr, "init_lr"),
        "lr_lambda": _check_callable(lr_lambda, "lr_lambda"),
    }, precompute=False)


# ---- composition -----------------------------------------------------------------

def segment_index(boundaries: Sequence[int], step) -> Union[int, np.ndarray]:
    """Which piece of a :func:`join` (or ``SequentialLR``) a step belongs to:
    the number of boundaries ``<= step``."""
    return np.searchsorted(np.asarray(boundaries, dtype=np.float64), step, side="right")


def _join_curve(steps: np.ndarray, schedules: Tuple[Callable, ...],
                boundaries: Tuple[int, ...]) -> np.ndarray:
    piece = segment_index(boundaries, steps)
    offsets = np.asarray((0,) + boundaries, dtype=np.float64)
    result = np.empty(steps.shape, dtype=np.float64)
    for index, schedule in enumerate(schedules):
        in_piece = piece == index
        if np.any(in_piece):
            result[in_piece] = schedule(steps[in_piece] - offsets[index])
    return result


def join(schedules: Sequence[Callable], boundaries: Sequence[int]) -> Schedule:
    """Run `schedules` one after another, switching at `boundaries` (``SequentialLR``).

    Piece ``i`` is used for ``boundaries[i-1] <= step < boundaries[i]`` and is
    evaluated at ``step - boundaries[i-1]``, so every piece starts at its own
    step 0, as the schedulers inside ``SequentialLR`` do.

    Parameters
    ----------
    schedules : sequence of Schedule (or callables taking an array of steps)
        At least one.
    boundaries : sequence of int
        ``len(schedules) - 1`` strictly increasing steps >= 0.
    """
    schedules = tuple(schedules)
    if not schedules:
        raise ValueError("schedules: expected at least one schedule, got an empty sequence")
    for index, schedule in enumerate(schedules):
        _check_callable(schedule, f"schedules[{index}]")
    boundaries = tuple(check_milestones(boundaries, "boundaries"))
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(f"boundaries: expected {len(schedules) - 1} values (one fewer than the "
                         f"{len(schedules)} schedules), got {len(boundaries)}")
    precompute = all(isinstance(piece, Schedule) and piece._precompute for piece in schedules)
    return Schedule("join", _join_curve, {"schedules": schedules, "boundaries": boundaries},
                    precompute=precompute)
