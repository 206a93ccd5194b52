"""Channels-first (NCHW) batch norm with short rows (H*W values per (sample,
channel) pair): this tree's kernels against torch, and optionally against
another build's kernels, all in one process, interleaved rounds.

    python benchmarks/short_rows.py [--shapes 32,512,4,4;32,256,7,7]
        [--threads 1] [--rounds 60] [--dtype float32] [--against PATH/_bn.so]

Every round calls every variant once, in an order rotated each round
(outputs allocated beforehand); min and median of the wall times of the rounds, in us.
Variants: training forward, eval forward, training backward (dx, dweight,
dbias), each plain and with the fused ReLU (torch: batch norm then ReLU /
threshold_backward then the batch-norm backward, as autograd runs them).
"""
import argparse
import os
import statistics
import time

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--shapes", default="32,512,4,4;32,256,7,7;32,512,7,7;32,128,14,14;"
                    "32,64,28,28;8,512,2,2;128,64,3,3;16,1000,5,5")
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--rounds", type=int, default=60)
parser.add_argument("--dtype", default="float32")
parser.add_argument("--against", default="", help="another build's fastbn/_bn*.so")
parser.add_argument("--no-torch", action="store_true")
parser.add_argument("--cpu", action="store_true",
                    help="time this thread's CPU time (1 thread: excludes time descheduled)")
args = parser.parse_args()
os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

import numpy as np  # noqa: E402

import fastbn  # noqa: E402
from fastbn import _bn  # noqa: E402

fastbn.set_num_threads(args.threads)
other = None
if args.against:
    import importlib.util
    spec = importlib.util.spec_from_file_location("against._bn", args.against)
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)
torch = None
if not args.no_torch:
    import torch
    torch.set_num_threads(args.threads)
dtype = np.dtype(args.dtype)


def kernels(module, x, dy, out, N, C, inner, w, b, rm, rv, mean, invstd):
    def train(relu):
        return lambda: module.train_forward(x, out, N, C, inner, w, b, 1e-5, None, None, 0.1,
                                            relu)

    def evalf(relu):
        return lambda: module.eval_forward(x, out, N, C, inner, rm, rv, w, b, 1e-5, relu)

    def backward(relu):
        dw, db = np.empty(C, dtype), np.empty(C, dtype)
        return lambda: module.backward(dy, x, out, N, C, inner, mean, invstd, w, dw, db, False,
                                       b, relu)

    return {"train": train(False), "train+relu": train(True), "eval": evalf(False),
            "eval+relu": evalf(True), "bwd": backward(False), "bwd+relu": backward(True)}


def torch_kernels(x, dy, w, b, rm, rv, mean, invstd):
    tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
    tw, tb = torch.from_numpy(w), torch.from_numpy(b)
    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    tmean, tinv = torch.from_numpy(mean), torch.from_numpy(invstd)
    aten = torch.ops.aten
    y = aten.native_batch_norm(tx, tw, tb, None, None, True, 0.1, 1e-5)[0]
    mask = y > 0

    def bwd():
        return aten.native_batch_norm_backward(tdy, tx, tw, None, None, tmean, tinv, True, 1e-5,
                                               [True, True, True])

    def bwd_relu():
        g = aten.threshold_backward(tdy, y, 0)
        return aten.native_batch_norm_backward(g, tx, tw, None, None, tmean, tinv, True, 1e-5,
                                               [True, True, True])

    return {"train": lambda: aten.native_batch_norm(tx, tw, tb, None, None, True, 0.1, 1e-5),
            "train+relu": lambda: torch.relu_(aten.native_batch_norm(tx, tw, tb, None, None,
                                                                     True, 0.1, 1e-5)[0]),
            "eval": lambda: aten.native_batch_norm(tx, tw, tb, trm, trv, False, 0.1, 1e-5),
            "eval+relu": lambda: torch.relu_(aten.native_batch_norm(tx, tw, tb, trm, trv, False,
                                                                    0.1, 1e-5)[0]),
            "bwd": bwd, "bwd+relu": bwd_relu}


clock = time.thread_time if args.cpu else time.perf_counter
print(f"{'cpu' if args.cpu else 'wall'} time, {args.dtype}, {args.threads} thread(s), target {fastbn.get_simd_target()}, "
      f"load {os.getloadavg()[0]:.2f}; us, min / median of {args.rounds} interleaved rounds")
head = f"{'shape':16s} {'variant':11s} {'new':>15s}"
if other is not None:
    head += f" {'base':>15s} {'base/new':>8s}"
if torch is not None:
    head += f" {'torch':>15s} {'torch/new':>9s}"
print(head)
for text in args.shapes.split(";"):
    shape = tuple(int(v) for v in text.split(","))
    N, C = shape[0], shape[1]
    inner = int(np.prod(shape[2:]))
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    out = np.empty_like(x)
    w = np.linspace(0.5, 1.5, C).astype(dtype)
    b = np.linspace(-1, 1, C).astype(dtype)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    _, mean, invstd = _bn.train_forward(x, None, N, C, inner, w, b, 1e-5, None, None, 0.1)[:3]
    sets = {"new": kernels(_bn, x, dy, out, N, C, inner, w, b, rm, rv, mean, invstd)}
    if other is not None:
        sets["base"] = kernels(other, x, dy, out, N, C, inner, w, b, rm, rv, mean, invstd)
    if torch is not None:
        sets["torch"] = torch_kernels(x, dy, w, b, rm, rv, mean, invstd)
    for variant in sets["new"]:
        calls = [(name, calls[variant]) for name, calls in sets.items()]
        times = {name: [] for name, _ in calls}
        for _, call in calls:
            call()
        for round_ in range(args.rounds):
            # rotated each round: whoever runs after another variant finds
            # the caches as that one left them
            shift = round_ % len(calls)
            for name, call in calls[shift:] + calls[:shift]:
                start = clock()
                call()
                times[name].append(clock() - start)
        best = {name: min(t) for name, t in times.items()}
        med = {name: statistics.median(t) for name, t in times.items()}
        row = f"{text:16s} {variant:11s} {1e6 * best['new']:7.1f}/{1e6 * med['new']:7.1f}"
        if "base" in times:
            row += (f" {1e6 * best['base']:7.1f}/{1e6 * med['base']:7.1f}"
                    f" {med['base'] / med['new']:8.2f}")
        if "torch" in times:
            row += (f" {1e6 * best['torch']:7.1f}/{1e6 * med['torch']:7.1f}"
                    f" {med['torch'] / med['new']:9.2f}")
        print(row, flush=True)
print(f"load after: {os.getloadavg()}")
