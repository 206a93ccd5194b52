"""A ZeroRedundancyOptimizer checkpoint (model + consolidated optimizer
state, written by rank 0 with fastbn.save) resumes bit-exactly: training on
from the loaded checkpoint in fresh objects gives the same parameters, bit
for bit, as training on without stopping.

    mpiexec -n 2 python check_zero_checkpoint.py DIRECTORY
"""
import os
import sys

import numpy as np

import fastbn
from fastbn import nn
from fastbn.distributed import DataParallel, ZeroRedundancyOptimizer

from _harness import run


def build(comm, seed):
    rng = np.random.default_rng(seed)
    model = nn.Sequential(nn.Linear(16, 24, False, rng=rng), nn.BatchNorm1d(24), nn.ReLU(),
                          nn.Linear(24, 5, rng=rng))
    model = DataParallel(nn.SyncBatchNorm.convert_sync_batchnorm(model, comm), comm)
    groups = [{"params": [p for n, p in model.named_parameters() if "bias" not in n]},
              {"params": [p for n, p in model.named_parameters() if "bias" in n],
               "weight_decay": 0.0}]
    optimizer = ZeroRedundancyOptimizer(groups, fastbn.optim.AdamW, comm=comm, lr=1e-2,
                                        weight_decay=1e-2)
    return model, optimizer


def steps(model, optimizer, comm, first, count):
    rank, size = comm.Get_rank(), comm.Get_size()
    criterion = nn.MSELoss()
    for step in range(first, first + count):
        rng = np.random.default_rng(100 + step)
        x = rng.standard_normal((8 * size, 16)).astype(np.float32)[rank::size]
        target = rng.standard_normal((8 * size, 5)).astype(np.float32)[rank::size]
        criterion(model(x), target)
        optimizer.zero_grad()
        model.backward(criterion.backward())
        optimizer.step()
        optimizer.param_groups[0]["lr"] *= 0.9      # a schedule: hyperparameters are saved too


def snapshot(model):
    return {name: array.copy() for name, array in model.state_dict().items()}


def main(comm):
    path = os.path.join(sys.argv[1], "zero.ckpt")
    rank = comm.Get_rank()
    model, optimizer = build(comm, seed=0)
    steps(model, optimizer, comm, 0, 4)
    optimizer.consolidate_state_dict(to=0)
    if rank == 0:
        full = optimizer.state_dict()
        n_params = sum(len(group["params"]) for group in optimizer.param_groups)
        assert sorted(full["state"]) == list(range(n_params)), "the consolidated state misses shards"
        assert "zero_shard" not in full
        fastbn.save(path, {"model": model, "optimizer": optimizer, "step": 4})
    comm.Barrier()
    steps(model, optimizer, comm, 4, 3)
    expected = snapshot(model)

    fresh_model, fresh_optimizer = build(comm, seed=1)
    extra = fastbn.load_into(path, {"model": fresh_model, "optimizer": fresh_optimizer})
    assert extra["step"] == 4
    steps(fresh_model, fresh_optimizer, comm, 4, 3)
    got = snapshot(fresh_model)
    for name, array in expected.items():
        assert np.array_equal(got[name], array), f"resumed run differs: {name}"
    assert fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]

    # a shard-only state (no consolidation) loads back on its own rank only
    shard = fresh_optimizer.state_dict()
    assert shard["zero_shard"] == {"rank": rank, "world_size": comm.Get_size()}
    fresh_optimizer.load_state_dict(shard)


if __name__ == "__main__":
    run(main)
