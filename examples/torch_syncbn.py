"""CPU SyncBatchNorm for PyTorch: DistributedDataParallel over gloo with
fastbn.torch.convert_sync_batchnorm, then the cost of one SyncBatchNorm
layer against local BatchNorm layers.

    python examples/torch_syncbn.py                 # 2 ranks, 1 thread each
    python examples/torch_syncbn.py --ranks 3 --shape 16,64,28,28

The script starts its own ranks (torch.multiprocessing, a FileStore in a
temporary folder); under torchrun, pass --torchrun to use its environment.
"""
import argparse
import datetime
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastbn.torch as ft

nn = torch.nn


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def train_with_ddp(rank, world, steps, batch_per_rank):
    """DDP + SyncBatchNorm: every rank trains on its own part of each batch."""
    model = nn.parallel.DistributedDataParallel(ft.convert_sync_batchnorm(small_cnn()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    for step in range(steps):
        x = torch.randn(batch_per_rank, 3, 16, 16, generator=generator)
        target = torch.randint(0, 10, (batch_per_rank,), generator=generator)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        losses = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses, loss.detach())
        if rank == 0:
            print(f"step {step}: loss per rank {[round(v.item(), 4) for v in losses]}")
    # the synchronized statistics are the same bits on every rank
    running_var = model.module[1].running_var
    gathered = [torch.empty_like(running_var) for _ in range(world)]
    dist.all_gather(gathered, running_var)
    if rank == 0:
        same = all(torch.equal(v, gathered[0]) for v in gathered)
        print(f"running statistics identical on all {world} ranks: {same}")


def time_layers(rank, shape, channels_last, repeats):
    """Forward + backward of one layer on this rank's batch: SyncBatchNorm
    against fastbn's and torch's local BatchNorm2d (alternated)."""
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape)
    layers = {"fastbn SyncBatchNorm": ft.SyncBatchNorm(shape[1]),
              "fastbn BatchNorm2d (local)": ft.BatchNorm2d(shape[1]),
              "torch BatchNorm2d (local)": nn.BatchNorm2d(shape[1])}
    times = {name: [] for name in layers}
    for _ in range(repeats + 1):  # the first round warms up
        for name, layer in layers.items():
            leaf = x.detach().requires_grad_()
            dist.barrier()
            start = time.perf_counter()
            layer(leaf).backward(dy)
            times[name].append(time.perf_counter() - start)
    if rank == 0:
        channels = shape[1]
        print(f"\nper rank {tuple(shape)} float32, {'channels_last' if channels_last else 'contiguous'}, "
              f"{torch.get_num_threads()} thread(s) per rank; SyncBatchNorm sends "
              f"{8 * (6 + 1 + 2 * channels)} + {8 * (1 + 2 * channels)} bytes per rank per step")
        for name, values in times.items():
            values = values[1:]
            print(f"  {name:28s} median {statistics.median(values) * 1e3:8.1f} ms   "
                  f"best {min(values) * 1e3:8.1f} ms")
        sync, local = (statistics.median(times[name][1:]) for name in list(times)[:2])
        print(f"  SyncBatchNorm / local fastbn BatchNorm2d: {sync / local:.2f}x (median)")


def run_rank(rank, world, init_method, args):
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        train_with_ddp(rank, world, args.steps, args.batch)
        shape = tuple(int(size) for size in args.shape.split(","))
        time_layers(rank, shape, args.channels_last, args.repeats)
    finally:
        dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--steps", type=int, default=3, help="DDP training steps")
    parser.add_argument("--batch", type=int, default=8, help="training batch per rank")
    parser.add_argument("--shape", default="32,128,56,56", help="timed input per rank")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--torchrun", action="store_true",
                        help="use torchrun's RANK/WORLD_SIZE/MASTER_ADDR environment")
    args = parser.parse_args()
    if args.torchrun:
        run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", args)
        return
    with tempfile.TemporaryDirectory() as folder:
        init_method = f"file://{os.path.join(folder, 'store')}"
        mp.spawn(spawned_rank, args=(args.ranks, init_method, args), nprocs=args.ranks)


def spawned_rank(rank, world, init_method, args):
    """mp.spawn's entry point (a module-level function, as spawn needs)."""
    run_rank(rank, world, init_method, args)


if __name__ == "__main__":
    main()
