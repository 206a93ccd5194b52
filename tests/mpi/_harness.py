"""Shared by the scripts tests/test_distributed.py launches under mpiexec:
run `main(comm)`, and on failure print the failing rank's traceback and
abort every rank (a rank left waiting in a collective would hang the run)."""
import sys
import traceback

import numpy as np
from mpi4py import MPI


def run(main) -> None:
    comm = MPI.COMM_WORLD
    try:
        main(comm)
    except BaseException:
        sys.stderr.write(f"--- rank {comm.Get_rank()} of {comm.Get_size()} failed:\n"
                         + traceback.format_exc())
        sys.stderr.flush()
        comm.Abort(1)
    comm.Barrier()
    if comm.Get_rank() == 0:
        print(f"ok: {sys.argv[0]} on {comm.Get_size()} ranks")


def tolerance(dtype) -> dict:
    """Full-batch vs synchronized: float32 to 1e-5, float64 to 1e-12."""
    return dict(rtol=1e-5, atol=1e-5) if np.dtype(dtype) == np.float32 else \
        dict(rtol=1e-12, atol=1e-12)


def split_sizes(comm, total_sizes):
    """This rank's [start, stop) of a batch split as `total_sizes` (one per rank)."""
    rank = comm.Get_rank()
    start = int(sum(total_sizes[:rank]))
    return start, start + int(total_sizes[rank])
