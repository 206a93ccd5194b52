"""A 1-rank stand-in communicator for SyncBatchNorm tests that run without
mpi4py or mpiexec: its Allgather copies this rank's row into the table."""
from __future__ import annotations

import numpy as np


class OneRankComm:
    """Get_rank, Get_size and Allgather of a communicator of one rank."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def Allgather(self, send, recv):
        recv[...] = np.asarray(send).reshape(recv.shape)
