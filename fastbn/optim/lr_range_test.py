"""The learning-rate range test (Smith 2017, "Cyclical Learning Rates for
Training Neural Networks", section 3.3): train for a short while with a
learning rate that grows every step, record the loss, and read off the range
over which the loss falls fastest. Its bounds are natural ``base_lr`` /
``max_lr`` values for :class:`~fastbn.optim.lr_scheduler.CyclicLR` (or
``max_lr`` for ``OneCycleLR``).
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .. import schedules
from .._validation import check_int, check_positive, check_range, describe
from .lr_scheduler import _check_optimizer

__all__ = ["lr_range_test", "LRRangeTestResult", "plot_lr_range_test"]

MODES = ("exp", "linear")

#: The suggested range is where the smoothed loss has fallen by 10 % ... 90 %
#: of its total drop: the steep part of the curve, cut before the flat start
#: and before the noisy bottom where training starts to become unstable.
RANGE_DROP_FRACTIONS = (0.1, 0.9)


@dataclass
class LRRangeTestResult:
    """What :func:`lr_range_test` measured. Also readable as a dict
    (``result["lrs"]``) and convertible with :meth:`as_dict`.

    Attributes
    ----------
    lrs : ndarray
        Learning rate of every step taken.
    losses : ndarray
        The loss `step_fn` returned at each step.
    smoothed_losses : ndarray
        Exponential moving average of the losses, bias-corrected.
    suggested_range : tuple of float or None
        ``(min_lr, max_lr)``: where the smoothed loss had dropped by 10 % and
        by 90 % of its total drop (from the plateau at small lrs to the
        minimum) for good (None when the loss never decreased).
    steepest_lr : float or None
        Learning rate of the steepest descent of the smoothed loss (against
        log lr in 'exp' mode, lr in 'linear' mode) inside the suggested range.
    min_loss_lr : float or None
        Learning rate at the minimum of the smoothed loss.
    diverged : bool
        True when the test stopped early because the loss exploded.
    stop_reason : str
        'completed', 'diverged' (smoothed loss above ``diverge_threshold``
        times its best value) or 'non-finite loss'.
    mode : str
        'exp' or 'linear'.
    """

    lrs: np.ndarray
    losses: np.ndarray
    smoothed_losses: np.ndarray
    suggested_range: Optional[Tuple[float, float]]
    steepest_lr: Optional[float]
    min_loss_lr: Optional[float]
    diverged: bool
    stop_reason: str
    mode: str
    figure: Any = field(default=None, repr=False)

    def __getitem__(self, key: str) -> Any:
        if key not in self.as_dict():
            raise KeyError(key)
        return getattr(self, key)

    def as_dict(self) -> Dict[str, Any]:
        """The measurements as a plain dict (without the figure)."""
        return {name: getattr(self, name) for name in (
            "lrs", "losses", "smoothed_losses", "suggested_range", "steepest_lr",
            "min_loss_lr", "diverged", "stop_reason", "mode")}


def _sweep(start_lr: float, end_lr: float, num_iters: int, mode: str) -> np.ndarray:
    """The learning rate of each of the `num_iters` steps, start_lr ... end_lr."""
    last = num_iters - 1
    if mode == "exp":
        curve = schedules.exponential_decay(start_lr, end_lr / start_lr, last)
    else:
        curve = schedules.linear(end_lr, start_lr / end_lr, 1.0, last)
    return curve(np.arange(num_iters))


def _loss_value(loss, iteration: int) -> float:
    try:
        return float(loss)
    except (TypeError, ValueError):
        raise TypeError(f"step_fn: expected it to return the loss (a number), got "
                        f"{describe(loss)} at iteration {iteration}") from None


def _suggest(lrs: np.ndarray, smoothed: np.ndarray, mode: str):
    """(suggested_range, steepest_lr, min_loss_lr) from the smoothed curve."""
    if smoothed.size < 3:
        return None, None, None
    lowest = int(np.argmin(smoothed))
    min_loss_lr = float(lrs[lowest])
    # The plateau at small lrs: median of the first quarter of the curve up to
    # its minimum (robust to the wiggles of a noisy start).
    plateau = float(np.median(smoothed[:max(1, (lowest + 1) // 4)]))
    drop = plateau - smoothed[lowest]
    # Relative floor: a constant loss still wiggles by rounding in the average.
    if not drop > 1e-9 * abs(plateau):
        return None, None, min_loss_lr
    descending = smoothed[:lowest + 1]
    low_fraction, high_fraction = RANGE_DROP_FRACTIONS

    def stays_below(level: float) -> int:
        # First index after the last one above `level`: a noisy early dip
        # below the level does not count.
        above = np.nonzero(descending > level)[0]
        return int(above[-1]) + 1 if above.size else 0

    start = stays_below(plateau - low_fraction * drop)
    end = max(start, stays_below(plateau - high_fraction * drop))
    # Steepest descent inside the suggested range: the flat, noisy start of the
    # curve would otherwise win with random wiggles.
    steepest_lr = float(lrs[start])
    if end > start:
        axis = np.log(lrs) if mode == "exp" else lrs
        slope = np.gradient(smoothed[start:end + 1], axis[start:end + 1])
        steepest_lr = float(lrs[start + int(np.argmin(slope))])
    return (float(lrs[start]), float(lrs[end])), steepest_lr, min_loss_lr


def lr_range_test(step_fn: Callable[[], Any], optimizer, start_lr: float = 1e-7,
                  end_lr: float = 10.0, num_iters: int = 100, *, mode: str = "exp",
                  smooth: float = 0.98, diverge_threshold: Optional[float] = 4.0,
                  plot=None) -> LRRangeTestResult:
    """Run Smith's learning-rate range test.

    For ``i = 0 .. num_iters - 1`` the lr of every param group is set to the
    i-th value of a sweep from `start_lr` to `end_lr` and ``step_fn()`` is
    called; it must run one training step (forward, backward,
    ``optimizer.step()``) and return the loss. The test stops early when the
    loss diverges. The optimizer's learning rates are restored afterwards
    (also when `step_fn` raises); the model's parameters and the optimizer's
    state (momentum buffers, ...) are NOT: the test trains the model, so run
    it on a copy or re-initialize afterwards.

    Parameters
    ----------
    step_fn : callable
        ``step_fn() -> loss``: one training step; the loss may be any number
        (float, NumPy scalar, 0-d array, ``torch.Tensor``). Losses are
        assumed positive for the divergence test.
    optimizer : Optimizer
        Any object with ``param_groups`` (dicts holding ``'lr'``); every group
        gets the same lr during the test.
    start_lr, end_lr : float
        Sweep bounds, ``0 < start_lr < end_lr``.
    num_iters : int, default 100
        Maximum number of steps (>= 2).
    mode : {'exp', 'linear'}, default 'exp'
        Geometric sweep (``start_lr * (end_lr / start_lr) ** (i / (num_iters - 1))``,
        Smith's and fastai's choice) or linear sweep.
    smooth : float, default 0.98
        Weight of the past in the exponential moving average of the loss,
        in [0, 1); the average is bias-corrected (divided by ``1 - smooth**(i+1)``).
    diverge_threshold : float or None, default 4.0
        Stop when the smoothed loss exceeds this multiple (> 1) of its best
        value so far; None never stops on that test. A non-finite loss always
        stops the test.
    plot : None, str, os.PathLike or matplotlib Axes
        Save a plot of loss against lr to this path, or draw it on these
        axes. Needs matplotlib (imported only then).

    Returns
    -------
    LRRangeTestResult
        ``lrs``, ``losses``, ``smoothed_losses``, ``suggested_range`` =
        ``(min_lr, max_lr)``, ``steepest_lr``, ``min_loss_lr``, ``diverged``, ...

    Notes
    -----
    The suggested range starts where the smoothed loss has fallen for good by
    10 % of its total drop (training clearly makes progress) and ends where it
    has fallen for good by 90 % (just before the bottom of the curve, where
    larger rates start to destabilize training). The total drop runs from the
    plateau at small lrs (median of the first quarter of the curve up to its
    minimum) to the minimum; "for good" means the curve never comes back above
    that level before the minimum. The smoothing lags the raw loss: with
    ``smooth=0.98`` (memory of about 50 steps) prefer ``num_iters`` of a few
    hundred, or a smaller ``smooth``. Smith suggests these two points as
    ``base_lr`` and ``max_lr`` of a cyclical schedule.

    Examples
    --------
    >>> def train_step():
    ...     optimizer.zero_grad()
    ...     loss = model.forward_backward(next(batches))
    ...     optimizer.step()
    ...     return loss
    >>> result = fastbn.optim.lr_range_test(train_step, optimizer, 1e-6, 1.0, 200)
    >>> base_lr, max_lr = result.suggested_range
    """
    if not callable(step_fn):
        raise TypeError(f"step_fn: expected a callable that runs one training step and returns "
                        f"the loss, got {describe(step_fn)}")
    _check_optimizer(optimizer, "lr_range_test")
    start_lr = check_positive(start_lr, "start_lr")
    end_lr = check_positive(end_lr, "end_lr")
    if not end_lr > start_lr:
        raise ValueError(f"end_lr: expected a value > start_lr ({start_lr!r}), got {end_lr!r}")
    num_iters = check_int(num_iters, "num_iters", minimum=2)
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    smooth = check_range(smooth, "smooth", 0.0, 1.0, high_inclusive=False)
    if diverge_threshold is not None:
        diverge_threshold = check_positive(diverge_threshold, "diverge_threshold")
        if not diverge_threshold > 1.0:
            raise ValueError(f"diverge_threshold: expected a value > 1 (or None), "
                             f"got {diverge_threshold!r}")
    if plot is not None and not (isinstance(plot, (str, os.PathLike)) or hasattr(plot, "plot")):
        raise TypeError(f"plot: expected None, a file path or a matplotlib Axes, got {describe(plot)}")

    sweep = _sweep(start_lr, end_lr, num_iters, mode)
    saved_lrs = [group["lr"] for group in optimizer.param_groups]
    lrs: List[float] = []
    losses: List[float] = []
    smoothed: List[float] = []
    average = 0.0
    best = math.inf
    stop_reason = "completed"
    try:
        for iteration, lr in enumerate(sweep):
            lr = float(lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = _loss_value(step_fn(), iteration)
            if not math.isfinite(loss):
                stop_reason = "non-finite loss"
                break
            average = smooth * average + (1.0 - smooth) * loss
            debiased = average / (1.0 - smooth ** (iteration + 1))
            lrs.append(lr)
            losses.append(loss)
            smoothed.append(debiased)
            best = min(best, debiased)
            if diverge_threshold is not None and best > 0 and debiased > diverge_threshold * best:
                stop_reason = "diverged"
                break
    finally:
        for group, saved in zip(optimizer.param_groups, saved_lrs):
            group["lr"] = saved

    lrs_array = np.asarray(lrs, dtype=np.float64)
    smoothed_array = np.asarray(smoothed, dtype=np.float64)
    suggested_range, steepest_lr, min_loss_lr = _suggest(lrs_array, smoothed_array, mode)
    if suggested_range is None and smoothed_array.size >= 3:
        warnings.warn(f"lr_range_test: the smoothed loss did not decrease between "
                      f"lr={start_lr:g} and lr={float(lrs_array[-1]):g}; no range suggested "
                      "(try a smaller start_lr, a larger end_lr or more iterations)",
                      RuntimeWarning, stacklevel=2)
    result = LRRangeTestResult(
        lrs=lrs_array, losses=np.asarray(losses, dtype=np.float64),
        smoothed_losses=smoothed_array, suggested_range=suggested_range,
        steepest_lr=steepest_lr, min_loss_lr=min_loss_lr,
        diverged=stop_reason != "completed", stop_reason=stop_reason, mode=mode)
    if plot is not None:
        result.figure = plot_lr_range_test(result, plot)
    return result


def plot_lr_range_test(result: LRRangeTestResult, target=None):
    """Plot loss against learning rate, with the suggested range shaded.

    Parameters
    ----------
    result : LRRangeTestResult
    target : None, str, os.PathLike or matplotlib Axes
        A path saves the figure there; Axes are drawn on; None only builds
        the figure.

    Returns
    -------
    matplotlib.figure.Figure
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plotting the LR range test needs matplotlib "
                          "(pip install matplotlib, or fastbn[plot])") from None
    if target is not None and hasattr(target, "plot"):
        axes, figure = target, target.figure
    else:
        figure = Figure(figsize=(6.4, 4.0))
        axes = figure.subplots()
    axes.plot(result.lrs, result.losses, color="0.75", linewidth=1, label="loss")
    axes.plot(result.lrs, result.smoothed_losses, color="C0", linewidth=2, label="smoothed loss")
    if result.suggested_range is not None:
        low, high = result.suggested_range
        axes.axvspan(low, high, color="C2", alpha=0.2,
                     label=f"suggested range {low:.2g} .. {high:.2g}")
    if result.steepest_lr is not None:
        axes.axvline(result.steepest_lr, color="C3", linestyle="--",
                     label=f"steepest {result.steepest_lr:.2g}")
    if result.mode == "exp":
        axes.set_xscale("log")
    if result.diverged and result.smoothed_losses.size and result.smoothed_losses[0] > 0:
        # Keep the exploding tail from flattening the interesting part.
        lowest = float(min(np.min(result.smoothed_losses), np.min(result.losses)))
        axes.set_ylim(lowest - 0.05 * abs(lowest), 1.5 * float(result.smoothed_losses[0]))
    axes.set_xlabel("learning rate")
    axes.set_ylabel("loss")
    axes.set_title("LR range test" + (f" (stopped: {result.stop_reason})" if result.diverged else ""))
    axes.legend(loc="best")
    if target is not None and not hasattr(target, "plot"):
        figure.savefig(os.fspath(target), bbox_inches="tight")
    return figure
