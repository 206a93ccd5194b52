"""Bad or disagreeing input on ONE rank makes EVERY rank raise the same
ValueError (never a hang; the test driver runs this under a timeout), and
leaves the layers' state unchanged."""
from contextlib import contextmanager

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


@contextmanager
def failing_stats(on_this_rank):
    """The kernels' statistics phase raises MemoryError on this rank."""
    from fastbn._backend import FastKernels
    original = FastKernels.__dict__["stats"]

    def failing(*args, **kwargs):
        raise MemoryError("simulated: no memory for the statistics")

    if on_this_rank:
        FastKernels.stats = staticmethod(failing)
    try:
        yield
    finally:
        FastKernels.stats = original


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
    # the statistics fail on the last rank after its checks passed (one
    # block, the default: the failure rides in the same Allgather as the
    # header, status 2): every rank raises the same ValueError
    with failing_stats(last):
        expect_same_error(comm, lambda: bn(good), "the forward failed on a rank",
                          f"rank {size - 1}: failed (MemoryError: simulated")
    if size > 1:
        # a rejected input on rank 0 and failed statistics on the last rank
        # in the same call: the input error wins, both ranks are named
        x = rng.standard_normal((3, C + 1 if rank == 0 else C, 2, 2)).astype(np.float32)
        with failing_stats(last):
            expect_same_error(comm, lambda: bn(x), f"rank 0: {C + 1} channels",
                              "rejected by this rank's checks",
                              f"rank {size - 1}: 4 channels, dtype float32, 4D input -- its "
                              f"statistics failed (MemoryError: simulated")
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
