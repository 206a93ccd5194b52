"""The demo's PNG plots (matplotlib, object API: no GUI backend, no pyplot
state)."""
from __future__ import annotations

import math
import os
from typing import Dict, List, Sequence

import numpy as np

from .experiment import LR_LEVELS, OPTIMIZERS, SCHEDULES, RunResult

__all__ = ["have_matplotlib", "write_plots"]

SCHEDULE_COLORS = {"constant": "C0", "step": "C1", "exponential": "C2", "cyclical": "C3"}
OPTIMIZER_COLORS = {"Momentum": "C0", "RMSprop": "C2", "Adam": "C3"}
BN_STYLES = {True: dict(linestyle="-", linewidth=1.8), False: dict(linestyle="--", linewidth=1.4)}


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(rows: int, cols: int, width: float, height: float):
    from matplotlib.figure import Figure
    figure = Figure(figsize=(width, height), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False)
    return figure, axes


def _integer_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _style_legend(figure, schedules: Sequence[str]):
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=SCHEDULE_COLORS[s], linewidth=2, label=s) for s in schedules]
    handles += [Line2D([], [], color="0.3", label="with BatchNorm", **BN_STYLES[True]),
                Line2D([], [], color="0.3", label="without BatchNorm", **BN_STYLES[False])]
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)


def plot_loss_curves(results: Sequence[RunResult], path: str, dataset_name: str) -> str:
    """Training loss per epoch: one panel per optimizer and lr level, one
    line per schedule, solid with BN and dashed without."""
    named = [r for r in results if r.config.lr_level]
    optimizers = [name for name in OPTIMIZERS if any(r.config.optimizer == name for r in named)]
    figure, axes = _figure(len(optimizers), len(LR_LEVELS), 11, 3.1 * len(optimizers) + 0.9)
    schedules_seen = set()
    for row, name in enumerate(optimizers):
        for col, level in enumerate(LR_LEVELS):
            ax = axes[row][col]
            runs = [r for r in named if r.config.optimizer == name and r.config.lr_level == level]
            for r in runs:
                epochs = np.arange(1, len(r.train_loss) + 1)
                ax.plot(epochs, r.train_loss, color=SCHEDULE_COLORS[r.config.schedule],
                        **BN_STYLES[r.config.batch_norm])
                if r.diverged:
                    ax.plot(epochs[-1:] if len(epochs) else [1],
                            r.train_loss[-1:] if r.train_loss else [1.0], marker="x",
                            color=SCHEDULE_COLORS[r.config.schedule], markersize=9)
                schedules_seen.add(r.config.schedule)
            lr = runs[0].config.lr if runs else float("nan")
            ax.set_title(f"{name}, {level} lr = {lr:g}", fontsize=11)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            _integer_epochs(ax)
            ax.set_xlabel("epoch")
            ax.set_ylabel("training loss")
    figure.suptitle(f"Training loss on {dataset_name} (mean over each epoch's batches)",
                    fontsize=13)
    _style_legend(figure, [s for s in SCHEDULES if s in schedules_seen])
    figure.savefig(path, dpi=110)
    return path


def plot_accuracy_curves(results: Sequence[RunResult], path: str, dataset_name: str,
                         target_accuracy: float) -> str:
    """Test accuracy per epoch at the normal lr with a constant schedule."""
    runs = [r for r in results if r.config.lr_level and r.config.schedule == "constant"]
    optimizers = [name for name in OPTIMIZERS if any(r.config.optimizer == name for r in runs)]
    figure, axes = _figure(1, len(LR_LEVELS), 11, 4.2)
    for col, level in enumerate(LR_LEVELS):
        ax = axes[0][col]
        for name in optimizers:
            for r in runs:
                if r.config.optimizer == name and r.config.lr_level == level:
                    epochs = np.arange(1, len(r.test_accuracy) + 1)
                    ax.plot(epochs, 100 * np.asarray(r.test_accuracy), color=OPTIMIZER_COLORS[name],
                            label=f"{name} (lr {r.config.lr:g}), {'BN' if r.config.batch_norm else 'no BN'}",
                            **BN_STYLES[r.config.batch_norm])
        ax.axhline(100 * target_accuracy, color="0.5", linestyle=":", linewidth=1)
        ax.set_title(f"{level} lr, constant schedule", fontsize=11)
        _integer_epochs(ax)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(max(0.0, _low_accuracy(runs) - 5), 100)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    figure.suptitle(f"Test accuracy on {dataset_name} (dotted: target {100 * target_accuracy:g}%)",
                    fontsize=13)
    figure.savefig(path, dpi=110)
    return path


def _low_accuracy(runs: Sequence[RunResult]) -> float:
    values = [100 * a for r in runs for a in r.test_accuracy[1:] if not math.isnan(a)]
    return min(values) if values else 0.0


def plot_lr_curves(results: Sequence[RunResult], path: str) -> str:
    """The learning rate of every optimizer step, relative to the configured
    lr, for each schedule (taken from the first run that used it)."""
    figure, axes = _figure(1, 1, 9, 4)
    ax = axes[0][0]
    shown: Dict[str, RunResult] = {}
    for r in results:
        if r.config.schedule not in shown and r.lrs and not r.diverged:
            shown[r.config.schedule] = r
    steps_per_epoch = None
    for schedule in SCHEDULES:
        r = shown.get(schedule)
        if r is None:
            continue
        steps_per_epoch = len(r.lrs) / max(len(r.train_loss), 1)
        epochs = np.arange(len(r.lrs)) / steps_per_epoch
        ax.plot(epochs, np.asarray(r.lrs) / r.config.lr, color=SCHEDULE_COLORS[schedule],
                linewidth=2, label=schedule)
    ax.set_xlabel("epoch")
    ax.set_ylabel("lr / configured lr")
    ax.set_ylim(0, 1.08)
    _integer_epochs(ax)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Learning-rate schedules\nstep: x0.2 at 40% and 80% of training; exponential: "
                 "down to 5%;\ncyclical: triangular2 between lr/10 and lr, 2 epochs up, 2 down",
                 fontsize=10)
    figure.savefig(path, dpi=110)
    return path


def plot_accuracy_vs_lr(results: Sequence[RunResult], path: str, dataset_name: str,
                        target_accuracy: float) -> str:
    """Final test accuracy against the (constant) lr, with and without BN;
    diverged runs are crosses at the bottom."""
    constant = [r for r in results if r.config.schedule == "constant"]
    optimizers = [name for name in OPTIMIZERS if any(r.config.optimizer == name for r in constant)]
    figure, axes = _figure(1, len(optimizers), 4.2 * len(optimizers) + 0.6, 4.2)
    for col, name in enumerate(optimizers):
        ax = axes[0][col]
        for batch_norm, color in ((True, "C0"), (False, "C1")):
            runs = sorted((r for r in constant if r.config.optimizer == name
                           and r.config.batch_norm == batch_norm), key=lambda r: r.config.lr)
            lrs = [r.config.lr for r in runs]
            accuracy = [100 * r.final_test_accuracy for r in runs]
            label = "with BatchNorm" if batch_norm else "without BatchNorm"
            ax.plot(lrs, accuracy, marker="o", color=color, label=label, **BN_STYLES[batch_norm])
            diverged = [r.config.lr for r in runs if r.diverged]
            if diverged:
                ax.plot(diverged, [2] * len(diverged), linestyle="none", marker="x", markersize=10,
                        color=color, label=f"diverged ({'BN' if batch_norm else 'no BN'})")
        _cls, normal, high, _sweep = OPTIMIZERS[name]
        for lr in (normal, high):
            ax.axvline(lr, color="0.85", linewidth=6, zorder=0)
        ax.axhline(100 * target_accuracy, color="0.5", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_ylim(0, 100)
        ax.set_xlabel("learning rate (constant)")
        ax.set_ylabel("final test accuracy (%)")
        ax.set_title(name, fontsize=11)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    figure.suptitle(f"Accuracy vs learning rate on {dataset_name} "
                    "(grey bands: the normal and high lr)", fontsize=13)
    figure.savefig(path, dpi=110)
    return path


def write_plots(results: Sequence[RunResult], out_dir: str, dataset_name: str,
                target_accuracy: float) -> List[str]:
    """Every plot into `out_dir`; returns the paths written."""
    paths = [
        plot_loss_curves(results, os.path.join(out_dir, "loss_curves.png"), dataset_name),
        plot_accuracy_curves(results, os.path.join(out_dir, "accuracy_curves.png"), dataset_name,
                             target_accuracy),
        plot_lr_curves(results, os.path.join(out_dir, "lr_schedules.png")),
        plot_accuracy_vs_lr(results, os.path.join(out_dir, "accuracy_vs_lr.png"), dataset_name,
                            target_accuracy),
    ]
    return paths
