"""Communicator defaults and the agreement checks every collective entry
point runs first.

Any object with mpi4py's communicator methods works as ``comm``
(``Get_rank``, ``Get_size``, ``Allgather``, ``Allgatherv``, ``Allreduce``,
``Bcast`` and the pickle-based ``allgather``, ``bcast``, ``gather``); None
means ``mpi4py.MPI.COMM_WORLD``.  mpi4py is imported only when that default is
needed, so single-process code never requires it.

In-place reductions pass ``in_place_marker(comm)`` as the send buffer:
mpi4py's ``MPI.IN_PLACE`` for an mpi4py communicator, and for any other
object the `IN_PLACE` sentinel of this module, which a stand-in communicator
recognizes (``send is IN_PLACE``: the receive buffer holds this rank's
input).  So a stand-in gets the same calls whether mpi4py is installed or
not, and telling the two apart imports nothing: an mpi4py communicator
exists only once ``mpi4py.MPI`` is in ``sys.modules``.

Why the checks: a collective that ranks enter with different buffer sizes,
or that one rank skips because it raised locally, hangs or corrupts memory.
So every entry point first exchanges a small fixed-size description of what
each rank is about to do; on a mismatch every rank raises the SAME
ValueError, built from the gathered descriptions.
"""
from __future__ import annotations

import sys
from typing import Any, List, Sequence

import numpy as np

__all__ = ["resolve_comm", "rank_and_size", "IN_PLACE", "in_place_marker", "DTYPE_CODES",
           "dtype_code", "dtype_name", "agree", "error_messages", "raise_on_disagreement",
           "gathered_counts", "check_total_count", "sum_in_rank_order"]

#: bytes of each rank's error message exchanged on a failure path
MESSAGE_BYTES = 240

#: small integer codes for the dtypes ranks exchange in metadata
DTYPE_CODES = {np.dtype(np.float32): 1, np.dtype(np.float64): 2, np.dtype(np.int64): 3}
_DTYPE_NAMES = {code: dtype.name for dtype, code in DTYPE_CODES.items()}


def resolve_comm(comm: Any = None) -> Any:
    """`comm`, or ``mpi4py.MPI.COMM_WORLD`` when None (imported here, lazily)."""
    if comm is not None:
        for method in ("Get_rank", "Get_size", "Allgather"):
            if not callable(getattr(comm, method, None)):
                raise TypeError(f"comm: expected an mpi4py communicator (with {method}()), "
                                f"got {type(comm).__name__}")
        return comm
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise ImportError("fastbn.distributed needs mpi4py for its default communicator: "
                          "pip install 'fastbn[mpi]' (mpi4py and an MPI library such as the "
                          "mpich wheel), or pass comm=") from error
    return MPI.COMM_WORLD


def rank_and_size(comm: Any) -> tuple:
    return int(comm.Get_rank()), int(comm.Get_size())


class _InPlace:
    """The type of `IN_PLACE` (one instance)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "fastbn.distributed.IN_PLACE"

    def __reduce__(self) -> str:
        return "IN_PLACE"  # pickles as this module's one instance


#: The send buffer of an in-place reduction as a stand-in (non-mpi4py)
#: communicator receives it: ``comm.Allreduce(IN_PLACE, buffer)`` means
#: "buffer holds this rank's input and receives the result".
IN_PLACE = _InPlace()


def in_place_marker(comm: Any) -> Any:
    """The send buffer that makes ``comm.Allreduce(marker, buffer)`` reduce
    in place.

    - A communicator class that sets ``fastbn_in_place`` (a stand-in, e.g. a
      test double: ``fastbn_in_place = IN_PLACE``) gets that value.
    - Otherwise, once mpi4py is imported, ``MPI.IN_PLACE``: mpi4py's own
      communicators, and wrappers that forward to one, need it.
    - Otherwise `IN_PLACE` (no mpi4py communicator can exist yet).

    Never imports mpi4py.  The attribute is looked up on the class, so a
    proxy whose ``__getattr__`` forwards to an mpi4py communicator is not
    mistaken for a stand-in."""
    declared = getattr(type(comm), "fastbn_in_place", None)
    if declared is not None:
        return declared
    MPI = sys.modules.get("mpi4py.MPI")
    return MPI.IN_PLACE if MPI is not None else IN_PLACE


def dtype_code(dtype: Any) -> int:
    """The exchange code of a dtype (0 for anything else)."""
    try:
        return DTYPE_CODES.get(np.dtype(dtype), 0)
    except TypeError:
        return 0


def dtype_name(code: float) -> str:
    return _DTYPE_NAMES.get(int(code), "other")


def agree(comm: Any, description: Sequence[float]) -> np.ndarray:
    """Allgather a fixed-length float64 description of this rank; returns
    the (size, len) table of every rank's, in rank order."""
    send = np.asarray(description, dtype=np.float64).ravel()
    table = np.empty((rank_and_size(comm)[1], send.size), dtype=np.float64)
    comm.Allgather(send, table)
    return table


def error_messages(comm: Any, error: BaseException = None) -> List[str]:
    """Every rank's error as one short line ("" for a rank without one), in
    rank order: one Allgather of `MESSAGE_BYTES` bytes per rank.  Only for a
    failure path that every rank takes (each has seen the same gathered
    status), so that the ValueError every rank raises can name the cause on
    the rank that failed."""
    text = "" if error is None else " ".join(f"{type(error).__name__}: {error}".split())
    data = text.encode("utf-8")
    if len(data) > MESSAGE_BYTES:
        data = data[:MESSAGE_BYTES - 3] + b"..."
    send = np.zeros(MESSAGE_BYTES, np.uint8)
    send[:len(data)] = np.frombuffer(data, np.uint8)
    table = np.empty((rank_and_size(comm)[1], MESSAGE_BYTES), np.uint8)
    comm.Allgather(send, table)
    # a character cut by the truncation is dropped, not an error
    return [bytes(row).rstrip(b"\0").decode("utf-8", "ignore") for row in table]


def with_cause(row: str, message: str) -> str:
    """`row`, then the rank's error message when it has one."""
    return f"{row} ({message})" if message else row


def raise_on_disagreement(what: str, rows: List[str], cause: BaseException = None) -> None:
    """The ValueError every rank raises, with the same message on every rank:
    `what` went wrong, then one line per rank."""
    message = what + "\n" + "\n".join(f"  rank {rank}: {row}" for rank, row in enumerate(rows))
    raise ValueError(message) from cause


def gathered_counts(header: np.ndarray, count_column: int = 4) -> np.ndarray:
    """Every rank's values per channel from a synchronized batch norm's
    gathered forward header (rows ``[status, channels, dtype code, ndim,
    count, planar]``), int64 in rank order.  ValueError, on every rank
    alike, when all ranks together hold fewer than 2 values per channel."""
    counts = header[:, count_column].astype(np.int64)
    check_total_count(counts.tolist())
    return counts


def check_total_count(counts: Sequence[int]) -> int:
    """The total of every rank's values per channel (ints, rank order);
    ValueError, on every rank alike, when it is under 2."""
    total = sum(counts)
    if total < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got "
                         f"{total} over all {len(counts)} ranks (per rank: "
                         f"{[int(c) for c in counts]})")
    return total


def sum_in_rank_order(rows: np.ndarray) -> np.ndarray:
    """The rows of a gathered table added in rank order, in float64 (the
    same bits on every rank, unlike an Allreduce)."""
    total = rows[0].copy()
    for row in rows[1:]:
        total += row
    return total
