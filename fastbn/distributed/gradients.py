"""Data parallelism over MPI: broadcast the initial state, allreduce the
gradients, and `DataParallel`, a module wrapper doing both.

Every function here is a collective: all ranks of `comm` must call it with
the same parameters (count, shapes, dtypes).  Each first exchanges a small
description of its arguments, so ranks that disagree all raise the same
ValueError rather than blocking in a collective.
"""
from __future__ import annotations

import zlib
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .._validation import check_int, describe
from ..nn.module import Module
from ..parameter import Parameter
from . import _comm

__all__ = ["broadcast_parameters", "broadcast_optimizer_state", "allreduce_gradients",
           "DataParallel"]

DEFAULT_BUCKET_BYTES = 25 * 2 ** 20


# section: helpers ------------------------------------------------------------


def _named_parameters(module_or_params: Union[Module, Iterable[Parameter]], name: str
                      ) -> List[Tuple[str, Parameter]]:
    if isinstance(module_or_params, Module):
        return list(module_or_params.named_parameters())
    if isinstance(module_or_params, (Parameter, np.ndarray)) or not hasattr(module_or_params,
                                                                          "__iter__"):
        raise TypeError(f"{name}: expected a fastbn.nn.Module or an iterable of Parameters, "
                        f"got {describe(module_or_params)}")
    pairs = []
    for index, param in enumerate(module_or_params):
        if not isinstance(param, Parameter):
            raise TypeError(f"{name}[{index}]: expected a fastbn.Parameter, got {describe(param)}")
        pairs.append((f"params[{index}]", param))
    return pairs


def _synchronized_parameters(module_or_params) -> set:
    """ids of parameters whose gradients SyncBatchNorm already summed over
    all ranks (identical everywhere): they are scaled, not allreduced."""
    if not isinstance(module_or_params, Module):
        return set()
    from ..nn.syncbatchnorm import SyncBatchNorm
    return {id(param) for layer in module_or_params.modules() if isinstance(layer, SyncBatchNorm)
            for param in (layer.weight, layer.bias) if param is not None}


def _check_root(root: Any, size: int) -> int:
    root = check_int(root, "root", minimum=0)
    if root >= size:
        raise ValueError(f"root: expected a rank in [0, {size}), got {root}")
    return root


def _signature(entries: Sequence[Tuple[str, np.ndarray]]) -> List[Tuple[str, Tuple[int, ...], str]]:
    return [(name, tuple(array.shape), array.dtype.str) for name, array in entries]


def _first_difference(mine: list, reference: list) -> str:
    if len(mine) != len(reference):
        return f"{len(mine)} arrays (rank 0 has {len(reference)})"
    for (name, shape, dtype), (_, ref_shape, ref_dtype) in zip(mine, reference):
        if (shape, dtype) != (ref_shape, ref_dtype):
            return (f"{name} has shape {shape} and dtype {np.dtype(dtype)} (rank 0: shape "
                    f"{ref_shape}, dtype {np.dtype(ref_dtype)})")
    return "same as rank 0"


def _agree_on_signature(comm, what: str, signature: list, local_error: str = "") -> None:
    """One allgather (pickled, small) of every rank's signature; the same
    ValueError everywhere when they differ or one rank reported an error."""
    gathered = comm.allgather((signature, local_error))
    reference = gathered[0][0]
    if all(sig == reference and not error for sig, error in gathered):
        return
    rows = [error or _first_difference(sig, reference) for sig, error in gathered]
    _comm.raise_on_disagreement(f"{what}: the ranks' arguments disagree or are invalid:", rows)


def _by_dtype(entries: Sequence[Tuple[str, np.ndarray]]) -> "OrderedDict[str, list]":
    groups: "OrderedDict[str, list]" = OrderedDict()
    for name, array in entries:
        groups.setdefault(array.dtype.str, []).append(array)
    return groups


# section: broadcasts -----------------------------------------------------------


def broadcast_parameters(module_or_params: Union[Module, Iterable[Parameter]], root: int = 0,
                         comm: Any = None) -> None:
    """Copy the parameters (and, for a module, its buffers) of rank `root`
    into every other rank's, in place: identical models before training.

    One small allgather checks the ranks hold the same arrays (names, shapes,
    dtypes), then one Bcast per dtype of a flat buffer.

    Parameters
    ----------
    module_or_params : fastbn.nn.Module or iterable of Parameter
        IN on `root`, OUT elsewhere (``param.data`` and buffers overwritten).
    root : int
        The rank whose values are kept.
    comm : mpi4py communicator or None
        None means ``MPI.COMM_WORLD``.

    Raises
    ------
    ValueError
        On every rank, when the ranks' arrays differ in number, shape or
        dtype, or a rank's target array is read-only.
    """
    comm = _comm.resolve_comm(comm)
    rank, size = _comm.rank_and_size(comm)
    root = _check_root(root, size)
    entries = [(name, param.data) for name, param in
               _named_parameters(module_or_params, "module_or_params")]
    if isinstance(module_or_params, Module):
        entries += list(module_or_params.named_buffers())
    error = ""
    if rank != root:
        read_only = [name for name, array in entries if not array.flags.writeable]
        if read_only:
            error = f"read-only arrays {read_only} cannot receive the broadcast"
    _agree_on_signature(comm, "broadcast_parameters", _signature(entries), error)
    for arrays in _by_dtype(entries).values():
        if rank == root:
            flat = np.concatenate([array.ravel() for array in arrays])
        else:
            flat = np.empty(sum(array.size for array in arrays), arrays[0].dtype)
        comm.Bcast(flat, root=root)
        if rank != root:
            offset = 0
            for array in arrays:
                np.copyto(array, flat[offset:offset + array.size].reshape(array.shape))
                offset += array.size


def broadcast_optimizer_state(optimizer: Any, root: int = 0, comm: Any = None) -> None:
    """Load rank `root`'s optimizer state (``state_dict()``: hyperparameters
    and per-parameter state) into every other rank's optimizer.

    Parameters
    ----------
    optimizer : fastbn.optim.Optimizer
        IN on `root`, OUT elsewhere.  Same parameter groups, counts, shapes
        and dtypes on every rank.
    root : int
    comm : mpi4py communicator or None

    Raises
    ------
    ValueError
        On every rank, when the ranks' optimizers have different groups or
        parameters.
    """
    comm = _comm.resolve_comm(comm)
    rank, size = _comm.rank_and_size(comm)
    root = _check_root(root, size)
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list) or not callable(getattr(optimizer, "state_dict", None)):
        raise TypeError(f"optimizer: expected a fastbn.optim optimizer, got {describe(optimizer)}")
    entries = [(f"param_groups[{g}]['params'][{p}]", param.data)
               for g, group in enumerate(groups) for p, param in enumerate(group["params"])]
    signature = [("groups", (len(groups),), "|b1")] + _signature(entries)
    _agree_on_signature(comm, "broadcast_optimizer_state", signature)
    state = comm.bcast(optimizer.state_dict() if rank == root else None, root=root)
    if rank != root:
        optimizer.load_state_dict(state)


# section: gradients ---------------------------------------------------------------


def _gradient_entries(module_or_params) -> Tuple[list, list, str]:
    """(allreduced [(name, param)], synchronized [(name, param)], local error)."""
    pairs = _named_parameters(module_or_params, "params")
    synchronized = _synchronized_parameters(module_or_params)
    reduced, scaled, problems = [], [], []
    for name, param in pairs:
        grad = param.grad
        if grad is None:
            continue
        if not isinstance(grad, np.ndarray) or grad.shape != param.data.shape \
                or grad.dtype != param.data.dtype or not grad.flags.writeable:
            problems.append(name)
            continue
        (scaled if id(param) in synchronized else reduced).append((name, param))
    error = f"invalid gradients (not a writeable array of the parameter's shape and dtype): " \
            f"{problems}" if problems else ""
    return reduced, scaled, error


def _buckets(params: Sequence[Tuple[str, Parameter]], bucket_bytes: int) -> List[List[Parameter]]:
    """Consecutive parameters of one dtype, up to `bucket_bytes` per bucket
    (a larger gradient gets a bucket of its own)."""
    buckets: List[List[Parameter]] = []
    by_dtype: "OrderedDict[str, List[Parameter]]" = OrderedDict()
    for _, param in params:
        by_dtype.setdefault(param.grad.dtype.str, []).append(param)
    for group in by_dtype.values():
        current: List[Parameter] = []
        current_bytes = 0
        for param in group:
            nbytes = param.grad.nbytes
            if current and current_bytes + nbytes > bucket_bytes:
                buckets.append(current)
                current, current_bytes = [], 0
            current.append(param)
            current_bytes += nbytes
        if current:
            buckets.append(current)
    return buckets


def allreduce_gradients(params: Union[Module, Iterable[Parameter]], comm: Any = None, *,
                        average: bool = True, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
    """Sum (or average) every parameter's ``grad`` over the ranks, in place.

    Gradients are packed into flat buckets of one dtype and at most
    `bucket_bytes` bytes, in parameter order; one in-place Allreduce per
    bucket (a bucket of one C-contiguous gradient is reduced in that array,
    without packing), and the mean is taken while copying back.  Parameters
    whose ``grad`` is None on every rank are skipped.  On one rank nothing is
    communicated (the sum over one rank is the gradient itself).

    Given a module, the weight and bias of its `SyncBatchNorm` layers are
    not allreduced: their gradients are already the sums over all ranks, so
    they are only divided by the number of ranks when `average` (keeping
    every gradient the gradient of the same objective).  Given a plain list
    of parameters, every gradient is allreduced.

    Parameters
    ----------
    params : fastbn.nn.Module or iterable of Parameter
        IN/OUT: the gradients are replaced by their sum or mean over ranks.
    comm : mpi4py communicator or None
        None means ``MPI.COMM_WORLD``.
    average : bool, keyword-only
        Divide the sums by the number of ranks.
    bucket_bytes : int, keyword-only
        Largest bucket (>= 1 byte).

    Raises
    ------
    ValueError
        On every rank, when the ranks' parameters (count, shapes, dtypes,
        which have a gradient) differ, or a rank's gradient is invalid; no
        gradient is changed then (these checks come before any reduction).
        An MPI error during the reductions themselves is not caught: the
        buckets reduced before it keep their new values.
    """
    comm = _comm.resolve_comm(comm)
    if not isinstance(average, (bool, np.bool_)):
        raise TypeError(f"average: expected a bool, got {describe(average)}")
    bucket_bytes = check_int(bucket_bytes, "bucket_bytes", minimum=1)
    _allreduce(params, comm, average, bucket_bytes, None)


class _BucketBuffers:
    """The flat buffers of `DataParallel`'s buckets, kept from step to step:
    a fresh multi-MiB array per step costs its page faults (first touch)
    every time.  Only the bucket sizes are remembered (gradients are packed
    into them every call), so parameters and gradient arrays may change
    freely between calls: a buffer of another size or dtype is replaced,
    and buffers of buckets that no longer need one are dropped."""

    def __init__(self) -> None:
        self.flats: Dict[int, np.ndarray] = {}

    def get(self, index: int, dtype: np.dtype, size: int) -> np.ndarray:
        """The buffer of bucket `index` (a new one if it has another size or
        dtype)."""
        flat = self.flats.get(index)
        if flat is None or flat.dtype != dtype or flat.size != size:
            flat = self.flats[index] = np.empty(size, dtype)
        return flat

    def keep_only(self, indices: set) -> None:
        """Drop the buffers of the other buckets."""
        for index in [i for i in self.flats if i not in indices]:
            del self.flats[index]


def _allreduce(params, comm, average: bool, bucket_bytes: int,
               buffers: "Optional[_BucketBuffers]") -> None:
    """`allreduce_gradients` after its argument checks; `buffers` keeps the
    flat bucket arrays between calls (None: fresh ones)."""
    size = _comm.rank_and_size(comm)[1]
    reduced, scaled, error = _gradient_entries(params)
    signature = [(name, tuple(param.grad.shape), param.grad.dtype.str) for name, param in reduced]
    signature += [("synchronized " + name, tuple(param.grad.shape), param.grad.dtype.str)
                  for name, param in scaled]
    # the full signature is hashed: this runs every step, so it costs one
    # 3-number allgather, and names only the rank that differs
    digest = zlib.crc32(repr(signature).encode())
    table = _comm.agree(comm, [len(signature), digest, 1.0 if error else 0.0])
    if table[:, 2].any() or not (table[:, :2] == table[0, :2]).all():
        messages = _comm.error_messages(comm, ValueError(error) if error else None)
        rows = [_comm.with_cause(f"{int(row[0])} gradients, signature {int(row[1]):#010x}"
                                 + (" and invalid gradients on this rank" if row[2] else ""),
                                 message) for row, message in zip(table, messages)]
        cause = ValueError(error) if error else None
        _comm.raise_on_disagreement(
            "allreduce_gradients: the ranks' gradients differ in number, names, shapes or "
            "dtypes, or are invalid:", rows, cause)
    if size == 1:
        return
    in_place = _comm.in_place_marker(comm)
    packed = set()
    for index, bucket in enumerate(_buckets(reduced, bucket_bytes)):
        grads = [param.grad for param in bucket]
        if len(grads) == 1 and grads[0].flags.c_contiguous:
            # the same count and so the same MPI algorithm (and bits) as a
            # packed bucket of that one gradient
            grad = grads[0]
            comm.Allreduce(in_place, grad)
            if average:
                np.divide(grad, size, out=grad)
            continue
        count = sum(grad.size for grad in grads)
        packed.add(index)
        flat = np.empty(count, grads[0].dtype) if buffers is None else \
            buffers.get(index, grads[0].dtype, count)
        offset = 0
        for grad in grads:
            np.copyto(flat[offset:offset + grad.size].reshape(grad.shape), grad)
            offset += grad.size
        comm.Allreduce(in_place, flat)
        offset = 0
        for grad in grads:
            part = flat[offset:offset + grad.size].reshape(grad.shape)
            if average:
                # divided while copied back: one pass over the bucket, and
                # the bits of dividing the whole sum
                np.divide(part, size, out=grad)
            else:
                np.copyto(grad, part)
            offset += grad.size
    if buffers is not None:
        buffers.keep_only(packed)
    if average:
        for _, param in scaled:
            param.grad /= size


# section: the module wrapper --------------------------------------------------------


class DataParallel(Module):
    """Data-parallel training of `module` over the ranks of `comm`.

    Construction broadcasts rank 0's parameters and buffers to every rank
    (collective).  ``forward`` is the module's; ``backward(dy)`` runs the
    module's backward, then `allreduce_gradients` (averaged over ranks, so
    with equal per-rank batches and a mean loss the gradients equal one
    process's on the whole batch).  The gradients are packed into flat
    bucket arrays kept from step to step (about as much memory as the
    gradients; a fresh multi-MiB array per step would pay its page faults
    every step).  The allreduce runs after the whole backward (no overlap:
    with MPICH's default progress model, a pending nonblocking allreduce
    only advances inside MPI calls, and on CPU its copies and sums take the
    cores the backward uses).

    State dict keys are the module's, prefixed with ``module.`` (torch's
    DistributedDataParallel convention).

    Parameters
    ----------
    module : fastbn.nn.Module
        Same architecture on every rank.
    comm : mpi4py communicator or None
        None means ``MPI.COMM_WORLD``.
    bucket_bytes : int, keyword-only
        As in `allreduce_gradients`.
    """

    def __init__(self, module: Module, comm: Any = None, *,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        super().__init__()
        if not isinstance(module, Module):
            raise TypeError(f"module: expected a fastbn.nn.Module, got {describe(module)}")
        comm = _comm.resolve_comm(comm)
        self.bucket_bytes = check_int(bucket_bytes, "bucket_bytes", minimum=1)
        self.module = module
        object.__setattr__(self, "comm", comm)
        object.__setattr__(self, "_bucket_buffers", _BucketBuffers())
        broadcast_parameters(module, root=0, comm=comm)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, dy):
        """The module's backward, then the gradients averaged over ranks
        (collective)."""
        dx = self.module.backward(dy)
        _allreduce(self.module, self.comm, True, self.bucket_bytes, self._bucket_buffers)
        return dx
