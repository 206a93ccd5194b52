"""Data-parallel training over MPI: DataParallel + SyncBatchNorm + Adam (or
the sharded ZeroRedundancyOptimizer), with throughput and the SyncBatchNorm
cost measured.

    pip install "fastbn[mpi]"
    mpiexec -n 2 python examples/distributed_mlp.py            # 2 ranks x 1 thread
    mpiexec -n 1 python examples/distributed_mlp.py            # the 1-rank baseline
    mpiexec -n 2 python examples/distributed_mlp.py --bn-cost  # SyncBN vs local BN
    mpiexec -n 2 python examples/distributed_mlp.py --bn-cost --block-bytes 0,2097152,4194304

Every rank takes 1/P of each global batch (same global batch for any P), so
examples/s of P ranks over examples/s of 1 rank is the parallel speed-up.
The default global batch, 4096, is one where computation dominates: the
gradients (5 MiB at width 1024) are allreduced once per step whatever the
batch, so with small batches the exchange and the SyncBatchNorm
synchronizations weigh more (the README has the figures for 512 to 4096).
"""
import argparse
import os
import time

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--threads", type=int, default=1, help="threads per rank (BLAS and OpenMP)")
parser.add_argument("--global-batch", type=int, default=4096,
                    help="examples per step over all ranks (512 was the former default)")
parser.add_argument("--width", type=int, default=1024)
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--zero", action="store_true", help="shard Adam's state (ZeroRedundancyOptimizer)")
parser.add_argument("--bn-cost", action="store_true",
                    help="time SyncBatchNorm vs BatchNorm2d forward+backward on (32,128,56,56) per rank")
parser.add_argument("--block-bytes", default=None,
                    help="with --bn-cost: comma-separated SyncBatchNorm channel-block sizes, input "
                         "bytes per block and rank (0: one block), timed in alternating rounds "
                         "(default: the library's BLOCK_BYTES only)")
parser.add_argument("--rounds", type=int, default=10, help="with --bn-cost: timed rounds")
args = parser.parse_args()
# before NumPy starts its BLAS threads
for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[variable] = str(args.threads)

import numpy as np                                                   # noqa: E402
from mpi4py import MPI                                               # noqa: E402

import fastbn                                                        # noqa: E402
from fastbn import nn                                                # noqa: E402
from fastbn.distributed import DataParallel, ZeroRedundancyOptimizer  # noqa: E402

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()


def report(text):
    if rank == 0:
        print(text, flush=True)


def train():
    rng = np.random.default_rng(0)
    width = args.width
    model = nn.Sequential(
        nn.Linear(256, width, False, rng=rng), nn.BatchNorm1d(width), nn.ReLU(),
        nn.Linear(width, width, False, rng=rng), nn.BatchNorm1d(width), nn.ReLU(),
        nn.Linear(width, 10, rng=rng))
    model = DataParallel(nn.SyncBatchNorm.convert_sync_batchnorm(model, comm), comm)
    if args.zero:
        optimizer = ZeroRedundancyOptimizer(model.parameters(), fastbn.optim.Adam, comm=comm, lr=1e-3)
    else:
        optimizer = fastbn.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    data = np.random.default_rng(1)
    share = args.global_batch // size
    x_all = data.standard_normal((args.global_batch, 256)).astype(np.float32)
    y_all = data.integers(0, 10, args.global_batch)
    mine = slice(rank * share, (rank + 1) * share)

    def step():
        loss = criterion(model(x_all[mine]), y_all[mine])
        optimizer.zero_grad()
        model.backward(criterion.backward())
        optimizer.step()
        return loss

    step()                                   # warm-up
    comm.Barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    comm.Barrier()
    elapsed = time.perf_counter() - start
    report(f"{size} rank(s) x {args.threads} thread(s), MLP 256-{width}-{width}-10, global batch "
           f"{share * size}, {'ZeRO ' if args.zero else ''}Adam: "
           f"{args.steps * share * size / elapsed:.0f} examples/s (last loss {float(loss):.4f})")


def bn_cost():
    from fastbn.distributed import _pipeline
    shape = (32, 128, 56, 56)
    x = np.random.default_rng(rank).standard_normal(shape).astype(np.float32)
    dy = np.ones_like(x)
    local, sync = nn.BatchNorm2d(128), nn.SyncBatchNorm(128, comm=comm)
    default = _pipeline.BLOCK_BYTES
    # each size once (a repeated one would share its name, and its times)
    sizes = ([default] if args.block_bytes is None
             else list(dict.fromkeys(int(v) or None for v in args.block_bytes.split(","))))

    def label(size):
        return "one block" if size is None else f"{size / 2 ** 20:g} MiB blocks"

    variants = [("BatchNorm2d (local)", local, None)]
    variants += [(f"SyncBatchNorm, {label(block_size)}", sync, block_size) for block_size in sizes]
    times = {name: [] for name, _, _ in variants}
    # rounds alternate the variants, so a change of machine load hits them all
    for timed in [False] + [True] * args.rounds:
        for name, layer, block_size in variants:
            _pipeline.BLOCK_BYTES = block_size
            comm.Barrier()
            start = time.perf_counter()
            layer(x)
            layer.backward(dy)
            if timed:   # the slowest rank's time
                times[name].append(comm.allreduce(time.perf_counter() - start, op=MPI.MAX))
    report(f"{size} rank(s) x {args.threads} thread(s), (32,128,56,56) float32 per rank, "
           f"forward+backward, {args.rounds} alternating rounds (slowest rank), load "
           f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}:")
    base = times["BatchNorm2d (local)"]
    report(f"  {'':34s} {'min ms':>8s} {'median':>8s}  ratio of min, of median")
    for name, values in times.items():
        report(f"  {name:34s} {1e3 * min(values):8.2f} {1e3 * np.median(values):8.2f}  "
               f"{min(values) / min(base):.3f} {np.median(values) / np.median(base):.3f}")
    for block_size in sizes:
        # per call: forward, BLOCK_BYTES None: header (6 words), mean, m2
        # in one row; BLOCK_BYTES set: the header, then per block status,
        # mean, m2, and one last status word when blocked; backward: per
        # block status and two sums, one last status word when blocked
        _pipeline.BLOCK_BYTES = block_size
        blocks = [len(_pipeline.plan_blocks(128, 32 * 56 * 56, 4, streams, True))
                  for streams in (1, 2)]
        forward = 8 * (6 + 2 * 128 + (0 if block_size is None else
                                      blocks[0] + (blocks[0] > 1)))
        backward = 8 * (blocks[1] + 2 * 128 + (blocks[1] > 1))
        report(f"  {label(block_size)}: {blocks[0]} forward, {blocks[1]} backward blocks; bytes "
               f"sent per rank: forward {forward}, backward {backward} (each rank receives "
               f"{size}x that)")
    _pipeline.BLOCK_BYTES = default


if args.bn_cost:
    bn_cost()
else:
    train()
