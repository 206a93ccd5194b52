"""Times of the split-phase kernels (stats, apply, backward_reduce,
backward_apply) against the fused training kernels and the eval forward's
straight pass, one process, interleaved rounds.

    python benchmarks/bn_phases.py [--shape 32,128,56,56] [--rounds 25]
                                   [--threads 1] [--align 16|64]

Every round calls every variant once, in order, with outputs allocated
beforehand ("pre") and with a fresh output per call ("fresh", as the layers
return); min and median of the rounds, and GB/s from the min (bytes read +
bytes written, each array once).  `--align 64` places every array at a
64-byte boundary (NumPy's large allocations are 16-byte aligned).
"""
import argparse
import os
import statistics
import time

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--shape", default="32,128,56,56")
parser.add_argument("--rounds", type=int, default=25)
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--align", type=int, default=0, help="byte alignment of every array (0: NumPy's)")
parser.add_argument("--only", default="", help="comma-separated variant names")
parser.add_argument("--against", default="",
                    help="another build's fastbn/_bn*.so: its phases are timed too ('base ...')")
args = parser.parse_args()
os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

import numpy as np  # noqa: E402

import fastbn  # noqa: E402
from fastbn import _bn  # noqa: E402

fastbn.set_num_threads(args.threads)
other = None
if args.against:
    import importlib.util
    # loaded under another package name; it shares this tree's _core (SIMD
    # target, thread count), whose interface must not have changed
    spec = importlib.util.spec_from_file_location("against._bn", args.against)
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)
shape = tuple(int(v) for v in args.shape.split(","))
N, C = shape[0], shape[1]
inner = int(np.prod(shape[2:]))
itemsize = 4


def array(values=None):
    if not args.align:
        out = np.empty(shape, np.float32)
    else:
        raw = np.empty(int(np.prod(shape)) * itemsize + args.align, np.uint8)
        offset = (-raw.ctypes.data) % args.align
        out = raw[offset:offset + int(np.prod(shape)) * itemsize].view(np.float32).reshape(shape)
    if values is not None:
        out[...] = values
    else:
        out[...] = 0
    return out


rng = np.random.default_rng(0)
x = array(rng.standard_normal(shape, dtype=np.float32) * 2 + 1)
dy = array(rng.standard_normal(shape, dtype=np.float32))
out = array()
w = np.linspace(0.5, 1.5, C).astype(np.float32)
b = np.linspace(-1, 1, C).astype(np.float32)
rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
mean, m2 = _bn.stats(x, N, C, inner)
invstd = 1.0 / np.sqrt(m2 / (N * inner) + 1e-5)
sdy, sdyx = _bn.backward_reduce(dy, x, N, C, inner, mean, invstd)
saved_mean, saved_invstd = mean.astype(np.float32), invstd.astype(np.float32)
nbytes = x.nbytes
print(f"shape {shape} float32, {args.threads} thread(s), x % 64 = {x.ctypes.data % 64}, "
      f"out % 64 = {out.ctypes.data % 64}, load {os.getloadavg()[0]:.2f}")


def variants(y, _bn=_bn, prefix=""):
    """name -> (call, bytes moved); y: the output array or None (fresh)."""
    named = {
        "eval_forward": (lambda: _bn.eval_forward(x, y, N, C, inner, rm, rv, w, b, 1e-5), 2),
        "train_forward": (lambda: _bn.train_forward(x, y, N, C, inner, w, b, 1e-5, None, None,
                                                    0.1), 3),
        "stats": (lambda: _bn.stats(x, N, C, inner), 1),
        "apply": (lambda: _bn.apply(x, y, N, C, inner, mean, invstd, w, b), 2),
        "stats+apply": (lambda: (_bn.stats(x, N, C, inner),
                                 _bn.apply(x, y, N, C, inner, mean, invstd, w, b)), 3),
        "backward_eval(dx=dy*k)": (lambda: _bn.backward_eval(dy, None, y, N, C, inner, rm, rv, w,
                                                             1e-5, None, None, False), 2),
        "backward": (lambda: _bn.backward(dy, x, y, N, C, inner, saved_mean, saved_invstd, w,
                                          None, None, False), 5),
        "backward_reduce": (lambda: _bn.backward_reduce(dy, x, N, C, inner, mean, invstd), 2),
        "backward_apply": (lambda: _bn.backward_apply(dy, x, y, N, C, inner, mean, invstd, w, sdy,
                                                      sdyx, float(N * inner)), 3),
        "reduce+bwd_apply": (lambda: (_bn.backward_reduce(dy, x, N, C, inner, mean, invstd),
                                      _bn.backward_apply(dy, x, y, N, C, inner, mean, invstd, w,
                                                         sdy, sdyx, float(N * inner))), 5),
        "numpy copyto": (lambda: np.copyto(y if y is not None else np.empty_like(x), x), 2),
        "numpy sum": (lambda: x.sum(), 1),
    }
    if prefix:
        named = {prefix + name: value for name, value in named.items() if not name.startswith("numpy")}
    return named


table = {}
for kind, y in (("pre", out), ("fresh", None)):
    named = variants(y)
    if other is not None:
        named.update(variants(y, other, "base "))
    for name, (call, streams) in named.items():
        if args.only and name.replace("base ", "") not in args.only.split(","):
            continue
        table[(name, kind)] = (call, streams, [], [])
for call, _, _, _ in table.values():
    call()
for _ in range(args.rounds):
    for call, _, times, cpu in table.values():
        start, start_cpu = time.perf_counter(), time.thread_time()
        call()
        cpu.append(time.thread_time() - start_cpu)
        times.append(time.perf_counter() - start)
print("wall: real time; cpu: this thread's CPU time (excludes time descheduled)")
print(f"{'variant':24s} {'out':6s} {'wall min':>8s} {'wall med':>8s} {'cpu min':>8s} "
      f"{'cpu med':>8s} {'GB/s':>6s}  (ms; GB/s from cpu min)")
for (name, kind), (_, streams, times, cpu) in table.items():
    best = min(cpu)
    print(f"{name:24s} {kind:6s} {1e3 * min(times):8.2f} {1e3 * statistics.median(times):8.2f} "
          f"{1e3 * best:8.2f} {1e3 * statistics.median(cpu):8.2f} "
          f"{streams * nbytes / best / 1e9:6.1f}")
print(f"load after: {os.getloadavg()}")
