"""SyncBatchNorm's channel-block pipeline in one process: forward+backward of
`nn.BatchNorm2d` (the fused local kernels) against `nn.SyncBatchNorm` on a
one-rank stand-in communicator (the split phases and the block loop, no MPI)
for several block sizes; interleaved rounds.

    python benchmarks/syncbn_blocks.py [--shape 32,128,56,56] [--rounds 15]
        [--block-bytes 0,1048576,2097152,4194304,8388608]

Block size 0 is one block (the unblocked phases).  Every round calls every
variant once, in order; each call returns fresh y and dx, as the layers do.
Printed: wall and CPU time (this thread's, which excludes time descheduled
on a loaded machine), min and median over the rounds, and each median's
ratio to the local layer's.
"""
import argparse
import os
import statistics
import time

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--shape", default="32,128,56,56")
parser.add_argument("--rounds", type=int, default=15)
parser.add_argument("--block-bytes", default="0,1048576,2097152,4194304,8388608",
                    help="comma-separated input bytes per block (0: one block)")
parser.add_argument("--dtype", default="float32")
args = parser.parse_args()
for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(variable, "1")

import numpy as np  # noqa: E402

import fastbn  # noqa: E402
from fastbn import nn  # noqa: E402
from fastbn.distributed import _pipeline  # noqa: E402

fastbn.set_num_threads(1)


class OneRank:
    """A communicator of one rank (Allgather only: the pipeline completes
    each exchange at once)."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def Allgather(self, send, recv):
        recv[...] = np.asarray(send).reshape(recv.shape)


shape = tuple(int(v) for v in args.shape.split(","))
dtype = np.dtype(args.dtype)
rng = np.random.default_rng(0)
x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
dy = rng.standard_normal(shape).astype(dtype)
sizes = list(dict.fromkeys(int(v) for v in args.block_bytes.split(",")))  # each once


def run(layer, block_bytes=None):
    def call():
        _pipeline.BLOCK_BYTES = block_bytes
        try:
            layer(x)
            layer.backward(dy)
        finally:
            _pipeline.BLOCK_BYTES = None
    return call


local = nn.BatchNorm2d(shape[1], dtype=dtype)
sync = nn.SyncBatchNorm(shape[1], comm=OneRank(), dtype=dtype)
variants = {"BatchNorm2d (local)": run(local)}
for size in sizes:
    if not size:
        variants["SyncBatchNorm one block"] = run(sync)
        continue
    label = f"{size / 2 ** 20:g} MiB"
    variants[f"SyncBatchNorm {label}"] = run(sync, size)
wall = {name: [] for name in variants}
cpu = {name: [] for name in variants}
for call in variants.values():
    call()
print(f"shape {shape} {dtype}, 1 thread, {args.rounds} rounds, load before "
      f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
for _ in range(args.rounds):
    for name, call in variants.items():
        start, start_cpu = time.perf_counter(), time.thread_time()
        call()
        cpu[name].append(time.thread_time() - start_cpu)
        wall[name].append(time.perf_counter() - start)
base_wall = statistics.median(wall["BatchNorm2d (local)"])
base_cpu = statistics.median(cpu["BatchNorm2d (local)"])
print(f"{'forward+backward (ms)':42s} {'wall min':>8s} {'wall med':>8s} {'ratio':>6s} "
      f"{'cpu min':>8s} {'cpu med':>8s} {'ratio':>6s}")
for name in variants:
    w, c = wall[name], cpu[name]
    print(f"{name:42s} {1e3 * min(w):8.2f} {1e3 * statistics.median(w):8.2f} "
          f"{statistics.median(w) / base_wall:6.3f} {1e3 * min(c):8.2f} "
          f"{1e3 * statistics.median(c):8.2f} {statistics.median(c) / base_cpu:6.3f}")
print(f"load after {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
