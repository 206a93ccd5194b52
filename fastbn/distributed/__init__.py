"""Distributed training over MPI (mpi4py): broadcast the initial state,
average gradients, a data-parallel module wrapper and a sharded optimizer.
`fastbn.nn.SyncBatchNorm` synchronizes batch statistics.

Install with ``pip install "fastbn[mpi]"`` (mpi4py and the mpich wheel), run
with ``mpiexec -n 2 python train.py``.  Nothing here imports mpi4py until a
communicator is needed and none was given (the default is
``mpi4py.MPI.COMM_WORLD``).  Every function is a collective: all ranks call
it, with the same parameters; disagreements raise the same ValueError on
every rank instead of hanging.

A stand-in communicator (any object with mpi4py's communicator methods, for
tests or a custom transport) receives in-place reductions as
``Allreduce(IN_PLACE, buffer)``: `IN_PLACE` is this package's sentinel,
used wherever mpi4py's ``MPI.IN_PLACE`` would be for an mpi4py communicator.
"""
from ._comm import IN_PLACE
from .gradients import (DataParallel, allreduce_gradients, broadcast_optimizer_state,
                        broadcast_parameters)
from .zero import ZeroRedundancyOptimizer

__all__ = ["IN_PLACE", "broadcast_parameters", "broadcast_optimizer_state",
           "allreduce_gradients", "DataParallel", "ZeroRedundancyOptimizer"]
