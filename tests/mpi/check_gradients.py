"""allreduce_gradients and DataParallel's persistent buckets give the bits
of the plain packing (concatenate each bucket, Allreduce into a new array,
divide, copy back), for every bucket layout, dtype and stride; and a
rank's invalid gradient makes every rank raise with no gradient changed."""
import numpy as np

import fastbn
from fastbn import nn
from fastbn.distributed import DataParallel, allreduce_gradients
from fastbn.distributed import _comm
from fastbn.distributed.gradients import _allreduce, _buckets

from _harness import run


def packed_reference(comm, grads, average, bucket_bytes):
    """The plain packing, on copies: {index: reduced gradient}."""
    params = []
    for index, grad in enumerate(grads):
        param = fastbn.Parameter(np.zeros(grad.shape, grad.dtype))
        param.grad = grad.copy()
        params.append((f"params[{index}]", param))
    for bucket in _buckets(params, bucket_bytes):
        flat = np.concatenate([param.grad.ravel() for param in bucket])
        total = np.empty_like(flat)
        comm.Allreduce(flat, total)
        if average and comm.Get_size() > 1:
            total /= comm.Get_size()
        offset = 0
        for param in bucket:
            param.grad[...] = total[offset:offset + param.grad.size].reshape(param.grad.shape)
            offset += param.grad.size
    return [param.grad for _, param in params]


def main(comm):
    from mpi4py import MPI
    # an mpi4py communicator gets mpi4py's in-place marker, not the stand-in
    # communicators' sentinel
    assert _comm.in_place_marker(comm) is MPI.IN_PLACE
    rank, size = comm.Get_rank(), comm.Get_size()
    rng = np.random.default_rng(10 + rank)
    shapes = [((7, 5), np.float32), ((300,), np.float32), ((4,), np.float64), ((33, 3), np.float32),
              ((2, 9), np.float64), ((1,), np.float32)]
    for bucket_bytes in (1, 64, 1000, 1 << 20):
        for average in (True, False):
            for strided in (False, True):
                params = [fastbn.Parameter(np.zeros(shape, dtype)) for shape, dtype in shapes]
                for param in params:
                    values = rng.standard_normal(param.data.shape) * 10.0 ** rng.integers(-3, 4)
                    if strided:
                        wide = np.zeros(param.data.shape[:-1] + (2 * param.data.shape[-1],),
                                        param.data.dtype)
                        param.grad = wide[..., ::2]
                        param.grad[...] = values
                    else:
                        param.grad = values.astype(param.data.dtype)
                want = packed_reference(comm, [p.grad for p in params], average, bucket_bytes)
                allreduce_gradients(params, comm, average=average, bucket_bytes=bucket_bytes)
                for index, (param, expected) in enumerate(zip(params, want)):
                    assert np.array_equal(param.grad, expected), (bucket_bytes, average, strided,
                                                                  index)

    # DataParallel: the same bits as the plain packing step after step, with
    # gradients replaced by new arrays, and after the buckets change
    model = DataParallel(nn.Sequential(nn.Linear(6, 5, rng=rng), nn.ReLU(), nn.Linear(5, 3, rng=rng)),
                         comm)
    for step in range(4):
        if step == 2:
            model.bucket_bytes = 4 * 30
        x = rng.standard_normal((4, 6)).astype(np.float32)
        for param in model.parameters():
            param.grad = None
        model(x)
        model.module.backward(rng.standard_normal((4, 3)).astype(np.float32))
        local = [param.grad.copy() for param in model.parameters()]
        want = packed_reference(comm, local, True, model.bucket_bytes)
        for param, grad in zip(model.parameters(), local):
            param.grad = grad
        _allreduce(model.module, comm, True, model.bucket_bytes, model._bucket_buffers)
        for param, expected in zip(model.parameters(), want):
            assert np.array_equal(param.grad, expected), step

    # an invalid gradient on the last rank: every rank raises, nothing changes
    for param in model.parameters():
        param.grad = rng.standard_normal(param.data.shape).astype(np.float32)
    if rank == size - 1:
        model.module[2].bias.grad = np.ones(4, np.float32)
    before = [param.grad.copy() for param in model.parameters()]
    try:
        allreduce_gradients(model.module, comm)
    except ValueError as error:
        message = str(error)
    else:
        message = None
    assert message is not None and "allreduce_gradients" in message
    assert all(np.array_equal(p.grad, b) for p, b in zip(model.parameters(), before))


if __name__ == "__main__":
    run(main)
