"""`ZeroRedundancyOptimizer`: the optimizer state is sharded over the ranks
(torch's name and meaning; ZeRO stage 1).

Each parameter is owned by one rank (greedy by size: largest first, to the
least-loaded rank, ties to the lowest rank, so every rank computes the same
assignment).  A rank keeps optimizer state only for the parameters it owns,
``step()`` updates only those, then one Allgatherv per dtype hands every
rank the new values of all parameters.  The gradients must already be the
same on every rank (`allreduce_gradients` / `DataParallel`).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional

import numpy as np

from .._validation import check_int, describe
from ..parameter import Parameter
from . import _comm
from .gradients import _agree_on_signature

__all__ = ["ZeroRedundancyOptimizer"]

_SHARD_KEY = "zero_shard"


def _as_groups(params: Iterable) -> List[Dict[str, Any]]:
    if isinstance(params, (Parameter, np.ndarray, dict)):
        raise TypeError("params: expected an iterable of Parameters or of dicts (param groups), "
                        f"got {describe(params)}")
    groups = list(params)
    if not groups:
        raise ValueError("params: expected at least one Parameter, got an empty list")
    if not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    checked = []
    for index, group in enumerate(groups):
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"params[{index}]: expected a dict with a 'params' entry, "
                            f"got {describe(group)}")
        members = group["params"]
        members = [members] if isinstance(members, Parameter) else list(members)
        for position, param in enumerate(members):
            if not isinstance(param, Parameter):
                raise TypeError(f"param_groups[{index}]['params'][{position}]: expected a "
                                f"fastbn.Parameter, got {describe(param)}")
        checked.append(dict(group, params=members))
    return checked


def assign_owners(sizes: List[int], world_size: int) -> List[int]:
    """The owning rank of each parameter: largest first, each to the rank
    with the fewest elements so far (ties: lowest rank, then lowest index)."""
    loads = [0] * world_size
    owners = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += sizes[index]
    return owners


class ZeroRedundancyOptimizer:
    """Wrap `optimizer_class` so each rank keeps and updates the state of
    its own shard of the parameters (collective: every rank constructs it
    with the same parameters).

    Parameters
    ----------
    params : iterable of Parameter, or of dicts (param groups)
        ALL the model's parameters, the same on every rank.
    optimizer_class : type
        A fastbn.optim optimizer class (Adam, SGD, ...).
    comm : mpi4py communicator or None
        None means ``MPI.COMM_WORLD``.
    **defaults
        The optimizer's hyperparameters (``lr=...``).

    Attributes
    ----------
    param_groups : list of dict
        Every group with all its parameters; change hyperparameters here (a
        scheduler does), they reach the local optimizer at the next step.
    optim : Optimizer
        This rank's optimizer, over the parameters it owns.
    owners : list of int
        Owning rank of each parameter, in group order.

    Notes
    -----
    Checkpoints: call ``consolidate_state_dict(to=0)`` on EVERY rank, then
    on rank 0 ``state_dict()`` (or ``fastbn.save(path, {"optimizer": zero,
    ...})``) has the whole state, in a plain optimizer's layout.
    `load_state_dict` (and ``fastbn.load_into``) on every rank takes such a
    state and keeps each rank's shard.  On a rank without a fresh
    consolidated copy, ``state_dict()`` returns only this rank's shard,
    marked with a ``"zero_shard"`` entry, which only this same rank can load
    back (fastbn.load_into uses it to roll back a failed load).
    """

    def __init__(self, params: Iterable, optimizer_class: Callable, comm: Any = None,
                 **defaults: Any) -> None:
        if not isinstance(optimizer_class, type) or not callable(getattr(optimizer_class, "step", None)):
            raise TypeError(f"optimizer_class: expected an optimizer class such as "
                            f"fastbn.optim.Adam, got {describe(optimizer_class)}")
        comm = _comm.resolve_comm(comm)
        self.comm = comm
        self.rank, self.world_size = _comm.rank_and_size(comm)
        groups = _as_groups(params)
        flat = [param for group in groups for param in group["params"]]
        if len({id(p) for p in flat}) != len(flat):
            raise ValueError("params: a parameter appears more than once")
        signature = [(f"param_groups[{g}]['params'][{p}]", tuple(param.data.shape),
                      param.data.dtype.str)
                     for g, group in enumerate(groups) for p, param in enumerate(group["params"])]
        _agree_on_signature(comm, "ZeroRedundancyOptimizer", signature)
        self.owners = assign_owners([param.data.size for param in flat], self.world_size)
        self._params = flat
        owned = iter([owner == self.rank for owner in self.owners])
        local_groups = [dict(group, params=[param for param in group["params"] if next(owned)])
                        for group in groups]
        self.optim = optimizer_class(local_groups, **defaults)
        self.defaults = self.optim.defaults
        self.param_groups = [dict(local, params=group["params"])
                             for local, group in zip(self.optim.param_groups, groups)]
        self._consolidated: Optional[Dict[str, Any]] = None

    # section: stepping ------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every parameter's gradient (all shards)."""
        for param in self._params:
            param.zero_grad(set_to_none)

    def _push_hyperparameters(self) -> None:
        for group, local in zip(self.param_groups, self.optim.param_groups):
            for key, value in group.items():
                if key != "params":
                    local[key] = value

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Update this rank's shard, then gather every parameter from its
        owner (collective).

        Returns
        -------
        The closure's return value, or None.
        """
        loss = closure() if closure is not None else None
        from ..optim._checks import checked_grad
        error = ""
        try:
            for index, group in enumerate(self.optim.param_groups):
                for position, param in enumerate(group["params"]):
                    checked_grad(param, index, position)
        except (TypeError, ValueError) as exc:
            error = f"invalid gradient in this rank's shard: {exc}"
        table = _comm.agree(self.comm, [1.0 if error else 0.0])
        if table[:, 0].any():
            messages = _comm.error_messages(self.comm, ValueError(error) if error else None)
            rows = [_comm.with_cause("invalid gradient" if row[0] else "ok", message)
                    for row, message in zip(table, messages)]
            _comm.raise_on_disagreement("ZeroRedundancyOptimizer.step: a rank's gradients are "
                                        "invalid; no parameter was updated:", rows,
                                        ValueError(error) if error else None)
        self._push_hyperparameters()
        self.optim.step()
        self._consolidated = None
        self._gather_parameters()
        return loss

    def _gather_parameters(self) -> None:
        by_dtype: Dict[str, List[int]] = {}
        for index, param in enumerate(self._params):
            by_dtype.setdefault(param.data.dtype.str, []).append(index)
        for indices in by_dtype.values():
            dtype = self._params[indices[0]].data.dtype
            counts = [0] * self.world_size
            for index in indices:
                counts[self.owners[index]] += self._params[index].data.size
            mine = [self._params[i].data.ravel() for i in indices if self.owners[i] == self.rank]
            send = np.concatenate(mine) if mine else np.empty(0, dtype)
            received = np.empty(sum(counts), dtype)
            self.comm.Allgatherv(send, [received, counts])
            offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
            for index in indices:
                owner = self.owners[index]
                data = self._params[index].data
                if owner != self.rank:
                    np.copyto(data, received[offsets[owner]:offsets[owner] + data.size]
                              .reshape(data.shape))
                offsets[owner] += data.size

    # section: state -------------------------------------------------------------------

    def _global_indices(self) -> List[int]:
        """Global index of each of this rank's parameters, in local order."""
        return [index for index, owner in enumerate(self.owners) if owner == self.rank]

    def _shard_state(self) -> Dict[Any, Any]:
        local = self.optim.state_dict()["state"]
        globals_ = self._global_indices()
        return {globals_[local_index]: entry for local_index, entry in local.items()}

    def _groups_layout(self) -> List[Dict[str, Any]]:
        groups, start = [], 0
        for group in self.param_groups:
            packed = {key: value for key, value in group.items() if key != "params"}
            packed["params"] = list(range(start, start + len(group["params"])))
            start += len(group["params"])
            groups.append(packed)
        return groups

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Gather every shard's state on rank `to` (collective), where
        `state_dict` then returns the whole state until the next step."""
        to = check_int(to, "to", minimum=0)
        if to >= self.world_size:
            raise ValueError(f"to: expected a rank in [0, {self.world_size}), got {to}")
        shards = self.comm.gather(self._shard_state(), root=to)
        if self.rank != to:
            self._consolidated = None
            return
        state: Dict[int, Any] = {}
        for shard in shards:
            state.update(shard)
        self._consolidated = {"state": {index: state[index] for index in sorted(state)},
                              "param_groups": self._groups_layout()}

    def state_dict(self) -> Dict[str, Any]:
        """The whole state on the rank of the last `consolidate_state_dict`
        (plain optimizer layout, global parameter indices); elsewhere, or
        after a step, only this rank's shard (see the class notes)."""
        if self._consolidated is not None:
            return self._consolidated
        return {"state": self._shard_state(), "param_groups": self._groups_layout(),
                _SHARD_KEY: {"rank": self.rank, "world_size": self.world_size}}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a whole (consolidated) state, keeping this rank's shard; or a
        shard-only dict this same rank produced.  Local: no communication.
        Everything is checked (`check_state_dict`) before anything changes."""
        self.optim.load_state_dict(self._local_state_dict(state_dict))
        for group, local in zip(self.param_groups, self.optim.param_groups):
            group.update({key: value for key, value in local.items() if key != "params"})
        self._consolidated = None

    def check_state_dict(self, state_dict: Dict[str, Any]) -> Dict[str, Any]:
        """Check a state for `load_state_dict` without changing anything
        (fastbn.load_into calls this before loading any object); returns
        `state_dict` itself, in the layout `load_state_dict` takes.

        Raises
        ------
        TypeError, ValueError
            As `load_state_dict` would, naming the problem.
        """
        self._local_state_dict(state_dict)
        return state_dict

    def _local_state_dict(self, state_dict: Dict[str, Any]) -> Dict[str, Any]:
        """This rank's part of `state_dict`, checked by the local optimizer
        (its `check_state_dict`: normalized copies, nothing modified)."""
        if not isinstance(state_dict, dict) or "state" not in state_dict \
                or "param_groups" not in state_dict:
            raise ValueError("state_dict: expected a dict with 'state' and 'param_groups' entries, "
                             f"got {describe(state_dict)}")
        shard = state_dict.get(_SHARD_KEY)
        if shard is not None and shard != {"rank": self.rank, "world_size": self.world_size}:
            raise ValueError(f"state_dict: holds only the optimizer shard of rank {shard.get('rank')} "
                             f"of {shard.get('world_size')}, this is rank {self.rank} of "
                             f"{self.world_size}; save a consolidated state "
                             "(consolidate_state_dict on every rank first)")
        saved_groups = list(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict: expected {len(self.param_groups)} parameter groups, "
                             f"got {len(saved_groups)}")
        global_of: Dict[Any, int] = {}
        start = 0
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            saved_params = list(saved["params"])
            if len(saved_params) != len(group["params"]):
                raise ValueError(f"state_dict['param_groups'][{index}]: expected "
                                 f"{len(group['params'])} parameters, got {len(saved_params)}")
            global_of.update(zip(saved_params, range(start, start + len(saved_params))))
            start += len(saved_params)
        local_of = {global_index: local for local, global_index in enumerate(self._global_indices())}
        local_state = {}
        for saved_id, entry in state_dict["state"].items():
            if saved_id not in global_of:
                raise ValueError(f"state_dict['state']: entry {saved_id!r} matches no parameter "
                                 "index of the saved param_groups")
            if global_of[saved_id] in local_of:
                local_state[local_of[global_of[saved_id]]] = entry
        local_groups, local_start = [], 0
        for saved, local in zip(saved_groups, self.optim.param_groups):
            count = len(local["params"])
            local_groups.append(dict(saved, params=list(range(local_start, local_start + count))))
            local_start += count
        return self.optim.check_state_dict({"state": local_state, "param_groups": local_groups})

    def __repr__(self) -> str:
        return (f"ZeroRedundancyOptimizer(rank {self.rank} of {self.world_size}, "
                f"{self.owners.count(self.rank)} of {len(self._params)} parameters, "
                f"local {self.optim!r})")
