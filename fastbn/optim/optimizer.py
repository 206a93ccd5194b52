"""`Optimizer`: the base class, with torch.optim.Optimizer's interface.

What a subclass provides (everything else lives here):

- ``defaults`` (the hyperparameters and their default values) and
  `_check_hyperparameters(group, where)` (PyTorch's validation, our messages);
- `_kernel_spec(group)`: a `KernelSpec`, everything the fused kernel takes
  for this group (see fastbn/optim/_fused.py): the state arrays in the
  kernel's slot order, the group scalars, option flags and per-step
  coefficients;
- `_reference_update(data, grad, state, group, fresh)`: one parameter,
  through fastbn.reference.optim (the oracle).

A step runs in three phases over every group: validate (hyperparameters,
memory overlap, data, gradients, existing state), allocate the state that is
missing (held aside, not yet in `state`), then commit (attach that state,
count the step, update).  The first two write nothing, so any error they
raise leaves the optimizer and every parameter as they were.  Both
backends run these phases in one routine that fills a plan from the current
kernels object (fastbn._backend, `optim_plan`).  On the fast backend the
commit is a single call into the compiled bridge that runs all groups'
kernels back to back (one call per group and dtype); the reference plan
updates one parameter at a time in NumPy.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

import numpy as np

from .._backend import current_kernels
from .._validation import check_positive, check_range, check_real, describe
from ..parameter import Parameter
from . import _bf16
from ._fused import FLAG_STOCHASTIC_ROUNDING, _optim
from ._checks import (MAX_STEP, check_disjoint_params, check_param_data, check_state_entry,
                      checked_grad)

__all__ = ["Optimizer"]

_PARAMS_EXPECTED = "expected an iterable of Parameters or of dicts (param groups)"


class KernelSpec(NamedTuple):
    """What the fused kernel takes for one param group (`Optimizer._kernel_spec`)."""

    #: State arrays of one parameter, in the kernel's slot order; None marks a
    #: slot this group's options leave unused.
    slots: Tuple[Optional[str], ...]
    #: The group scalars, in the family's order (src_c/optim/optim_kernels.h).
    scalars: Tuple[float, ...]
    #: Option flags (fastbn.optim._fused.FLAG_*).
    flags: int
    #: (step, fresh) -> the per-parameter coefficients (NAdam: (step, fresh,
    #: scalar state) -> (coefficients, new scalar state)); None when every
    #: parameter uses the group scalars only.
    coefficients: Optional[Callable[..., Any]]


class _Update:
    """One parameter a step updates, as validated in phase 1: its arrays,
    existing state entry (None before its first step), the state keys to
    create, and its step counter after this step."""

    __slots__ = ("group_index", "position", "param", "data", "grad", "entry", "missing", "created",
                 "new_step")

    def __init__(self, group_index: int, position: int, param: Parameter, grad: np.ndarray,
                 entry: Optional[Dict[str, Any]], missing: Tuple[str, ...], new_step: int) -> None:
        self.group_index = group_index
        self.position = position
        self.param = param
        self.data = param.data
        self.grad = grad
        self.entry = entry
        self.missing = missing
        self.created: Dict[str, np.ndarray] = {}
        self.new_step = new_step

    @property
    def fresh(self) -> bool:
        """True when this step creates any of its state arrays."""
        return bool(self.missing)


def _allocate_state_array(data: np.ndarray, fill_value: float,
                          dtype: Optional[np.dtype] = None) -> np.ndarray:
    """A new state array shaped like `data`, of `data`'s dtype or `dtype`
    (the one place state memory is allocated, so tests can make it fail)."""
    if fill_value == 0:
        return np.zeros_like(data, dtype=dtype)
    return np.full_like(data, fill_value, dtype=dtype)


class Optimizer:
    """Base class of every fastbn optimizer (torch.optim.Optimizer's interface).

    Parameters
    ----------
    params : iterable of Parameter, or iterable of dict
        The parameters to optimize, or param groups: dicts with a ``"params"``
        entry and per-group hyperparameters overriding `defaults`.  An ordered
        collection (list, tuple, generator): a set is refused (TypeError), as
        torch does, because its order, which numbers the parameters in
        `state_dict`, changes between runs.
    defaults : dict
        Default hyperparameters of every group.
    state_dtype : {"float32", "bfloat16"}, default "float32"
        Only for optimizers that offer it (SGD, Momentum, RMSprop, Adam,
        AdamW, Lion).  "float32" keeps the state in the parameters' dtype.
        "bfloat16" (float32 parameters only; needs ml_dtypes, the ``bf16``
        extra) stores every state array as bfloat16, half the bytes: each
        step widens it to float32, updates it exactly as float32 state, and
        rounds it back.  The optimizer then counts steps (``step`` in each
        state entry) and every group gets the entries ``state_dtype``,
        ``stochastic_rounding`` and ``rounding_seed`` (an int in [0, 2**64),
        0 by default; saved and restored with the state).
    stochastic_rounding : bool, default True
        With bfloat16 state: round stochastically (unbiased, so updates
        smaller than half a bfloat16 step still move the state on average),
        with random bits drawn from (rounding_seed, step, position of the
        parameter in its group, element index) -- the same for any thread
        count and after a resume.  False: round to nearest-even.

    Attributes
    ----------
    param_groups : list of dict
        One dict per group: its hyperparameters and ``"params"`` (a list).
        Changing a value (for example ``group["lr"]``, as a scheduler does)
        takes effect at the next `step`.
    state : defaultdict(dict)
        Per-parameter state keyed by the Parameter, with PyTorch's key names
        (``momentum_buffer``, ``square_avg``, ``exp_avg`` ...); arrays are
        owned by the optimizer, ``step`` is an int.
    defaults : dict

    Notes
    -----
    No two parameters of one optimizer may share memory (`step` raises
    ValueError naming both): the kernels update many tensors in parallel, so
    two parameters on the same memory would get a result that depends on the
    thread timing.
    """

    #: True when this optimizer keeps a per-parameter ``step`` counter.
    _counts_steps = False
    #: The key of a per-parameter float the state entries keep besides the
    #: arrays (NAdam's ``mu_product``), or None; it starts at
    #: `_scalar_initial`, and a group's coefficient function then takes
    #: (step, fresh, value) and returns (coefficients, new value).
    _scalar_state: Optional[str] = None
    _scalar_initial = 1.0

    def __init__(self, params: Iterable, defaults: Dict[str, Any], *, state_dtype: str = "float32",
                 stochastic_rounding: bool = True) -> None:
        self.defaults: Dict[str, Any] = dict(defaults)
        self.state: Dict[Parameter, Dict[str, Any]] = defaultdict(dict)
        self.param_groups: List[Dict[str, Any]] = []
        # The .data arrays of every group's parameters when they were last
        # found disjoint (see `step`); None until the first step.
        self._disjoint_data: Optional[List[List[np.ndarray]]] = None
        # bfloat16 state: its dtype (None: state of the parameters' dtype).
        self._state_dtype: Optional[np.dtype] = _bf16.check_state_options(state_dtype, stochastic_rounding)
        if self._state_dtype is not None:
            # The step counter keys the rounding, so every family counts steps.
            self._counts_steps = True
            self.defaults.update(state_dtype="bfloat16", stochastic_rounding=bool(stochastic_rounding),
                                 rounding_seed=0)
        self._check_group(self.defaults, "")
        if isinstance(params, (Parameter, np.ndarray, dict)):
            raise TypeError(f"params: {_PARAMS_EXPECTED}, got {describe(params)}")
        if isinstance(params, (set, frozenset)):
            raise TypeError(f"params: expected an ordered collection of Parameters (a list or "
                            f"tuple), got a {type(params).__name__}, whose order changes between "
                            "runs")
        try:
            groups = list(params)
        except TypeError:
            raise TypeError(f"params: {_PARAMS_EXPECTED}, got {describe(params)}") from None
        if not groups:
            raise ValueError("params: expected at least one Parameter, got an empty list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    # section: param groups ---------------------------------------------------

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group of parameters with its own hyperparameters.

        Missing hyperparameters take the optimizer's defaults.  A parameter
        may belong to one group only (ValueError).
        """
        index = len(self.param_groups)
        where = f"param_groups[{index}]"
        if not isinstance(param_group, dict):
            raise TypeError(f"{where}: expected a dict, got {describe(param_group)}")
        if "params" not in param_group:
            raise ValueError(f"{where}: expected a 'params' entry, got keys {sorted(param_group)}")
        group = dict(param_group)
        params = group["params"]
        if isinstance(params, Parameter):
            params = [params]
        elif isinstance(params, (set, frozenset)):
            raise TypeError(f"{where}['params']: expected an ordered collection (list or tuple), "
                            "got a set, whose order changes between runs")
        else:
            params = list(params)
        for position, param in enumerate(params):
            if not isinstance(param, Parameter):
                raise TypeError(f"{where}['params'][{position}]: expected a fastbn.Parameter, "
                                f"got {describe(param)}")
            check_param_data(param, where, position)
        if len({id(p) for p in params}) != len(params):
            raise ValueError(f"{where}['params']: a parameter appears more than once in the group")
        existing = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in existing for p in params):
            raise ValueError(f"{where}['params']: some parameters appear in more than one "
                             "parameter group")
        group["params"] = params
        for name, default in self.defaults.items():
            group.setdefault(name, default)
        self._check_group(group, where)
        if self._state_dtype is not None:
            for position, param in enumerate(params):
                self._check_bf16_state_param(param, where, position)
        self.param_groups.append(group)

    # section: step -------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradient of every parameter: to None (default) or to zeros."""
        for group in self.param_groups:
            for param in group["params"]:
                param.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Update every parameter that has a gradient, all groups at once.

        Parameters
        ----------
        closure : callable, optional
            Re-evaluates the model and returns the loss; called first.

        Returns
        -------
        The closure's return value, or None.

        Raises
        ------
        TypeError, ValueError
            A bad hyperparameter, parameter, gradient or state entry (the
            message names it), or two parameters sharing memory.

        Notes
        -----
        What is guaranteed when `step` raises (after the closure returned):

        - An error found by validation or while allocating new state
          (TypeError, ValueError, MemoryError) leaves every parameter,
          gradient and state entry exactly as it was, on both backends:
          everything is checked and every missing state array is allocated
          (held aside) before anything is written.
        - Fast backend: attaching the new state, counting the step and the
          kernel calls of every group happen in one compiled call that runs
          no Python code, so a KeyboardInterrupt (or another asynchronous
          exception) arrives either before it (nothing changed) or after it
          (every group fully stepped), never between two groups.
        - Reference backend (the NumPy oracle): parameters are updated one
          after another in Python; a KeyboardInterrupt during that loop can
          leave the earlier parameters stepped and the later ones not
          (torch.optim has the same window).
        """
        loss = closure() if closure is not None else None
        groups = self.param_groups
        for index, group in enumerate(groups):
            self._check_group(group, f"param_groups[{index}]")
        if not isinstance(self.state, dict):
            raise TypeError(f"optimizer state: expected a dict, got {describe(self.state)}")
        self._check_disjoint(groups)
        self._planned_step(groups, current_kernels().optim_plan(self))
        return loss

    def _check_disjoint(self, groups: List[Dict[str, Any]]) -> None:
        """Phase 1, memory overlap: rechecked only when a parameter's .data
        array (or a group's parameter list) changed since the last check."""
        known = self._disjoint_data
        if known is not None and _optim.data_unchanged(groups, known):
            return
        check_disjoint_params(groups)
        self._disjoint_data = [[param.data for param in group["params"]] for group in groups]

    def _planned_step(self, groups: List[Dict[str, Any]], plan: Any) -> None:
        """Phases 1 to 3 on either backend: `plan` is the current kernels
        object's (the compiled StepPlan, or its NumPy twin, which takes no
        parameter as ready and updates in phase 3 one parameter at a time)."""
        group_slots, group_coefficients, updates = [], [], []
        # Phase 1: the bridge takes every parameter that is ready as it is,
        # and the checks below handle the rest (first step, copies, errors).
        for index, group in enumerate(groups):
            slots, scalars, flags, coefficients = self._kernel_spec(group)
            params = group["params"]
            state_type, seed = -1, 0
            if self._state_dtype is not None:
                state_type, seed = self._state_dtype.num, int(group["rounding_seed"])
                if group["stochastic_rounding"]:
                    flags |= FLAG_STOCHASTIC_ROUNDING
            for position in plan.scan_group(self._kernel_family, params, slots, scalars, flags,
                                            state_type=state_type, rounding_seed=seed):
                updates.append(self._validated_update(index, position, params[position], slots))
            group_slots.append(slots)
            group_coefficients.append(coefficients)
        # Phase 2.
        self._allocate_missing(updates, groups)
        for update in updates:
            slots = group_slots[update.group_index]
            arrays = tuple(None if key is None else
                           update.created[key] if key in update.created else update.entry[key]
                           for key in slots)
            step_owner, insertions = self._attachments(update)
            if self._scalar_state is None:
                plan.add_tensor(update.group_index, update.data, update.grad, arrays,
                                update.new_step, update.fresh, step_owner, insertions,
                                position=update.position)
            else:
                owner = insertions[0][2] if update.entry is None else update.entry
                plan.add_tensor(update.group_index, update.data, update.grad, arrays,
                                update.new_step, update.fresh, step_owner, insertions,
                                scalar_owner=owner,
                                scalar=float(owner.get(self._scalar_state, self._scalar_initial)),
                                position=update.position)
        for index, coefficients in enumerate(group_coefficients):
            if coefficients is None:
                continue
            keys = plan.coefficient_keys(index)
            if self._scalar_state is None:
                plan.set_coefficients(index, [coefficients(step, fresh) for step, fresh in keys])
            else:
                results = [coefficients(*key) for key in keys]
                plan.set_coefficients(index, [row for row, _ in results])
                plan.set_scalar_values(index, [value for _, value in results])
        # Phase 3.
        plan.commit_and_run()

    def _reference_tensor_update(self, data: np.ndarray, grad: np.ndarray, entry: Dict[str, Any],
                                 group: Dict[str, Any], fresh: bool, position: int) -> None:
        """The reference kernels' update of one parameter (state attached and
        step counted): `_reference_update`, on float32 copies of bfloat16 state."""
        if self._state_dtype is None:
            self._reference_update(data, grad, entry, group, fresh)
        else:
            _bf16.reference_update(self._reference_update, data, grad, entry, group, fresh,
                                   self._state_slots(group), position)

    def _validated_update(self, group_index: int, position: int, param: Parameter,
                          slots: Tuple[Optional[str], ...]) -> _Update:
        """Phase 1 for one parameter with a gradient: check it, its gradient
        and its state entry (if any); raise, or return what the step needs."""
        grad = checked_grad(param, group_index, position)
        if self._state_dtype is not None:
            self._check_bf16_state_param(param, f"param_groups[{group_index}]", position)
        entry = self.state.get(param)  # .get: a defaultdict lookup would insert
        if entry is not None:
            check_state_entry(entry, slots, self._counts_steps, param.data, group_index, position,
                              scalar_key=self._scalar_state, state_dtype=self._state_dtype)
        missing = tuple(key for key in slots
                        if key is not None and (entry is None or key not in entry))
        new_step = int(entry.get("step", 0)) + 1 if entry is not None and self._counts_steps else 1
        return _Update(group_index, position, param, grad, entry, missing, new_step)

    def _allocate_missing(self, updates: List[_Update], groups: List[Dict[str, Any]]) -> None:
        """Phase 2: every missing state array, held aside in `update.created`."""
        for update in updates:
            group = groups[update.group_index]
            for key in update.missing:
                update.created[key] = self._initial_state_array(update.param, key, group)

    def _attachments(self, update: _Update) -> Tuple[Optional[Dict[str, Any]], List[tuple]]:
        """What phase 3 writes for `update`: the existing entry whose ``step``
        to overwrite (or None) and the (mapping, key, value) insertions."""
        scalar_key = self._scalar_state
        if update.entry is None:
            entry: Dict[str, Any] = {"step": update.new_step} if self._counts_steps else {}
            entry.update(update.created)
            if scalar_key is not None:
                entry[scalar_key] = self._scalar_initial
            return None, [(self.state, update.param, entry)]
        insertions = [(update.entry, key, value) for key, value in update.created.items()]
        if scalar_key is not None and scalar_key not in update.entry:
            insertions.append((update.entry, scalar_key, self._scalar_initial))
        if not self._counts_steps:
            return None, insertions
        if "step" in update.entry:
            return update.entry, insertions
        return None, insertions + [(update.entry, "step", update.new_step)]

    def _initial_state(self, param: Parameter, group: Dict[str, Any]) -> Dict[str, Any]:
        """A complete state entry before the first step (Adagrad creates its
        state at construction, as torch does)."""
        entry: Dict[str, Any] = {"step": 0} if self._counts_steps else {}
        for key in self._state_slots(group):
            if key is not None:
                entry[key] = self._initial_state_array(param, key, group)
        return entry

    def _initial_state_array(self, param: Parameter, key: str, group: Dict[str, Any]) -> np.ndarray:
        return _allocate_state_array(param.data, self._initial_fill(key, group), self._state_dtype)

    def _initial_fill(self, key: str, group: Dict[str, Any]) -> float:
        """The value a new state array `key` starts at (zero unless overridden)."""
        return 0.0

    # section: bfloat16 state ---------------------------------------------------

    def _check_group(self, group: Dict[str, Any], where: str) -> None:
        """The subclass's hyperparameter checks, then the state options:
        ``state_dtype`` is fixed at construction (a group or a loaded
        state_dict may not change it), ``stochastic_rounding`` a bool and
        ``rounding_seed`` an int in [0, 2**64)."""
        self._check_hyperparameters(group, where)
        expected = "float32" if self._state_dtype is None else "bfloat16"
        found = group.get("state_dtype", "float32")
        if not isinstance(found, str) or found != expected:
            raise ValueError(f"{hyperparameter_name(where, 'state_dtype')}: expected {expected!r} "
                             f"(fixed when the optimizer is constructed), got {found!r}")
        if self._state_dtype is None:
            return
        check_flags(group, where, "stochastic_rounding")
        seed = group["rounding_seed"]
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) \
                or not 0 <= int(seed) < 2 ** 64:
            raise TypeError(f"{hyperparameter_name(where, 'rounding_seed')}: expected an int in "
                            f"[0, 2**64), got {describe(seed)}")

    @staticmethod
    def _check_bf16_state_param(param: Parameter, where: str, position: int) -> None:
        data = param.data
        if isinstance(data, np.ndarray) and data.dtype != np.float32:
            raise TypeError(f"{where}['params'][{position}].data: expected dtype float32 "
                            f"(state_dtype='bfloat16' is for float32 parameters), got {data.dtype}")

    # section: subclass hooks ---------------------------------------------------

    def _check_hyperparameters(self, group: Dict[str, Any], where: str) -> None:
        """Raise ValueError/TypeError for a bad hyperparameter of `group`;
        `where` prefixes the names ('' for constructor arguments)."""
        raise NotImplementedError

    def _kernel_spec(self, group: Dict[str, Any]) -> KernelSpec:
        """What the fused kernel takes for this (validated) group."""
        raise NotImplementedError

    def _state_slots(self, group: Dict[str, Any]) -> Tuple[Optional[str], ...]:
        return self._kernel_spec(group).slots

    def _reference_update(self, data: np.ndarray, grad: np.ndarray, state: Dict[str, Any],
                          group: Dict[str, Any], fresh: bool) -> None:
        """One parameter through fastbn.reference.optim (step already counted;
        `fresh`: its state arrays were created by this step)."""
        raise NotImplementedError

    # section: state dict -------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """Optimizer state in PyTorch's layout.

        ``{"state": {index: {key: value}}, "param_groups": [{hyperparameters...,
        "params": [index, ...]}]}``, parameters numbered in group order from 0.
        Arrays are copies, so training on does not change a saved dict.
        """
        index_of: Dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            packed = {key: value for key, value in group.items() if key != "params"}
            indices = []
            for param in group["params"]:
                index_of.setdefault(id(param), len(index_of))
                indices.append(index_of[id(param)])
            packed["params"] = indices
            groups.append(packed)
        state = {}
        for group in self.param_groups:
            for param in group["params"]:
                if param in self.state and self.state[param]:
                    state[index_of[id(param)]] = {
                        key: (value.copy() if isinstance(value, np.ndarray) else value)
                        for key, value in self.state[param].items()}
        return {"state": state, "param_groups": groups}

    def check_state_dict(self, state_dict: Mapping[str, Any]) -> Dict[str, Any]:
        """Check a saved state against this optimizer; return a normalized copy.

        The one place where optimizer state is validated: `load_state_dict`
        and :func:`fastbn.load_into` both call it, so a state that one
        accepts the other accepts too.  Nothing is modified.

        Parameters
        ----------
        state_dict : mapping
            ``{"state": ..., "param_groups": ...}`` as `state_dict` returns
            (fastbn's or torch.optim's, with tensors converted to arrays).

        Returns
        -------
        dict
            The state in `state_dict`'s layout with parameters renumbered in
            this optimizer's group order from 0, every array a fresh
            C-contiguous native-byte-order copy, ``step`` a Python int,
            ``None`` state values dropped and missing hyperparameters filled
            from `defaults`.

        Raises
        ------
        TypeError
            A value of the wrong type: `state_dict`, ``state`` or a group not
            a mapping, ``params`` not a list, a ``step`` that is not a whole
            number (a string, a bool, an array of more than one element), a
            state array that is not floating point or whose precision differs
            from its parameter's (no silent casts).
        ValueError
            A wrong value: a missing ``state``/``param_groups``/``params``
            entry, another number of groups or of parameters per group than
            this optimizer has, a parameter index used twice or unknown, an
            array of another shape than its parameter, a ``step`` that is
            negative, non-finite, fractional or above 2**53, missing
            ``step`` in an optimizer that counts steps, a bad hyperparameter.

        Notes
        -----
        Dtype rule: a state array must have its parameter's precision
        (float32 state for a float32 parameter); a byte-swapped array of that
        precision is accepted and stored in native order.  PyTorch casts
        floating state to the parameter's dtype instead; fastbn refuses, as
        it refuses every implicit cast (a float64 Adam state loaded into a
        float32 model would silently lose its low bits).  Cast explicitly
        with ``astype`` when that is what you want.

        ``step`` may be an int, a whole float or a 0-d array holding one
        (PyTorch stores it as a float tensor); the bound 2**53 keeps every
        step exactly representable as a float64.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError("state_dict: expected a dict with 'state' and 'param_groups' entries, "
                            f"got {describe(state_dict)}")
        missing = [key for key in ("state", "param_groups") if key not in state_dict]
        if missing:
            raise ValueError("state_dict: expected a dict with 'state' and 'param_groups' entries, "
                             f"got keys {sorted(map(str, state_dict))} (missing {missing})")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if not isinstance(saved_groups, (list, tuple)):
            raise TypeError(f"state_dict['param_groups']: expected a list of dicts, got {describe(saved_groups)}")
        if not isinstance(saved_state, Mapping):
            raise TypeError(f"state_dict['state']: expected a dict mapping parameter indices to dicts, "
                            f"got {describe(saved_state)}")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict: expected {len(self.param_groups)} parameter groups "
                             f"(as this optimizer has), got {len(saved_groups)}")
        position_of: Dict[Any, Tuple[int, Parameter]] = {}
        groups = []
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            where = f"state_dict['param_groups'][{index}]"
            if not isinstance(saved, Mapping):
                raise TypeError(f"{where}: expected a dict, got {describe(saved)}")
            if "params" not in saved:
                raise ValueError(f"{where}: expected a 'params' entry, got keys {sorted(map(str, saved))}")
            saved_params = saved["params"]
            if not isinstance(saved_params, (list, tuple)):
                raise TypeError(f"{where}['params']: expected a list of parameter indices, "
                                f"got {describe(saved_params)}")
            if len(saved_params) != len(group["params"]):
                raise ValueError(
                    f"{where}: expected {len(group['params'])} parameters (as this optimizer's "
                    f"group {index} has), got {len(saved_params)}")
            for slot, (saved_id, param) in enumerate(zip(saved_params, group["params"])):
                name = f"{where}['params'][{slot}]"
                try:
                    seen = saved_id in position_of
                except TypeError:
                    raise TypeError(f"{name}: expected a parameter index (an int), got "
                                    f"{describe(saved_id)}") from None
                if seen:
                    raise ValueError(f"{name}: parameter index {saved_id!r} appears more than once")
                position_of[saved_id] = (len(position_of), param)
            restored = {key: copy.deepcopy(value) for key, value in saved.items() if key != "params"}
            for key, default in self.defaults.items():
                restored.setdefault(key, default)
            self._check_group(restored, where)
            restored["params"] = list(range(len(position_of) - len(group["params"]), len(position_of)))
            groups.append(restored)
        state: Dict[int, Dict[str, Any]] = {}
        for saved_id, entry in saved_state.items():
            try:
                found = position_of.get(saved_id)
            except TypeError:
                found = None
            if found is None:
                raise ValueError(f"state_dict['state']: entry {saved_id!r} matches no parameter "
                                 "index of the saved param_groups")
            position, param = found
            where = f"state_dict['state'][{saved_id!r}]"
            if not isinstance(entry, Mapping):
                raise TypeError(f"{where}: expected a dict of state values, got {describe(entry)}")
            values = {}
            for key, value in entry.items():
                if not isinstance(key, str):
                    raise TypeError(f"{where}: expected str state names, got {describe(key)}")
                if value is not None:
                    values[key] = _checked_state_value(value, param, f"{where}[{key!r}]", key,
                                                       scalar_key=self._scalar_state,
                                                       state_dtype=self._state_dtype)
            if self._counts_steps and values and "step" not in values:
                raise ValueError(f"{where}: expected a 'step' entry ({type(self).__name__} counts "
                                 f"steps), got keys {sorted(values)}")
            if values:
                state[position] = values
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a dict from `state_dict` (fastbn's or torch.optim's).

        Everything is checked by `check_state_dict` first, so a state that
        is refused leaves the optimizer unchanged.  Groups and their
        parameter counts must match this optimizer's; the saved
        hyperparameters replace the current ones; arrays are copied and must
        have their parameter's shape and precision (no casts); ``step``
        becomes an int.

        Raises
        ------
        TypeError, ValueError
            As `check_state_dict`; messages name the offending entry.
        """
        normalized = self.check_state_dict(state_dict)
        params = [param for group in self.param_groups for param in group["params"]]
        new_state: Dict[Parameter, Dict[str, Any]] = defaultdict(dict)
        for position, values in normalized["state"].items():
            new_state[params[position]] = values
        new_groups = []
        for saved, group in zip(normalized["param_groups"], self.param_groups):
            restored = dict(saved)
            restored["params"] = group["params"]
            new_groups.append(restored)
        self.param_groups = new_groups
        self.state = new_state

    # section: display ----------------------------------------------------------

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for index, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {index}")
            for key in sorted(group):
                if key != "params":
                    lines.append(f"    {key}: {group[key]}")
        lines.append(")")
        return "\n".join(lines)


# section: shared checks ------------------------------------------------------

class _StateDtypeError(TypeError):
    """A saved state array whose precision differs from its parameter's
    (:func:`fastbn.load_into` keeps this one a TypeError and turns the other
    state errors into CheckpointError)."""


def _checked_step(value: Any, name: str) -> int:
    """``step`` as an int: an int, a whole float, or a 0-d array of one."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a whole number (int), got {describe(value)}")
    if isinstance(value, (int, np.integer)):
        step = int(value)
    else:
        array = (np.asarray(value) if isinstance(value, (float, np.floating, np.ndarray))
                 or hasattr(value, "__array__") else None)
        if array is None or array.shape != () or array.dtype.kind not in "iuf":
            raise TypeError(f"{name}: expected a whole number (an int, or a float or 0-d array "
                            f"holding one), got {describe(value)}")
        if array.dtype.kind == "f":
            number = float(array)
            if not number.is_integer():
                raise ValueError(f"{name}: expected a whole number, got {number!r}")
            step = int(number)
        else:
            step = int(array)
    if not 0 <= step <= MAX_STEP:
        raise ValueError(f"{name}: expected a whole number in [0, 2**53], got {step}")
    return step


def _checked_scalar(value: Any, name: str) -> float:
    """A per-parameter scalar (NAdam's ``mu_product``) as a float in [0, 1]:
    a real number or a 0-d array of one (PyTorch stores a 0-d tensor)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a float in [0, 1], got {describe(value)}")
    array = (np.asarray(value) if isinstance(value, (int, float, np.number, np.ndarray))
             or hasattr(value, "__array__") else None)
    if array is None or array.shape != () or array.dtype.kind not in "iuf":
        raise TypeError(f"{name}: expected a float in [0, 1] (or a 0-d array holding one), "
                        f"got {describe(value)}")
    number = float(array)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{name}: expected a float in [0, 1], got {number!r}")
    return number


def _checked_state_value(value: Any, param: Parameter, name: str, key: str, *,
                         scalar_key: Optional[str] = None,
                         state_dtype: Optional[np.dtype] = None) -> Any:
    """One value of a saved state entry, normalized (see `check_state_dict`);
    `scalar_key`: the optimizer's per-parameter float (NAdam's
    ``mu_product``), if any; `state_dtype`: bfloat16 for an optimizer with
    bfloat16 state."""
    if key == "step":
        return _checked_step(value, name)
    if key == scalar_key:
        return _checked_scalar(value, name)
    if not (isinstance(value, np.ndarray) or hasattr(value, "__array__")):
        raise TypeError(f"{name}: expected an ndarray, got {describe(value)}")
    array = np.asarray(value)
    data = param.data
    if state_dtype is not None:
        if array.dtype != state_dtype:
            raise _StateDtypeError(f"{name}: expected dtype bfloat16 (the optimizer's state_dtype; "
                                   f"fastbn never casts state), got {array.dtype}")
        if array.shape != data.shape:
            raise ValueError(f"{name}: expected shape {data.shape} (the shape of the parameter), "
                             f"got {array.shape}")
        return np.array(array, dtype=state_dtype, order="C", copy=True)
    if array.dtype.kind != "f" or array.dtype.itemsize != data.dtype.itemsize:
        raise _StateDtypeError(f"{name}: expected dtype {data.dtype} (the parameter's; fastbn never "
                        f"casts state), got {array.dtype}")
    if array.shape != data.shape:
        raise ValueError(f"{name}: expected shape {data.shape} (the shape of the parameter), "
                         f"got {array.shape}")
    return np.array(array, dtype=data.dtype, order="C", copy=True)


def hyperparameter_name(where: str, key: str) -> str:
    """``lr`` for constructor arguments, ``param_groups[1]['lr']`` for a group."""
    return f"{where}[{key!r}]" if where else key


def check_non_negative(group: Dict[str, Any], where: str, *keys: str) -> None:
    for key in keys:
        check_positive(group[key], hyperparameter_name(where, key), strict=False)


def check_unit_interval(group: Dict[str, Any], where: str, key: str) -> None:
    """A decay factor in [0, 1)."""
    check_range(group[key], hyperparameter_name(where, key), 0.0, 1.0, high_inclusive=False)


def check_betas(group: Dict[str, Any], where: str) -> None:
    betas = group["betas"]
    name = hyperparameter_name(where, "betas")
    if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise TypeError(f"{name}: expected a pair (beta1, beta2), got {describe(betas)}")
    for index in (0, 1):
        check_range(betas[index], f"{name}[{index}]", 0.0, 1.0, high_inclusive=False)


def check_flags(group: Dict[str, Any], where: str, *keys: str) -> None:
    for key in keys:
        value = group[key]
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{hyperparameter_name(where, key)}: expected a bool, got {describe(value)}")


def check_reals(group: Dict[str, Any], where: str, *keys: str) -> None:
    for key in keys:
        check_real(group[key], hyperparameter_name(where, key))
