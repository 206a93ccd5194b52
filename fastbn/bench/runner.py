"""`python -m fastbn bench`: run benchmark cases side by side in one process
and report median times, speed-ups, GB/s and % of the measured copy
bandwidth."""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import sys
from typing import Dict, List, Optional

import numpy as np

import fastbn
from fastbn._progress import ProgressBar

from .cases import BenchConfig, Case, all_cases
from .measure import stream_bandwidth, time_interleaved, time_per_call

CONTENDERS = ("fastbn", "fastbn_out", "reference", "torch", "fastbn_fp32")


def load_torch(threads: int, enabled: bool):
    if not enabled:
        return None
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch


def select_cases(filters: Optional[List[str]], quick: bool) -> List[Case]:
    cases = all_cases()
    if filters:
        cases = [c for c in cases
                 if any(fnmatch.fnmatch(c.name, f) or f in c.name or f == c.group for f in filters)]
    elif quick:
        quick_names = {"bn_train_fwd_nchw", "bn_eval_fwd_nchw", "bn_backward_nchw",
                       "bn_train_fwd_nhwc", "bn_train_fwd_small", "overhead_eval_2x4",
                       "overhead_train_2x4", "optim_adam_resnet50", "optim_sgd-momentum_resnet50",
                       "optim_rmsprop_resnet50", "optim_adam_1000x1000"}
        cases = [c for c in cases if c.name in quick_names]
    return cases


def run_case(case: Case, config: BenchConfig, bar: ProgressBar) -> Dict[str, object]:
    record: Dict[str, object] = {"name": case.name, "group": case.group,
                                 "description": case.description}
    try:
        contenders, moved = case.build(config)
    except (AttributeError, NotImplementedError, ImportError) as error:
        record["skipped"] = f"{type(error).__name__}: {error}"
        return record
    record["bytes"] = moved
    try:
        contenders["fastbn"]()
    except (AttributeError, NotImplementedError) as error:
        record["skipped"] = f"{type(error).__name__}: {error}"
        return record
    min_time = 0.15 if config.quick else 0.6
    bar.set_detail(case.name)
    if case.per_call:
        for contender, fn in contenders.items():
            timing = time_per_call(fn, calls=300 if config.quick else 2000,
                                   repeats=5 if config.quick else 9)
            record[contender] = timing.as_dict()
    else:
        # the reference is 10-100x slower: a few rounds are enough for it,
        # and one untimed call per round (its calls allocate temporaries of
        # several times the case's size, so what another contender left in
        # cache should matter little -- not measured)
        timings = time_interleaved(contenders, min_time=min_time, min_rounds=5 if config.quick else 9,
                                   max_rounds=40 if config.quick else 100,
                                   max_rounds_for={"reference": 5 if config.quick else 9},
                                   warmup_for={"reference": 1}, order_seed=config.order_seed)
        for contender, timing in timings.items():
            record[contender] = timing.as_dict()
    fast = record["fastbn"]["median_s"]
    for contender in ("reference", "torch", "fastbn_fp32"):
        if contender in record:
            record[f"speedup_vs_{contender}"] = record[contender]["median_s"] / fast
    record["fastbn_gbps"] = moved / fast / 1e9
    if "fastbn_out" in record:
        record["fastbn_out_gbps"] = moved / record["fastbn_out"]["median_s"] / 1e9
    return record


def machine_info(threads: int, torch) -> Dict[str, object]:
    info = fastbn.config_info()
    info.update({"threads": threads, "torch": getattr(torch, "__version__", None),
                 "python_implementation": platform.python_implementation()})
    return info


def _fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def format_table(records: List[Dict[str, object]], bandwidth: float) -> str:
    header = (f"{'case':<28} {'fastbn':>10} {'out=':>10} {'reference':>10} {'torch':>10} "
              f"{'x ref':>7} {'x torch':>8} {'GB/s':>7} {'% bw':>5} {'x fp32':>6}")
    lines = [header, "-" * len(header)]
    for r in records:
        if "skipped" in r:
            lines.append(f"{r['name']:<28} skipped ({r['skipped'][:60]})")
            continue
        med = {c: r[c]["median_s"] if c in r else None for c in CONTENDERS}
        vs_ref = f"{r['speedup_vs_reference']:.1f}" if "speedup_vs_reference" in r else "-"
        vs_torch = f"{r['speedup_vs_torch']:.2f}" if "speedup_vs_torch" in r else "-"
        gbps = r.get("fastbn_out_gbps", r["fastbn_gbps"])
        percent = "-" if r["group"] == "overhead" else f"{100 * gbps / bandwidth:.0f}"
        gbps_text = "-" if r["group"] == "overhead" else f"{gbps:.1f}"
        vs_fp32 = (f"{r['speedup_vs_fastbn_fp32']:.2f}" if "speedup_vs_fastbn_fp32" in r else "")
        lines.append(f"{r['name']:<28} {_fmt_time(med['fastbn']):>10} {_fmt_time(med['fastbn_out']):>10} "
                     f"{_fmt_time(med['reference']):>10} "
                     f"{_fmt_time(med['torch']):>10} {vs_ref:>7} {vs_torch:>8} {gbps_text:>7} {percent:>5}"
                     f" {vs_fp32:>6}".rstrip())
    return "\n".join(lines)


def plot_speedups(records: List[Dict[str, object]], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    rows = [r for r in records if "skipped" not in r]
    names = [r["name"] for r in rows]
    vs_torch = [r.get("speedup_vs_torch", np.nan) for r in rows]
    vs_ref = [r.get("speedup_vs_reference", np.nan) for r in rows]
    y = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.8), sharey=True)
    for ax, values, label, color in ((axes[0], vs_torch, "speed-up vs PyTorch CPU", "tab:blue"),
                                     (axes[1], vs_ref, "speed-up vs NumPy reference", "tab:green")):
        ax.barh(y, values, color=color)
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_xlabel(label + " (x, log scale; >1 = fastbn faster)")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        for yi, v in zip(y, values):
            if np.isfinite(v):
                ax.text(v, yi, f" {v:.2f}x", va="center", fontsize=8)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="fastbn bench")
    parser.add_argument("--quick", action="store_true", help="a representative subset, smaller shapes (< 1 minute)")
    parser.add_argument("--threads", type=int, default=None, help="threads for fastbn and torch (default: all cores)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--filter", action="append", default=None, metavar="PATTERN",
                        help="only cases whose name matches (glob or substring) or whose group is PATTERN; repeatable")
    parser.add_argument("--no-torch", action="store_true", help="do not compare with PyTorch even if installed")
    parser.add_argument("--json", metavar="FILE", help="write machine info and every figure as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="write a bar chart of the speed-ups")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--fixed-order", action="store_true",
                        help="time the contenders in the same order every round (default: a seeded shuffle "
                             "per round, so no contender always follows the same one)")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.list:
        for case in all_cases():
            print(f"{case.name:<30} {case.group:<10} {case.description}")
        return 0
    threads = args.threads or os.cpu_count() or 1
    if threads < 1:
        print("--threads: expected an int >= 1", file=sys.stderr)
        return 2
    fastbn.set_num_threads(threads)
    torch = load_torch(threads, not args.no_torch)
    config = BenchConfig(dtype=np.dtype(args.dtype), threads=threads, quick=args.quick, torch=torch,
                         order_seed=None if args.fixed_order else 0)
    cases = select_cases(args.filter, args.quick)
    if not cases:
        print("no case matches the filter; see --list", file=sys.stderr)
        return 2
    info = machine_info(threads, torch)
    records = []
    with ProgressBar(len(cases) + 1, label="fastbn bench", enabled=not args.no_progress) as bar:
        bar.set_detail("bandwidth probe")
        bandwidth = stream_bandwidth(threads)
        bar.update(1)
        for case in cases:
            records.append(run_case(case, config, bar))
            bar.update(1, case.name)
    title = (f"fastbn {fastbn.__version__} | {info['cpu']} | {threads} threads | "
             f"SIMD {info['simd_target']} | {args.dtype} | numpy {info['numpy']} | "
             f"torch {info['torch'] or 'absent'}")
    print(title)
    order = "fixed" if config.order_seed is None else f"shuffled (seed {config.order_seed})"
    print(f"bandwidth probe (in-place stream update): {bandwidth:.1f} GB/s ({threads} threads); "
          f"times are medians of interleaved rounds ({order} order); "
          "'x ref'/'x torch' = their time / fastbn time "
          "(all three allocating their output; fastbn's of 1 MiB and more from its output cache); "
          "'out=' = fastbn writing into a reused buffer; "
          "GB/s = bytes that must move / fastbn time (out= where available); "
          "'x fp32' (bfloat16 rows) = fastbn's float32 time on the same values / its bfloat16 time, "
          "in the same rounds")
    print(format_table(records, bandwidth))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "dtype": args.dtype, "quick": args.quick,
                       "round_order": order,
                       "stream_bandwidth_gbps": bandwidth, "cases": records}, f, indent=2, default=str)
        print(f"wrote {args.json}")
    if args.plot:
        try:
            plot_speedups(records, args.plot, title)
            print(f"wrote {args.plot}")
        except ImportError:
            print("--plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return 1
    return 0
