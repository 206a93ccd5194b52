"""Bad or disagreeing input on ONE rank makes EVERY rank raise the same
ValueError (never a hang; the test driver runs this under a timeout), and
leaves the layers' state unchanged."""
import numpy as np

import fastbn
from fastbn import nn
from fastbn.distributed import (ZeroRedundancyOptimizer, allreduce_gradients,
                                broadcast_parameters)

from _harness import run


def expect_same_error(comm, action, *fragments):
    try:
        action()
    except ValueError as error:
        message = str(error)
    else:
        message = None
    messages = comm.allgather(message)
    assert messages[0] is not None, f"no ValueError raised (expected {fragments})"
    assert all(m == messages[0] for m in messages), f"messages differ between ranks: {messages}"
    for fragment in fragments:
        assert fragment in messages[0], (fragment, messages[0])


def main(comm):
    rank, size = comm.Get_rank(), comm.Get_size()
    last = rank == size - 1
    rng = np.random.default_rng(rank)
    C = 4

    bn = nn.SyncBatchNorm(C, comm=comm)
    good = rng.standard_normal((3, C, 2, 2)).astype(np.float32)
    bn(good)                      # the layers agree: a first call succeeds
    before = [a.copy() for a in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]

    # channels disagree on the last rank
    x = rng.standard_normal((3, C + 1 if last else C, 2, 2)).astype(np.float32)
    expect_same_error(comm, lambda: bn(x), "channels", f"rank {size - 1}: {C + 1} channels")
    # dtype disagrees on the last rank
    x = good.astype(np.float64) if last else good
    # every rank's message names the cause on the rank that failed
    expect_same_error(comm, lambda: bn(x), "float64", "rejected",
                      f"rank {size - 1}: 4 channels, dtype float64, 4D input -- rejected by this "
                      f"rank's checks (TypeError: ")
    # fewer than 2 values per channel over all ranks
    x = good[:1] if rank == 0 else good[:0]
    expect_same_error(comm, lambda: bn(x[:, :, :1, :1]), "more than 1 value per channel")
    for array, old in zip((bn.running_mean, bn.running_var, bn.num_batches_tracked), before):
        assert np.array_equal(array, old), "a failed call changed the running statistics"

    # backward with a wrong dy on the last rank
    bn(good)
    dy = np.ones((3, C, 2, 3) if last else good.shape, np.float32)
    expect_same_error(comm, lambda: bn.backward(dy), "dy",
                      f"rank {size - 1}: dy or the layer's state rejected by this rank's checks, "
                      f"or its backward failed (ValueError: dy: ")
    assert bn.weight.grad is None and bn.bias.grad is None
    bn.backward(np.ones_like(good))   # still in step: a correct call works

    if size > 1:
        # layers built differently
        odd = nn.SyncBatchNorm(C + 1 if last else C, comm=comm)
        x = rng.standard_normal((3, C + 1 if last else C)).astype(np.float32)
        expect_same_error(comm, lambda: odd(x), "layers differ", f"num_features={C + 1}")
        # parameters of different shapes
        params = [fastbn.Parameter(np.zeros((2, 3 + last), np.float32))]
        params[0].grad = np.ones_like(params[0].data)
        expect_same_error(comm, lambda: allreduce_gradients(params, comm), "gradients differ")
        expect_same_error(comm, lambda: broadcast_parameters(params, comm=comm),
                          f"rank {size - 1}: params[0] has shape (2, 4)")
        expect_same_error(comm, lambda: ZeroRedundancyOptimizer(params, fastbn.optim.Adam,
                                                                comm=comm, lr=0.1),
                          "ZeroRedundancyOptimizer")
    # a gradient of the wrong shape on the last rank
    param = fastbn.Parameter(np.zeros(3))
    param.grad = np.ones(2) if last else np.ones(3)
    expect_same_error(comm, lambda: allreduce_gradients([param], comm), "allreduce_gradients",
                      f"rank {size - 1}: 0 gradients, signature",
                      "invalid gradients on this rank (ValueError: invalid gradients (not a "
                      "writeable array of the parameter's shape and dtype): ['params[0]'])")
    assert np.array_equal(param.grad, np.ones(2) if last else np.ones(3))


if __name__ == "__main__":
    run(main)
