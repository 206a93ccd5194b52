"""Batch-norm benchmark: fastbn's kernels vs the NumPy reference vs PyTorch,
same process, same thread count, float32.

    python benchmarks/bench_bn.py              # table
    python benchmarks/bench_bn.py --quick      # fewer rounds
    pytest benchmarks/bench_bn.py --benchmark-only --benchmark-group-by=param:case

Cases (the issue's targets are printed beside the numbers):
training forward, eval forward and backward on (64,128,56,56) channels-first,
training forward channels-last (32,56,56,64) (torch: channels_last memory
format), training forward (8,256,14,14), and the per-call cost on (2, 4).

Every contender allocates its output, as torch does ("fastbn"); the column
"out=" is fastbn writing into a preallocated buffer (no page faults).
fastbn and torch run in alternating rounds, so a change of machine load hits
both; the median of the rounds is reported.  GB/s counts the bytes the
operation must move at minimum: read x + write y for the forwards, read dy
and x + write dx for the backward.  Ratios are torch / fastbn and
reference / fastbn (higher is better for fastbn).

Two OpenMP runtimes share this process (fastbn's libgomp and the copy torch
bundles).  After a parallel region, libgomp's idle workers spin for 300,000
pause instructions by default, several milliseconds on Zen 3; on a 2-core
machine the other library's next call then runs with one core stolen
(measured: fastbn's (8,256,14,14) forward 0.1 ms alone, 6.8 ms right after a
torch call; torch's 0.6 ms alone, 24 ms right after fastbn).  The script
therefore sets GOMP_SPINCOUNT=10000 (both runtimes read it) before importing
either library, unless the caller set it.
"""
from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # see the module docstring

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np

import fastbn
from fastbn import functional as F

try:
    import torch
except ImportError:  # torch is optional: its column stays empty
    torch = None

DTYPE = np.float32


# section: cases ----------------------------------------------------------------

@dataclass(frozen=True)
class BatchNormCase:
    name: str
    kind: str            # "train", "eval", "backward" or "overhead"
    shape: tuple
    axis: int            # 1: channels-first, -1: channels-last
    targets: str = ""    # the issue's goals, printed beside the numbers

    def streams(self) -> int:
        """Arrays of x's size the operation must read or write."""
        return 3 if self.kind == "backward" else 2


CASES = [
    BatchNormCase("train_nchw", "train", (64, 128, 56, 56), 1, ">= 3x torch, >= 15x reference"),
    BatchNormCase("eval_nchw", "eval", (64, 128, 56, 56), 1, ">= 1.5x torch"),
    BatchNormCase("backward_nchw", "backward", (64, 128, 56, 56), 1, ">= 2.5x torch"),
    BatchNormCase("train_nhwc", "train", (32, 56, 56, 64), -1, ">= 2x torch channels_last"),
    BatchNormCase("backward_nhwc", "backward", (32, 56, 56, 64), -1, ""),
    BatchNormCase("train_small", "train", (8, 256, 14, 14), 1, ">= 2x torch"),
    BatchNormCase("overhead_2x4", "overhead", (2, 4), 1, "<= 5 us per call"),
]
CASES_BY_NAME = {case.name: case for case in CASES}


def make_data(case: BatchNormCase, dtype=DTYPE, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    channels = case.shape[case.axis]
    x = rng.standard_normal(case.shape, dtype=np.float32).astype(dtype)
    x *= 2
    x += 0.5
    return dict(
        x=x, dy=rng.standard_normal(case.shape, dtype=np.float32).astype(dtype),
        weight=rng.standard_normal(channels).astype(dtype),
        bias=rng.standard_normal(channels).astype(dtype),
        running_mean=rng.standard_normal(channels).astype(dtype),
        running_var=(rng.random(channels) + 0.5).astype(dtype))


def _fastbn_call(case: BatchNormCase, data: dict, out: Optional[np.ndarray]) -> Callable[[], object]:
    x, dy, weight, bias = data["x"], data["dy"], data["weight"], data["bias"]
    running_mean, running_var = data["running_mean"].copy(), data["running_var"].copy()
    axis = case.axis
    if case.kind in ("train", "overhead"):
        return lambda: F.batch_norm(x, running_mean, running_var, weight, bias, training=True,
                                    axis=axis, out=out)
    if case.kind == "eval":
        return lambda: F.batch_norm(x, running_mean, running_var, weight, bias, training=False,
                                    axis=axis, out=out)
    _, mean, invstd = F.batch_norm_forward_train(x, weight, bias, axis=axis)
    return lambda: F.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis, out=out)


def _torch_call(case: BatchNormCase, data: dict) -> Callable[[], object]:
    def tensor(array):
        t = torch.from_numpy(array)
        # channels-last arrays become channels_last-strided (N, C, H, W) tensors, no copy
        return t.movedim(-1, 1) if case.axis == -1 and array.ndim > 2 else t

    x, dy = tensor(data["x"]), tensor(data["dy"])
    weight, bias = torch.from_numpy(data["weight"]), torch.from_numpy(data["bias"])
    running_mean = torch.from_numpy(data["running_mean"].copy())
    running_var = torch.from_numpy(data["running_var"].copy())
    if case.kind in ("train", "overhead", "eval"):
        training = case.kind != "eval"

        def forward():
            with torch.no_grad():
                return torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias,
                                                      training=training)
        return forward
    _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
        x, weight, bias, None, None, True, 0.1, 1e-5)
    return lambda: torch.ops.aten.native_batch_norm_backward(
        dy, x, weight, None, None, save_mean, save_invstd, True, 1e-5, [True, True, True])


def build_contenders(case: BatchNormCase, dtype=DTYPE, include_reference: bool = True
                     ) -> Dict[str, Callable[[], object]]:
    """One callable per contender over the same seeded data: "fastbn"
    (allocating), "fastbn_out" (out=), "torch" when installed, "reference"."""
    data = make_data(case, dtype)
    contenders = {"fastbn": _fastbn_call(case, data, None),
                  "fastbn_out": _fastbn_call(case, data, np.empty_like(data["x"]))}
    if torch is not None:
        contenders["torch"] = _torch_call(case, data)
    if include_reference:
        reference_call = _fastbn_call(case, data, None)

        def reference():
            with fastbn.use_backend("reference"):
                return reference_call()
        contenders["reference"] = reference
    return contenders


# section: timing ---------------------------------------------------------------

def time_interleaved(contenders: Dict[str, Callable[[], object]], rounds: int, warmup: int = 2,
                     calls: int = 1) -> Dict[str, List[float]]:
    """Seconds per call of each contender; each round times `calls` calls of
    each contender in turn."""
    for fn in contenders.values():
        for _ in range(warmup * calls):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls)
    return times


def run_bn_benchmark(case_names: Optional[List[str]] = None, rounds: int = 15,
                     reference_rounds: int = 3, threads: Optional[int] = 2,
                     dtype=DTYPE) -> List[dict]:
    """Benchmark rows, one per case: median seconds per call for fastbn
    (allocating), fastbn with out=, torch (None when unavailable) and the
    reference; ratios torch/fastbn and reference/fastbn; GB/s of fastbn.

    `threads` is applied to fastbn and torch alike (None: fastbn's current
    setting).  This is the function ``python -m fastbn bench`` may call.
    """
    if threads is not None:
        fastbn.set_num_threads(threads)
    if torch is not None:
        torch.set_num_threads(fastbn.get_num_threads())
    rows = []
    for name in case_names or [case.name for case in CASES]:
        case = CASES_BY_NAME[name]
        contenders = build_contenders(case, dtype)
        reference = contenders.pop("reference")
        calls = 2000 if case.kind == "overhead" else 1
        times = time_interleaved(contenders, rounds, calls=calls)
        times["reference"] = time_interleaved({"reference": reference}, reference_rounds,
                                              warmup=1, calls=calls)["reference"]
        median = {key: statistics.median(values) for key, values in times.items()}
        moved = case.streams() * int(np.prod(case.shape)) * np.dtype(dtype).itemsize
        rows.append({
            "case": case.name, "shape": case.shape, "axis": case.axis, "bytes": moved,
            "fastbn_s": median["fastbn"], "fastbn_min_s": min(times["fastbn"]),
            "fastbn_out_s": median["fastbn_out"], "torch_s": median.get("torch"),
            "reference_s": median["reference"],
            "vs_torch": median["torch"] / median["fastbn"] if "torch" in median else None,
            "vs_reference": median["reference"] / median["fastbn"],
            "gb_per_s": moved / median["fastbn"] / 1e9,
            "gb_per_s_out": moved / median["fastbn_out"] / 1e9,
            "targets": case.targets,
        })
    return rows


def _time_text(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e6:.2f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def format_table(rows: List[dict]) -> str:
    header = (f"{'case':<14} {'shape':<18} {'fastbn':>10} {'out=':>10} {'torch':>10} "
              f"{'reference':>10} {'x torch':>8} {'x ref':>7} {'GB/s':>6} {'GB/s out=':>9}  targets")
    lines = [header, "-" * len(header)]
    for row in rows:
        vs_torch = f"{row['vs_torch']:7.2f}x" if row["vs_torch"] is not None else f"{'-':>8}"
        shape = "x".join(map(str, row["shape"])) + (" NHWC" if row["axis"] == -1 else "")
        lines.append(
            f"{row['case']:<14} {shape:<18} {_time_text(row['fastbn_s']):>10} "
            f"{_time_text(row['fastbn_out_s']):>10} {_time_text(row['torch_s']):>10} "
            f"{_time_text(row['reference_s']):>10} {vs_torch} {row['vs_reference']:6.1f}x "
            f"{row['gb_per_s']:6.1f} {row['gb_per_s_out']:9.1f}  {row['targets']}")
    return "\n".join(lines)


def describe_setup() -> str:
    torch_text = (f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
                  if torch is not None else "torch not installed")
    return (f"fastbn {fastbn.__version__}, SIMD target {fastbn.get_simd_target()}, "
            f"{fastbn.get_num_threads()} threads; numpy {np.__version__}; {torch_text}; float32; "
            f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--cases", nargs="*", choices=list(CASES_BY_NAME), help="cases to run")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads for fastbn and torch (default 2)")
    args = parser.parse_args(argv)
    rows = run_bn_benchmark(args.cases, rounds=5 if args.quick else 15,
                            reference_rounds=1 if args.quick else 3, threads=args.threads)
    print(describe_setup())
    print(format_table(rows))
    return 0


# section: pytest-benchmark ---------------------------------------------------------

try:
    import pytest
except ImportError:  # running as a script without pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("contender", ["fastbn", "fastbn_out", "torch", "reference"])
    @pytest.mark.parametrize("case", [case.name for case in CASES])
    def test_batch_norm(benchmark, case, contender):
        spec = CASES_BY_NAME[case]
        contenders = build_contenders(spec, include_reference=contender == "reference")
        if contender not in contenders:
            pytest.skip(f"{contender} is not installed")
        fastbn.set_num_threads(2)
        if torch is not None:
            torch.set_num_threads(fastbn.get_num_threads())
        benchmark.group = case
        benchmark.extra_info.update(
            bytes=spec.streams() * int(np.prod(spec.shape)) * np.dtype(DTYPE).itemsize,
            simd=fastbn.get_simd_target(), threads=fastbn.get_num_threads())
        if spec.kind == "overhead":
            benchmark(contenders[contender])
        else:
            rounds = 2 if contender == "reference" else 10
            benchmark.pedantic(contenders[contender], rounds=rounds, warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
