"""``python -m fastbn demo``: what BatchNorm, the optimizers and the lr
schedules do to the same MLP on the same data."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import List, Optional

import numpy as np

from .._progress import ProgressBar
from .data import DATASETS, load_dataset
from .experiment import RunResult, build_configs, train_run
from .report import results_table, summary_lines, sweep_table, write_results

__all__ = ["build_parser", "main", "run_demo"]

QUICK_EPOCHS = 3


def single_threaded_blas():
    """Limit BLAS to one thread while the demo runs (when threadpoolctl is
    installed).  Its matrices are tiny (64 x 128): a BLAS thread team costs
    more than it saves, and on a busy machine its spinning threads slow every
    product down by 10-100x."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """Add the demo's options to `parser` (a subcommand parser) or a new one."""
    if parser is None:
        parser = argparse.ArgumentParser(prog="fastbn demo")
    parser.description = (
        "Train the same MLP on scikit-learn's handwritten digits (or a generated dataset when "
        "scikit-learn is absent) with and without BatchNorm, with Momentum, RMSprop and Adam, at "
        "a normal and a high learning rate, under constant, step, exponential and cyclical "
        "schedules. Prints a results table and writes PNG plots, results.csv and results.json.")
    parser.add_argument("--out", default="fastbn-demo",
                        help="directory for the plots and results (default: ./fastbn-demo)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs per run (default 20; {QUICK_EPOCHS} with --quick)")
    parser.add_argument("--all", action="store_true",
                        help="every schedule at both learning rates (default: schedules at the "
                             "normal lr only)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny configuration (Adam only, few epochs, small subset): a smoke test")
    parser.add_argument("--dataset", choices=DATASETS, default="auto",
                        help="'digits' needs scikit-learn (pip install 'fastbn[demo]'); 'auto' "
                             "falls back to a generated dataset")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--target", type=float, default=0.95,
                        help="test accuracy whose first epoch is reported (default 0.95)")
    parser.add_argument("--seed", type=int, default=0, help="seeds data split, init and batches")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_demo(*, out: str = "fastbn-demo", epochs: Optional[int] = None, all_configs: bool = False,
             quick: bool = False, dataset: str = "auto", batch_size: int = 64,
             target: float = 0.95, seed: int = 0, plots: bool = True, progress: bool = True,
             stream=None) -> List[RunResult]:
    """Run the demo (the command line calls this); returns every run's result."""
    stream = stream or sys.stdout
    if epochs is None:
        epochs = QUICK_EPOCHS if quick else 20
    if epochs < 1:
        raise ValueError(f"epochs: expected an int >= 1, got {epochs}")
    if batch_size < 2:
        raise ValueError(f"batch_size: expected an int >= 2 (BatchNorm needs 2 samples), got {batch_size}")
    if not 0 < target <= 1:
        raise ValueError(f"target: expected an accuracy in (0, 1], got {target}")
    data = load_dataset(dataset, seed=seed)
    if quick:
        # a 600-sample training set keeps the smoke test to a few seconds
        data.x_train, data.y_train = data.x_train[:600], data.y_train[:600]
    configs = build_configs("quick" if quick else "all" if all_configs else "default")
    print(f"fastbn demo: {data.describe()}", file=stream)
    print(f"{len(configs)} runs x {epochs} epochs, batch {batch_size}, seed {seed}, "
          f"MLP {data.num_features}-128-64-{data.num_classes}", file=stream)
    results: List[RunResult] = []
    started = time.perf_counter()
    with ProgressBar(total=len(configs) * epochs, label="demo", enabled=progress) as bar, \
            np.errstate(over="ignore", invalid="ignore", divide="ignore"), single_threaded_blas():
        for config in configs:
            def on_epoch(epoch: int, loss: float, config=config) -> None:
                bar.update(1, detail=f"{config.label} epoch {epoch} loss {loss:.3f}")
            result = train_run(config, data, epochs=epochs, batch_size=batch_size, seed=seed,
                               target_accuracy=target, on_epoch=on_epoch)
            bar.update(epochs - len(result.train_loss), detail=config.label)
            results.append(result)
    total = time.perf_counter() - started
    print(file=stream)
    print(results_table(results, target), file=stream)
    table = sweep_table(results)
    if table:
        print("\nFinal test accuracy by constant learning rate:", file=stream)
        print(table, file=stream)
    print("\nWhat the numbers show:", file=stream)
    for line in summary_lines(results, target, epochs):
        print(f"  - {line}", file=stream)
    os.makedirs(out, exist_ok=True)
    metadata = dict(dataset=data.name, epochs=epochs, batch_size=batch_size, seed=seed,
                    target_accuracy=target, runs=len(results), seconds=round(total, 2))
    written = write_results(results, out, metadata)
    if plots:
        from .plots import have_matplotlib, write_plots
        if have_matplotlib():
            written += write_plots(results, out, data.name, target)
        else:
            print("matplotlib is not installed: no plots (pip install 'fastbn[demo]')", file=stream)
    print(f"\n{len(results)} runs in {total:.1f}s; wrote " + ", ".join(written), file=stream)
    return results


def main(args: argparse.Namespace) -> int:
    run_demo(out=args.out, epochs=args.epochs, all_configs=args.all, quick=args.quick,
             dataset=args.dataset, batch_size=args.batch_size, target=args.target, seed=args.seed,
             plots=not args.no_plots, progress=not args.no_progress)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(build_parser().parse_args()))
