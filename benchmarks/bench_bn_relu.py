"""Fused batch norm + ReLU vs batch norm then ReLU, float32, same process.

    python benchmarks/bench_bn_relu.py             # table
    python benchmarks/bench_bn_relu.py --quick     # smaller shape, fewer rounds
    pytest benchmarks/bench_bn_relu.py --benchmark-only --benchmark-group-by=param:case

Contenders, for each operation (training forward, training backward, eval
forward, and one training step of the layers: forward + backward):

- fused: ``fastbn.functional.batch_norm_relu*`` / ``nn.BatchNormReLU2d``
  (one pass: the ReLU is applied in the normalization's rewrite; the
  backward recomputes the ReLU mask from x instead of reading y);
- unfused: fastbn's batch norm, then the ReLU in NumPy, written as a user
  would (``np.maximum(y, 0, out=y)`` in place; backward
  ``np.where(y > 0, dy, 0)`` then the batch-norm backward);
  for layers ``Sequential(BatchNorm2d, ReLU)``;
- torch: ``relu(batch_norm(x))`` (autograd for the backward and the step),
  when torch is installed.

Every contender writes into preallocated buffers where its API allows it.
GB/s counts the bytes the operation must move at minimum (forward: read x,
write y; backward: read dy and x, write dx; step: both), for every
contender, so it is comparable across rows.  Contenders run in alternating
rounds; medians are reported with the SIMD target and thread count.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from typing import Callable, Dict, List, Optional

import numpy as np

import fastbn
from fastbn import functional as F
from fastbn import nn
from fastbn.bench.measure import time_interleaved

try:
    import torch
except ImportError:  # torch is optional: its column stays empty
    torch = None

DTYPE = np.float32
SHAPE = (64, 128, 56, 56)
QUICK_SHAPE = (16, 128, 56, 56)
KINDS = ("train_forward", "backward", "eval_forward", "layer_step")
STREAMS = {"train_forward": 2, "backward": 3, "eval_forward": 2, "layer_step": 5}


def make_data(shape, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    channels = shape[1]
    return dict(
        x=rng.standard_normal(shape, dtype=np.float32) * 2 + 0.5,
        dy=rng.standard_normal(shape, dtype=np.float32),
        weight=rng.normal(1.0, 0.3, channels).astype(DTYPE),
        bias=rng.normal(0.0, 0.3, channels).astype(DTYPE),
        running_mean=rng.normal(0.5, 0.1, channels).astype(DTYPE),
        running_var=rng.uniform(3.0, 5.0, channels).astype(DTYPE))


def _fused(kind: str, d: dict) -> Callable[[], object]:
    x, dy, w, b = d["x"], d["dy"], d["weight"], d["bias"]
    rm, rv = d["running_mean"].copy(), d["running_var"].copy()
    out = np.empty_like(x)
    if kind == "train_forward":
        return lambda: F.batch_norm_relu(x, rm, rv, w, b, training=True, out=out)
    if kind == "eval_forward":
        return lambda: F.batch_norm_relu(x, rm, rv, w, b, training=False, out=out)
    if kind == "backward":
        _, mean, invstd = F.batch_norm_relu_forward_train(x, w, b)
        return lambda: F.batch_norm_relu_backward(dy, x, mean, invstd, w, b, out=out)
    layer = nn.BatchNormReLU2d(x.shape[1])

    def step():
        layer(x)
        return layer.backward(dy)
    return step


def _unfused(kind: str, d: dict) -> Callable[[], object]:
    x, dy, w, b = d["x"], d["dy"], d["weight"], d["bias"]
    rm, rv = d["running_mean"].copy(), d["running_var"].copy()
    out = np.empty_like(x)
    zero = DTYPE(0)
    if kind in ("train_forward", "eval_forward"):
        training = kind == "train_forward"

        def forward():
            y = F.batch_norm(x, rm, rv, w, b, training=training, out=out)
            return np.maximum(y, zero, out=y)
        return forward
    if kind == "backward":
        y, mean, invstd = F.batch_norm_forward_train(x, w, b)
        np.maximum(y, zero, out=y)
        masked = np.empty_like(x)

        def backward():
            np.multiply(dy, y > 0, out=masked)
            return F.batch_norm_backward(masked, x, mean, invstd, w, out=out)
        return backward
    layers = nn.Sequential(nn.BatchNorm2d(x.shape[1]), nn.ReLU())

    def step():
        layers(x)
        return layers.backward(dy)
    return step


def _torch(kind: str, d: dict) -> Callable[[], object]:
    functional = torch.nn.functional
    x, dy = torch.from_numpy(d["x"]), torch.from_numpy(d["dy"])
    w, b = torch.from_numpy(d["weight"]), torch.from_numpy(d["bias"])
    rm, rv = torch.from_numpy(d["running_mean"].copy()), torch.from_numpy(d["running_var"].copy())
    if kind in ("train_forward", "eval_forward"):
        training = kind == "train_forward"

        def forward():
            with torch.no_grad():
                return functional.relu(functional.batch_norm(x, rm, rv, w, b, training=training),
                                       inplace=True)
        return forward
    wg, bg = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    if kind == "backward":
        y = functional.relu(functional.batch_norm(xg, rm, rv, wg, bg, training=True))
        return lambda: torch.autograd.grad(y, (xg, wg, bg), dy, retain_graph=True)

    def step():
        y = functional.relu(functional.batch_norm(xg, rm, rv, wg, bg, training=True))
        return torch.autograd.grad(y, (xg, wg, bg), dy)
    return step


def build_contenders(kind: str, shape) -> Dict[str, Callable[[], object]]:
    data = make_data(shape)
    contenders = {"fused": _fused(kind, data), "unfused": _unfused(kind, data)}
    if torch is not None:
        contenders["torch"] = _torch(kind, data)
    return contenders


def run(shape=SHAPE, rounds: int = 15, threads: int = 2, kinds=KINDS) -> List[dict]:
    """One row per operation: median seconds, GB/s, fused speed-up."""
    fastbn.set_num_threads(threads)
    if torch is not None:
        torch.set_num_threads(threads)
    rows = []
    for kind in kinds:
        timings = time_interleaved(build_contenders(kind, shape), min_rounds=rounds,
                                   max_rounds=rounds)
        times = {name: timing.runs for name, timing in timings.items()}
        median = {name: statistics.median(values) for name, values in times.items()}
        moved = STREAMS[kind] * int(np.prod(shape)) * np.dtype(DTYPE).itemsize
        rows.append(dict(kind=kind, shape=tuple(shape), bytes=moved,
                         seconds=median, minimum={n: min(v) for n, v in times.items()},
                         gb_per_s={n: moved / s / 1e9 for n, s in median.items()},
                         speedup_vs_unfused=median["unfused"] / median["fused"],
                         speedup_vs_torch=(median["torch"] / median["fused"]
                                           if "torch" in median else None)))
    return rows


def format_table(rows: List[dict]) -> str:
    header = (f"{'operation':<14} {'fused':>10} {'unfused':>10} {'torch':>10} "
              f"{'GB/s fused':>11} {'GB/s unfused':>13} {'GB/s torch':>11} "
              f"{'x unfused':>10} {'x torch':>8}")
    lines = [header, "-" * len(header)]
    for row in rows:
        s, g = row["seconds"], row["gb_per_s"]
        torch_time = f"{s['torch'] * 1e3:8.2f}ms" if "torch" in s else f"{'-':>10}"
        torch_rate = f"{g['torch']:11.1f}" if "torch" in g else f"{'-':>11}"
        vs_torch = f"{row['speedup_vs_torch']:7.2f}x" if row["speedup_vs_torch"] else f"{'-':>8}"
        lines.append(f"{row['kind']:<14} {s['fused'] * 1e3:8.2f}ms {s['unfused'] * 1e3:8.2f}ms "
                     f"{torch_time} {g['fused']:11.1f} {g['unfused']:13.1f} {torch_rate} "
                     f"{row['speedup_vs_unfused']:9.2f}x {vs_torch}")
    return "\n".join(lines)


def describe_setup(shape, threads: int) -> str:
    torch_text = f"torch {torch.__version__}" if torch is not None else "torch not installed"
    return (f"fastbn {fastbn.__version__}, SIMD target {fastbn.get_simd_target()}, {threads} "
            f"threads; {torch_text}; float32 {'x'.join(map(str, shape))} channels-first")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"shape {QUICK_SHAPE}, 5 rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    shape = QUICK_SHAPE if args.quick else SHAPE
    rounds = args.rounds or (5 if args.quick else 15)
    rows = run(shape, rounds, args.threads)
    print(describe_setup(shape, args.threads))
    print(format_table(rows))
    return 0


# section: pytest-benchmark ---------------------------------------------------------

try:
    import pytest
except ImportError:  # running as a script without pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("contender", ["fused", "unfused", "torch"])
    @pytest.mark.parametrize("case", KINDS)
    def test_bn_relu(benchmark, case, contender):
        contenders = build_contenders(case, QUICK_SHAPE)
        if contender not in contenders:
            pytest.skip(f"{contender} is not installed")
        fastbn.set_num_threads(2)
        if torch is not None:
            torch.set_num_threads(2)
        benchmark.group = case
        benchmark.extra_info.update(
            bytes=STREAMS[case] * int(np.prod(QUICK_SHAPE)) * np.dtype(DTYPE).itemsize,
            simd=fastbn.get_simd_target(), threads=fastbn.get_num_threads())
        benchmark.pedantic(contenders[contender], rounds=10, warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
