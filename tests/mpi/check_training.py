"""Data-parallel training on P ranks, each holding 1/P of every batch, with
DataParallel + SyncBatchNorm + Adam (and with ZeroRedundancyOptimizer(Adam))
gives the parameters and running statistics of one process training on the
full batches."""
import numpy as np

import fastbn
from fastbn import nn
from fastbn.demo.data import load_dataset
from fastbn.distributed import DataParallel, ZeroRedundancyOptimizer

from _harness import run

STEPS = 12
GLOBAL_BATCH = 60      # divisible by 1..5 ranks


def build(dtype, seed):
    rng = np.random.default_rng(seed)
    # no bias before a BatchNorm: its gradient is zero up to rounding, and
    # Adam would turn that rounding noise into full-size steps
    return nn.Sequential(
        nn.Linear(64, 48, False, rng=rng, dtype=dtype), nn.BatchNorm1d(48, dtype=dtype), nn.ReLU(),
        nn.Linear(48, 32, False, rng=rng, dtype=dtype), nn.BatchNorm1d(32, dtype=dtype), nn.ReLU(),
        nn.Linear(32, 10, rng=rng, dtype=dtype))


def train(model, optimizer, data, rows):
    criterion = nn.CrossEntropyLoss()
    order = np.random.default_rng(1)
    for _ in range(STEPS):
        batch = order.choice(len(data.y_train), GLOBAL_BATCH, replace=False)[rows]
        criterion(model(data.x_train[batch]), data.y_train[batch])
        optimizer.zero_grad()
        model.backward(criterion.backward())
        optimizer.step()
    return {name: array.copy() for name, array in model.state_dict().items()}


def main(comm):
    rank, size = comm.Get_rank(), comm.Get_size()
    share = GLOBAL_BATCH // size
    mine = slice(rank * share, (rank + 1) * share)
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-5)):
        data = load_dataset("generated", seed=0, dtype=dtype)
        single = build(dtype, seed=0)
        expected = train(single, fastbn.optim.Adam(single.parameters(), lr=1e-2), data,
                         slice(None))
        results = {}
        for variant in ("adam", "zero"):
            # rank-dependent initial values: DataParallel broadcasts rank 0's
            local = nn.SyncBatchNorm.convert_sync_batchnorm(build(dtype, seed=rank), comm)
            assert sum(isinstance(m, nn.SyncBatchNorm) for m in local.modules()) == 2
            model = DataParallel(local, comm)
            if variant == "adam":
                optimizer = fastbn.optim.Adam(model.parameters(), lr=1e-2)
            else:
                optimizer = ZeroRedundancyOptimizer(model.parameters(), fastbn.optim.Adam,
                                                    comm=comm, lr=1e-2)
            got = train(model, optimizer, data, mine)
            results[variant] = got
            assert list(got) == ["module." + name for name in expected]
            for name, want in expected.items():
                np.testing.assert_allclose(got["module." + name], want, rtol=tol, atol=tol,
                                           err_msg=f"{variant} {np.dtype(dtype)} {name}")
            # every rank ends with the same model, bit for bit
            for name, array in got.items():
                gathered = comm.allgather(array)
                assert all(np.array_equal(g, gathered[0]) for g in gathered), (variant, name)
        # the sharded optimizer computes the same updates as the plain one
        for name, array in results["adam"].items():
            assert np.array_equal(array, results["zero"][name]), f"zero != adam: {name}"


if __name__ == "__main__":
    run(main)
