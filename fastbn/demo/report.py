"""The demo's text output: the results table, the lr-sweep table, a summary
computed from the numbers, and the CSV/JSON files."""
from __future__ import annotations

import csv
import json
import math
import os
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

from .experiment import OPTIMIZERS, VARIANTS, RunResult

__all__ = ["results_table", "sweep_table", "summary_lines", "write_results"]


def _percent(value: float) -> str:
    return "   -  " if value != value else f"{100 * value:5.1f}%"


def _epochs(result: RunResult) -> str:
    if result.diverged:
        return "diverged"
    return "-" if result.epochs_to_target is None else str(result.epochs_to_target)


def results_table(results: Sequence[RunResult], target_accuracy: float) -> str:
    """One row per run of the named (normal/high lr) configurations."""
    rows = [r for r in results if r.config.lr_level]
    header = (f"{'BN':<6}{'optimizer':<12}{'lr':>8} {'level':<7}{'schedule':<12}"
              f"{'train acc':>10}{'test acc':>10}{f'ep->{100 * target_accuracy:g}%':>10}{'time':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        c = r.config
        lines.append(f"{'yes' if c.batch_norm else 'no':<6}{c.optimizer:<12}{c.lr:>8g} "
                     f"{c.lr_level:<7}{c.schedule:<12}{_percent(r.final_train_accuracy):>10}"
                     f"{_percent(r.final_test_accuracy):>10}{_epochs(r):>10}{r.seconds:>7.2f}s")
    return "\n".join(lines)


def _sweep(results: Sequence[RunResult]) -> Dict[Tuple[str, bool], Dict[float, RunResult]]:
    sweep: Dict[Tuple[str, bool], Dict[float, RunResult]] = {}
    for r in results:
        if r.config.schedule == "constant":
            sweep.setdefault((r.config.optimizer, r.config.batch_norm), {})[r.config.lr] = r
    return sweep


def sweep_table(results: Sequence[RunResult]) -> Optional[str]:
    """Final test accuracy for every lr tried with a constant schedule
    (None when fewer than 3 lrs per optimizer were run)."""
    sweep = _sweep(results)
    if not sweep or max(len(v) for v in sweep.values()) < 3:
        return None
    lines = []
    for name in OPTIMIZERS:
        lrs = sorted({lr for (opt, _bn), runs in sweep.items() if opt == name for lr in runs})
        if not lrs:
            continue
        lines.append(f"{name:<10}{'lr':>6} " + "".join(f"{lr:>9g}" for lr in lrs))
        for batch_norm in (True, False):
            runs = sweep.get((name, batch_norm), {})
            cells = "".join(f"{'div.' if lr in runs and runs[lr].diverged else _percent(runs[lr].final_test_accuracy) if lr in runs else '':>9}"
                            for lr in lrs)
            lines.append(f"{'':<10}{'BN' if batch_norm else 'no BN':>6} {cells}")
    return "\n".join(lines)


def summary_lines(results: Sequence[RunResult], target_accuracy: float, epochs: int) -> List[str]:
    """Facts read off the runs, BN against no BN (whatever they say)."""
    lines = []
    named = [r for r in results if r.config.lr_level]
    for batch_norm in (True, False):
        group = [r for r in named if r.config.batch_norm == batch_norm]
        if not group:
            continue
        reached = [r.epochs_to_target for r in group if r.epochs_to_target is not None]
        accuracies = [r.final_test_accuracy for r in group if not math.isnan(r.final_test_accuracy)]
        median = f"median {statistics.median(reached):g} epochs" if reached else "never"
        lines.append(
            f"{'with' if batch_norm else 'without'} BN: {len(reached)}/{len(group)} runs reached "
            f"{100 * target_accuracy:g}% test accuracy within {epochs} epochs ({median}); "
            f"mean final test accuracy {100 * statistics.fmean(accuracies):.1f}%"
            + (f"; {sum(r.diverged for r in group)} diverged" if any(r.diverged for r in group) else ""))
    for level in ("normal", "high"):
        pairs = _paired(named, lambda r: r.config.lr_level == level)
        if pairs:
            better = sum(bn.final_test_accuracy > plain.final_test_accuracy for bn, plain in pairs)
            gap = statistics.fmean(bn.final_test_accuracy - plain.final_test_accuracy
                                   for bn, plain in pairs)
            lines.append(f"{level} lr: BN ahead in {better}/{len(pairs)} paired runs, "
                         f"mean test-accuracy difference {100 * gap:+.1f} points")
    for variant, (base, _kwargs) in VARIANTS.items():
        for batch_norm in (True, False):
            runs = [r for r in named if r.config.batch_norm == batch_norm and r.config.schedule == "constant"
                    and r.config.lr_level == "normal"]
            mine = [r for r in runs if r.config.optimizer == variant]
            theirs = [r for r in runs if r.config.optimizer == base]
            if mine and theirs:
                gap = mine[0].final_test_accuracy - theirs[0].final_test_accuracy
                lines.append(f"{variant} ({'BN' if batch_norm else 'no BN'}): test accuracy "
                             f"{_percent(mine[0].final_test_accuracy)} against {base}'s "
                             f"{_percent(theirs[0].final_test_accuracy)} ({100 * gap:+.1f} points)")
    sweep = _sweep(results)
    for name in OPTIMIZERS:
        tolerated = []
        for batch_norm in (True, False):
            runs = sweep.get((name, batch_norm), {})
            good = [lr for lr, r in runs.items() if r.final_test_accuracy >= target_accuracy]
            tolerated.append(f"{'BN' if batch_norm else 'no BN'} up to {max(good):g}" if good
                             else f"{'BN' if batch_norm else 'no BN'} none")
        if any(sweep.get((name, bn)) for bn in (True, False)) and len(sweep.get((name, True), {})) >= 3:
            lines.append(f"{name}: highest constant lr ending at >= {100 * target_accuracy:g}% "
                         "test accuracy: "
                         + ", ".join(tolerated))
    return lines


def _paired(results: Sequence[RunResult], keep) -> List[Tuple[RunResult, RunResult]]:
    by_key = {}
    for r in results:
        if keep(r):
            c = r.config
            by_key.setdefault((c.optimizer, c.lr, c.schedule), {})[c.batch_norm] = r
    return [(runs[True], runs[False]) for runs in by_key.values() if len(runs) == 2]


def write_results(results: Sequence[RunResult], out_dir: str, metadata: dict) -> List[str]:
    """results.json (everything, curves included) and results.csv (one row per run)."""
    json_path = os.path.join(out_dir, "results.json")
    with open(json_path, "w") as handle:
        json.dump({"metadata": metadata, "runs": [r.as_dict() for r in results]}, handle, indent=1,
                  allow_nan=True)
    csv_path = os.path.join(out_dir, "results.csv")
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["batch_norm", "optimizer", "lr", "lr_level", "schedule",
                         "final_train_accuracy", "final_test_accuracy", "epochs_to_target",
                         "diverged", "seconds"])
        for r in results:
            c = r.config
            writer.writerow([c.batch_norm, c.optimizer, c.lr, c.lr_level, c.schedule,
                             f"{r.final_train_accuracy:.4f}", f"{r.final_test_accuracy:.4f}",
                             "" if r.epochs_to_target is None else r.epochs_to_target,
                             r.diverged, f"{r.seconds:.3f}"])
    return [json_path, csv_path]
