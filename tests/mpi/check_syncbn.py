"""SyncBatchNorm on P ranks == BatchNorm on the concatenated batch in one
process (outputs, dx, dweight, dbias, running statistics), for float32 and
float64, channels-first and channels-last, input ranks 2 to 5, uneven
per-rank batches including a rank with a batch of 1; bitwise identical run
to run; identical weight/bias gradients on every rank."""
import numpy as np

import fastbn
from fastbn import nn

from _harness import run, tolerance

LAYERS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
SPATIAL = {2: (), 3: (5,), 4: (3, 4), 5: (2, 3, 2)}
CHANNELS = 3


def per_rank_batches(size):
    # uneven, with a rank holding a single sample (rank 1 when there are 2+ ranks)
    sizes = [3, 1, 4, 2, 5]
    return [sizes[r % len(sizes)] for r in range(size)]


def one_case(comm, dtype, axis, ndim, momentum, seed):
    rank, size = comm.Get_rank(), comm.Get_size()
    batches = per_rank_batches(size)
    total = sum(batches)
    rng = np.random.default_rng(seed)
    shape = (total, CHANNELS) + SPATIAL[ndim]
    x_full = (rng.standard_normal(shape) * 2.0 + 5.0).astype(dtype)
    dy_full = rng.standard_normal(shape).astype(dtype)
    if axis == -1:
        x_full = np.ascontiguousarray(np.moveaxis(x_full, 1, -1))
        dy_full = np.ascontiguousarray(np.moveaxis(dy_full, 1, -1))
    weight = rng.uniform(0.5, 1.5, CHANNELS).astype(dtype)
    bias = rng.standard_normal(CHANNELS).astype(dtype)
    start = sum(batches[:rank])
    stop = start + batches[rank]

    full = LAYERS[ndim](CHANNELS, momentum=momentum, axis=axis, dtype=dtype)
    sync = nn.SyncBatchNorm(CHANNELS, momentum=momentum, axis=axis, comm=comm, dtype=dtype)
    for layer in (full, sync):
        layer.weight.data[...] = weight
        layer.bias.data[...] = bias
    results = []
    for step in range(2):   # the second step checks the running statistics' update
        y_expected = full(x_full)
        dx_expected = full.backward(dy_full)
        y = sync(x_full[start:stop])
        dx = sync.backward(dy_full[start:stop])
        tol = tolerance(dtype)
        where = f"dtype={np.dtype(dtype)}, axis={axis}, ndim={ndim}, momentum={momentum}, step={step}"
        for name, got, want in (("y", y, y_expected[start:stop]), ("dx", dx, dx_expected[start:stop]),
                                ("weight.grad", sync.weight.grad, full.weight.grad),
                                ("bias.grad", sync.bias.grad, full.bias.grad),
                                ("running_mean", sync.running_mean, full.running_mean),
                                ("running_var", sync.running_var, full.running_var)):
            assert got.dtype == np.dtype(dtype), (name, got.dtype, where)
            np.testing.assert_allclose(got, want, err_msg=f"{name}: {where}", **tol)
        assert int(sync.num_batches_tracked) == int(full.num_batches_tracked) == step + 1
        results.append((y, dx, sync.weight.grad.copy(), sync.bias.grad.copy(),
                        sync.running_mean.copy(), sync.running_var.copy()))
    # every rank holds the same parameter gradients and running statistics, bit for bit
    for array in results[-1][2:]:
        gathered = comm.allgather(array)
        assert all(np.array_equal(g, gathered[0]) for g in gathered), where
    return results


def main(comm):
    for dtype in (np.float32, np.float64):
        for axis in (1, -1):
            for ndim in (2, 3, 4, 5):
                for momentum in (0.1, None):
                    seed = 1000 * ndim + (axis == -1) * 10 + (dtype == np.float64)
                    first = one_case(comm, dtype, axis, ndim, momentum, seed)
                    again = one_case(comm, dtype, axis, ndim, momentum, seed)
                    for a, b in zip(first, again):
                        for u, v in zip(a, b):
                            assert np.array_equal(u, v), "not bitwise deterministic run to run"
    # the NumPy reference backend goes through the same code path
    with fastbn.use_backend("reference"):
        one_case(comm, np.float64, 1, 4, 0.1, 7)
    # eval mode uses the running statistics and communicates nothing: a
    # single rank may call it alone
    sync = nn.SyncBatchNorm(CHANNELS, comm=comm).eval()
    if comm.Get_rank() == 0:
        x = np.ones((2, CHANNELS), np.float32)
        np.testing.assert_allclose(sync(x), x / np.sqrt(1 + 1e-5), rtol=1e-6)
        sync.backward(np.ones_like(x))


if __name__ == "__main__":
    run(main)
