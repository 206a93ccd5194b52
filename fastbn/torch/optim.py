"""fastbn's fused multi-tensor optimizers as ``torch.optim.Optimizer`` subclasses.

>>> opt = fastbn.torch.optim.Adam(model.parameters(), lr=1e-3)
>>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
>>> loss.backward(); opt.step(); sched.step(); opt.zero_grad()

Each optimizer drives a `fastbn.optim` optimizer of the same name whose
parameters are zero-copy NumPy views of the torch parameters: `step` updates
the torch tensors in place (same tensor objects, same storage) with one fused
kernel call per param group and dtype.  The torch ``param_groups`` are the
source of truth for hyperparameters: they are read at every `step`, so
``torch.optim.lr_scheduler`` schedulers (and code that edits
``group["lr"]``) drive the updates.

The classes: `SGD`, `Momentum`, `RMSprop`, `Adam`, `AdamW`, `Adagrad`,
`NAdam`, `RAdam`, `Adadelta`, `Adamax` and `Lion`, with torch's constructor
arguments and defaults where torch has the class.  In every one:

- ``params``: an iterable of tensors, of (name, tensor) pairs or of group
  dicts.  They must be dense CPU float32/float64 tensors (contiguous or any
  other dense layout such as channels_last, whose state then has the same
  strides); anything else raises at construction: TypeError for another
  dtype or a sparse/non-strided tensor, ValueError for another device or a
  non-dense view.  There is no silent fallback: use ``torch.optim`` for
  those parameters.
- ``foreach`` and ``fused`` (where torch has them) are accepted and ignored:
  fastbn's kernel is always fused.
- ``capturable=True`` and ``differentiable=True`` raise ValueError.

State is exposed in torch's layout (``optimizer.state[p]["exp_avg"]`` is a
tensor of p's shape sharing memory with fastbn's state array; ``step`` is a
0-d float32 tensor as in torch), and `state_dict` / `load_state_dict` read
and write torch.optim checkpoints.
"""
from __future__ import annotations

import inspect
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import optim as fastbn_optim
from ..parameter import Parameter
from ._ops import sync_num_threads

__all__ = ["SGD", "Momentum", "RMSprop", "Adam", "AdamW", "Adagrad", "NAdam", "RAdam",
           "Adadelta", "Adamax", "Lion"]

_DTYPES = (torch.float32, torch.float64)
# torch-only constructor options; these values are the only ones supported
# (a differentiable or capturable step cannot run on NumPy views).
_UNSUPPORTED_TRUE = ("differentiable", "capturable")


# section: layouts ------------------------------------------------------------------


def _storage_order(tensor: Tensor) -> Optional[Tuple[int, ...]]:
    """The dimension order in which `tensor` is C-contiguous (None when it
    already is), so ``tensor.permute(order)`` is a contiguous view.  Raises
    ValueError for a non-dense tensor (a slice or an expanded view)."""
    if tensor.is_contiguous():
        return None
    order = tuple(sorted(range(tensor.dim()), key=lambda d: (-tensor.stride(d), d)))
    if not tensor.permute(order).is_contiguous():
        raise ValueError(f"expected a dense tensor (contiguous, channels_last or any permutation "
                         f"of a contiguous one), got shape {tuple(tensor.shape)} with strides "
                         f"{tensor.stride()}")
    return order


def _as_kernel_array(tensor: Tensor, order: Optional[Tuple[int, ...]]) -> np.ndarray:
    """A zero-copy NumPy view of `tensor` with its dimensions in `order`."""
    tensor = tensor.detach()
    return (tensor if order is None else tensor.permute(order)).numpy()


def _as_torch_layout(array: np.ndarray, order: Optional[Tuple[int, ...]]) -> Tensor:
    """The inverse of `_as_kernel_array`: a tensor of the parameter's shape
    (and strides) sharing `array`'s memory."""
    tensor = torch.from_numpy(array)
    if order is None:
        return tensor
    inverse = [0] * len(order)
    for position, dim in enumerate(order):
        inverse[dim] = position
    return tensor.permute(inverse)


def _plain(value: Any) -> Any:
    """A hyperparameter as fastbn takes it: tensors (torch allows ``lr`` and
    ``betas`` as tensors) become Python numbers."""
    if isinstance(value, Tensor):
        return value.item()
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    return value


def _describe_param(param: Tensor) -> str:
    return f"a {param.device.type} tensor of dtype {param.dtype} and layout {param.layout}"


class _Slot:
    """One torch parameter and the fastbn Parameter viewing it."""

    __slots__ = ("tensor", "parameter", "order")

    def __init__(self, tensor: Tensor, where: str) -> None:
        if tensor.layout != torch.strided:
            raise TypeError(f"{where}: expected a dense CPU float32/float64 tensor, got "
                            f"{_describe_param(tensor)}")
        if tensor.device.type != "cpu":
            raise ValueError(f"{where}: expected a CPU tensor (fastbn's kernels run on the CPU), "
                             f"got {_describe_param(tensor)}; use torch.optim for it")
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"{where}: expected dtype torch.float32 or torch.float64, got "
                            f"{tensor.dtype}; use torch.optim for it")
        try:
            self.order = _storage_order(tensor)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        self.tensor = tensor
        self.parameter = Parameter(_as_kernel_array(tensor, self.order))


# section: the base class -------------------------------------------------------------


class _FastbnOptimizer(torch.optim.Optimizer):
    """A torch.optim.Optimizer stepping through a fastbn.optim optimizer.

    Subclasses set `_fastbn_class` and pass their defaults (fastbn's
    hyperparameters plus torch's extra options) to `__init__`.
    """

    _fastbn_class: type = fastbn_optim.Optimizer

    def __init__(self, params: Iterable, defaults: Dict[str, Any]) -> None:
        for key in _UNSUPPORTED_TRUE:
            _check_torch_option(defaults, key, key)
        self._fastbn: Optional[fastbn_optim.Optimizer] = None
        self._slots: List[List[_Slot]] = []
        self._pending_groups: List[Dict[str, Any]] = []
        super().__init__(params, defaults)
        # One fastbn optimizer over every group, built once all are known (so
        # that Adagrad creates the state of every group up front, as torch does).
        hyperparameters = {key: value for key, value in defaults.items()
                           if key in self._constructor_names()}
        self._fastbn = self._fastbn_class(self._pending_groups, **_plain_dict(hyperparameters))
        del self._pending_groups

    @classmethod
    def _constructor_names(cls) -> Tuple[str, ...]:
        """The hyperparameters the fastbn class's constructor takes."""
        cached = cls.__dict__.get("_constructor_names_cache")
        if cached is None:
            signature = inspect.signature(cls._fastbn_class)
            cached = tuple(name for name in signature.parameters if name != "params")
            cls._constructor_names_cache = cached
        return cached

    @classmethod
    def _hyperparameter_names(cls) -> Tuple[str, ...]:
        """The group entries fastbn's step reads (copied from the torch group)."""
        names = cls._constructor_names()
        if issubclass(cls._fastbn_class, fastbn_optim.Adam) and "decoupled_weight_decay" not in names:
            names += ("decoupled_weight_decay",)  # AdamW sets it through its defaults
        return names

    # torch's __init__ assigns ``self.state``; reads go to the property below.
    @property
    def state(self) -> Dict[Tensor, Dict[str, Any]]:  # type: ignore[override]
        """Per-parameter state in torch's layout, keyed by the torch parameter.

        Arrays are tensors of the parameter's shape sharing memory with
        fastbn's state (writes to them change the optimizer's state);
        ``step`` is a fresh 0-d float32 tensor.  A new mapping is built at
        each access: to replace state, use `load_state_dict`.
        """
        state: Dict[Tensor, Dict[str, Any]] = defaultdict(dict)
        if self.__dict__.get("_fastbn") is None:
            return state
        for slots in self._slots:
            for slot in slots:
                entry = self._fastbn.state.get(slot.parameter)
                if entry:
                    state[slot.tensor] = _to_torch_entry(entry, slot.order)
        return state

    @state.setter
    def state(self, value: Any) -> None:
        if value:
            raise AttributeError("state: fastbn.torch optimizers expose fastbn's state; "
                                 "replace it with load_state_dict")

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a param group (torch's rules); its parameters must be dense
        CPU float32/float64 tensors (TypeError/ValueError otherwise)."""
        group_count = len(self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            where = f"param_groups[{group_count}]"
            for key in _UNSUPPORTED_TRUE:
                _check_torch_option(group, key, f"{where}[{key!r}]")
            slots = [_Slot(tensor, f"{where}['params'][{position}]")
                     for position, tensor in enumerate(group["params"])]
            fast_group = self._fastbn_group(group, slots)
            if self._fastbn is None:
                self._pending_groups.append(fast_group)
            else:
                self._fastbn.add_param_group(fast_group)
        except Exception:
            self.param_groups.pop()
            raise
        self._slots.append(slots)

    def _fastbn_group(self, group: Dict[str, Any], slots: Sequence[_Slot]) -> Dict[str, Any]:
        fast_group = {key: _plain(group[key]) for key in self._hyperparameter_names()
                      if key in group}
        fast_group["params"] = [slot.parameter for slot in slots]
        return fast_group

    def __getstate__(self) -> Dict[str, Any]:
        # A pickled copy would hold copies of the parameters, detached from
        # the model's tensors; torch's own checkpoints go through state_dict.
        raise TypeError(f"{type(self).__name__}: fastbn.torch optimizers cannot be pickled or "
                        "deep-copied (their state views the model's tensors); save "
                        "optimizer.state_dict() and load it into a new optimizer instead")

    # section: step -------------------------------------------------------------

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """Update every parameter that has a gradient (in place, one fused
        kernel call per group and dtype).

        Hyperparameters are read from ``param_groups`` first, so schedulers
        and manual edits take effect.  Parameters whose ``grad`` is None are
        skipped.  Every gradient is checked before anything changes: a bad
        one raises TypeError/ValueError naming it and leaves every parameter
        and the state as they were.

        Parameters
        ----------
        closure : callable, optional
            Re-evaluates the model and returns the loss (run with grad
            enabled, as torch does).

        Returns
        -------
        The closure's return value, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sync_num_threads()
        names = self._hyperparameter_names()
        updated: List[Tensor] = []
        for index, (group, fast_group, slots) in enumerate(
                zip(self.param_groups, self._fastbn.param_groups, self._slots)):
            for key in names:
                if key in group:
                    fast_group[key] = _plain(group[key])
            for position, slot in enumerate(slots):
                self._refresh(slot, f"param_groups[{index}]['params'][{position}]")
                if slot.parameter.grad is not None:
                    updated.append(slot.tensor)
        self._fastbn.step()
        if updated:
            # The data changed behind autograd's back (through NumPy): bump
            # the version counters as an in-place torch op would, so that a
            # graph which saved a parameter before the step refuses to use it.
            torch.autograd.graph.increment_version(updated)
        return loss

    def _refresh(self, slot: _Slot, where: str) -> None:
        """Point `slot`'s fastbn Parameter at the tensor's current data and
        gradient (both may have been replaced since the last step)."""
        data = slot.tensor.detach()
        if data.device.type != "cpu" or data.dtype not in _DTYPES or data.layout != torch.strided:
            raise TypeError(f"{where}: expected a dense CPU float32/float64 tensor, got "
                            f"{_describe_param(data)} (its data was replaced)")
        order = _storage_order(data)
        if order != slot.order:
            self._move_state(slot, order)
        slot.parameter.data = _as_kernel_array(data, order)
        grad = slot.tensor.grad
        if grad is None:
            slot.parameter.grad = None
            return
        if grad.layout != torch.strided or grad.device.type != "cpu":
            raise TypeError(f"{where}.grad: expected a dense CPU tensor, got "
                            f"{_describe_param(grad)}")
        if grad.shape != data.shape:
            raise ValueError(f"{where}.grad: expected shape {tuple(data.shape)} (the parameter's), "
                             f"got {tuple(grad.shape)}")
        slot.parameter.grad = _as_kernel_array(grad, order)

    def _move_state(self, slot: _Slot, order: Optional[Tuple[int, ...]]) -> None:
        """The parameter's memory layout changed (e.g. ``model.to(
        memory_format=torch.channels_last)`` after the optimizer was built):
        re-lay its state arrays out the same way."""
        entry = self._fastbn.state.get(slot.parameter)
        for key, value in list((entry or {}).items()):
            if isinstance(value, np.ndarray):
                logical = _as_torch_layout(value, slot.order)
                moved = logical.permute(order) if order is not None else logical
                entry[key] = moved.contiguous().numpy().copy()
        slot.order = order

    # section: state dict -------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:  # type: ignore[override]
        """The state in torch.optim's layout (loads into the torch optimizer
        of the same name, and back).

        ``{"state": {index: {"step": 0-d float32 tensor, "exp_avg": tensor,
        ...}}, "param_groups": [{hyperparameters..., "params": [index, ...]}]}``
        with parameters numbered in group order from 0.  As in torch, the
        state tensors are the live state (they share memory with it), not
        copies; ``copy.deepcopy`` the dict to keep a snapshot.
        """
        index_of: Dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            packed = {key: value for key, value in group.items() if key != "params"}
            packed["params"] = [index_of.setdefault(id(tensor), len(index_of))
                                for tensor in group["params"]]
            groups.append(packed)
        state = {index_of[id(tensor)]: entry for tensor, entry in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:  # type: ignore[override]
        """Load a `state_dict` of this class or of the torch.optim optimizer
        of the same name.

        As torch does, floating state tensors are cast to their parameter's
        dtype, the saved hyperparameters replace the current ones, and a
        hyperparameter missing from the saved groups keeps its current value.
        Everything is checked before anything changes: TypeError/ValueError
        (naming the entry) leave the optimizer as it was.
        """
        if not isinstance(state_dict, dict):
            raise TypeError("state_dict: expected a dict with 'state' and 'param_groups' entries, "
                            f"got {type(state_dict).__name__}")
        if "param_groups" not in state_dict or "state" not in state_dict:
            raise ValueError("state_dict: expected a dict with 'state' and 'param_groups' entries, "
                             f"got keys {sorted(map(str, state_dict))}")
        saved_groups = state_dict["param_groups"]
        if not isinstance(saved_groups, (list, tuple)) or len(saved_groups) != len(self.param_groups):
            got = len(saved_groups) if isinstance(saved_groups, (list, tuple)) else saved_groups
            raise ValueError(f"state_dict['param_groups']: expected {len(self.param_groups)} "
                             f"groups (as this optimizer has), got {got!r}")
        slot_of: Dict[Any, _Slot] = {}
        new_groups, fast_groups = [], []
        for index, (saved, group, slots) in enumerate(zip(saved_groups, self.param_groups,
                                                          self._slots)):
            where = f"state_dict['param_groups'][{index}]"
            if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
                raise ValueError(f"{where}: expected a dict with a 'params' list")
            if len(saved["params"]) != len(slots):
                raise ValueError(f"{where}: expected {len(slots)} parameters (as this optimizer's "
                                 f"group {index} has), got {len(saved['params'])}")
            for saved_id, slot in zip(saved["params"], slots):
                slot_of[saved_id] = slot
            restored = dict(group)
            restored.update({key: value for key, value in saved.items() if key != "params"})
            restored["params"] = group["params"]
            for key in _UNSUPPORTED_TRUE:
                _check_torch_option(restored, key, f"{where}[{key!r}]")
            new_groups.append(restored)
            fast_group = self._fastbn_group(restored, ())
            fast_group["params"] = list(saved["params"])
            fast_groups.append(fast_group)
        fast_state = {}
        scalar_keys = ("step", self._fastbn_class._scalar_state)
        for saved_id, entry in state_dict["state"].items():
            slot = slot_of.get(saved_id)
            if slot is None or not isinstance(entry, dict):
                fast_state[saved_id] = entry  # fastbn's check names the problem
                continue
            fast_state[saved_id] = {
                key: _to_fastbn_value(value, key, slot, scalar_keys,
                                      f"state_dict['state'][{saved_id!r}][{key!r}]")
                for key, value in entry.items()}
        self._fastbn.load_state_dict({"state": fast_state, "param_groups": fast_groups})
        self.param_groups = new_groups


def _plain_dict(values: Dict[str, Any]) -> Dict[str, Any]:
    return {key: _plain(value) for key, value in values.items()}


def _check_torch_option(group: Dict[str, Any], key: str, name: str) -> None:
    if group.get(key, False):
        raise ValueError(f"{name}: expected False (fastbn's update runs outside autograd and "
                         f"on the CPU), got {group[key]!r}; use torch.optim for this option")


def _to_torch_entry(entry: Dict[str, Any], order: Optional[Tuple[int, ...]]) -> Dict[str, Any]:
    """fastbn's state entry in torch's layout: arrays as tensors of the
    parameter's shape sharing their memory, ``step`` a 0-d float32 tensor,
    other per-parameter floats (NAdam's ``mu_product``) 0-d float64 tensors."""
    converted = {}
    for key, value in entry.items():
        if key == "step":
            converted[key] = torch.tensor(float(value), dtype=torch.float32)
        elif isinstance(value, np.ndarray):
            converted[key] = _as_torch_layout(value, order)
        elif isinstance(value, (float, np.floating)):
            converted[key] = torch.tensor(float(value), dtype=torch.float64)
        else:
            converted[key] = value
    return converted


def _to_fastbn_value(value: Any, key: str, slot: _Slot, scalar_keys: Tuple[str, ...],
                     name: str) -> Any:
    """A saved state value as fastbn's check_state_dict takes it: a number
    for the `scalar_keys` (``step``, ``mu_product``), else an array of the
    parameter's shape and dtype (torch's rule) in the kernels' layout."""
    if not isinstance(value, Tensor):
        return value
    if key in scalar_keys:
        if value.numel() != 1:
            raise TypeError(f"{name}: expected a one-element tensor, got shape {tuple(value.shape)}")
        return value.item()
    shape = tuple(slot.tensor.shape)
    if tuple(value.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape} (the parameter's), got "
                         f"{tuple(value.shape)}")
    value = value.detach().cpu()
    if value.is_floating_point():
        value = value.to(slot.tensor.dtype)  # torch's rule: state takes its parameter's dtype
    return _as_kernel_array(value, slot.order)  # fastbn copies it into a fresh array


# section: the optimizers ---------------------------------------------------------------
# Each __init__ hands its own arguments to the base class (`_defaults`); the
# arguments every class shares are described in the module docstring.


def _defaults(arguments: Dict[str, Any]) -> Dict[str, Any]:
    """A constructor's arguments (its ``locals()`` on entry) as the
    optimizer's defaults: every argument but ``self`` and ``params``."""
    return {key: value for key, value in arguments.items()
            if key not in ("self", "params", "__class__")}


class SGD(_FastbnOptimizer):
    """`fastbn.optim.SGD` (torch.optim.SGD's update) for torch parameters.

    Parameters: lr, momentum, dampening, weight_decay, nesterov, maximize as
    torch.optim.SGD; params, foreach, fused and differentiable as every
    optimizer here (see `fastbn.torch.optim`).

    State: ``momentum_buffer`` (momentum != 0), as torch.
    """

    _fastbn_class = fastbn_optim.SGD

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 maximize: bool = False, foreach: Optional[bool] = None,
                 differentiable: bool = False, fused: Optional[bool] = None) -> None:
        super().__init__(params, _defaults(locals()))


class Momentum(_FastbnOptimizer):
    """`fastbn.optim.Momentum` (v = momentum * v + (1 - momentum) * g;
    param -= lr * v) for torch parameters.  torch has no such class: it
    equals ``torch.optim.SGD(lr=lr * (1 - momentum), momentum=momentum)``
    (dampening 0) up to rounding.

    Parameters: lr (default 1e-3), momentum in [0, 1) (default 0.9),
    weight_decay (default 0), maximize (default False); params as every
    optimizer here.

    State: ``momentum_buffer``.
    """

    _fastbn_class = fastbn_optim.Momentum

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.9,
                 weight_decay: float = 0.0, *, maximize: bool = False) -> None:
        super().__init__(params, _defaults(locals()))


class RMSprop(_FastbnOptimizer):
    """`fastbn.optim.RMSprop` (torch.optim.RMSprop's update) for torch parameters.

    Parameters: lr, alpha, eps, weight_decay, momentum, centered, maximize as
    torch.optim.RMSprop; params, foreach, capturable and differentiable as
    every optimizer here.

    State: ``step``, ``square_avg``, ``momentum_buffer`` (momentum > 0),
    ``grad_avg`` (centered), as torch.
    """

    _fastbn_class = fastbn_optim.RMSprop

    def __init__(self, params: Iterable, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False,
                 capturable: bool = False, foreach: Optional[bool] = None,
                 maximize: bool = False, differentiable: bool = False) -> None:
        super().__init__(params, _defaults(locals()))


class Adam(_FastbnOptimizer):
    """`fastbn.optim.Adam` (torch.optim.Adam's update) for torch parameters.

    Parameters: lr, betas, eps, weight_decay, amsgrad, maximize,
    decoupled_weight_decay as torch.optim.Adam; params, foreach, fused,
    capturable and differentiable as every optimizer here; and fastbn's
    bias_correction (default True; False gives the uncorrected textbook
    update).

    State: ``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``
    (amsgrad), as torch.
    """

    _fastbn_class = fastbn_optim.Adam

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *,
                 foreach: Optional[bool] = None, maximize: bool = False,
                 capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, decoupled_weight_decay: bool = False,
                 bias_correction: bool = True) -> None:
        super().__init__(params, _defaults(locals()))


class AdamW(Adam):
    """`fastbn.optim.AdamW` (torch.optim.AdamW's update) for torch parameters.
    Same parameters as `Adam` (without decoupled_weight_decay, always True),
    weight_decay defaulting to 1e-2."""

    _fastbn_class = fastbn_optim.AdamW

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, capturable: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None,
                 bias_correction: bool = True) -> None:
        super().__init__(params, **_defaults(locals()), decoupled_weight_decay=True)


class Adagrad(_FastbnOptimizer):
    """`fastbn.optim.Adagrad` (torch.optim.Adagrad's update) for torch parameters.

    Parameters: lr, lr_decay, weight_decay, initial_accumulator_value, eps,
    maximize as torch.optim.Adagrad; params, foreach, fused and
    differentiable as every optimizer here.

    State: ``step``, ``sum``, created at construction for every parameter
    (as torch does).
    """

    _fastbn_class = fastbn_optim.Adagrad

    def __init__(self, params: Iterable, lr: float = 1e-2, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0,
                 eps: float = 1e-10, foreach: Optional[bool] = None, *, maximize: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None) -> None:
        super().__init__(params, _defaults(locals()))


class NAdam(_FastbnOptimizer):
    """`fastbn.optim.NAdam` (torch.optim.NAdam's update) for torch parameters.

    Parameters: lr, betas, eps, weight_decay, momentum_decay,
    decoupled_weight_decay, maximize as torch.optim.NAdam; params, foreach,
    capturable and differentiable as every optimizer here.

    State: ``step``, ``mu_product`` (a 0-d float64 tensor; torch keeps it in
    its default dtype, float32 unless changed, so over many steps torch's
    float32 trajectory and this one differ by that rounding), ``exp_avg``,
    ``exp_avg_sq``, as torch.
    """

    _fastbn_class = fastbn_optim.NAdam

    def __init__(self, params: Iterable, lr: float = 2e-3,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum_decay: float = 4e-3,
                 decoupled_weight_decay: bool = False, *, foreach: Optional[bool] = None,
                 maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False) -> None:
        super().__init__(params, _defaults(locals()))


class RAdam(_FastbnOptimizer):
    """`fastbn.optim.RAdam` (torch.optim.RAdam's update) for torch parameters.

    Parameters: lr, betas, eps, weight_decay, decoupled_weight_decay,
    maximize as torch.optim.RAdam; params, foreach, capturable and
    differentiable as every optimizer here.

    State: ``step``, ``exp_avg``, ``exp_avg_sq``, as torch.
    """

    _fastbn_class = fastbn_optim.RAdam

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decoupled_weight_decay: bool = False, *,
                 foreach: Optional[bool] = None, maximize: bool = False,
                 capturable: bool = False, differentiable: bool = False) -> None:
        super().__init__(params, _defaults(locals()))


class Adadelta(_FastbnOptimizer):
    """`fastbn.optim.Adadelta` (torch.optim.Adadelta's update) for torch
    parameters.

    Parameters: lr, rho, eps, weight_decay, maximize as torch.optim.Adadelta;
    params, foreach, capturable and differentiable as every optimizer here.

    State: ``step``, ``square_avg``, ``acc_delta``, as torch.
    """

    _fastbn_class = fastbn_optim.Adadelta

    def __init__(self, params: Iterable, lr: float = 1.0, rho: float = 0.9, eps: float = 1e-6,
                 weight_decay: float = 0.0, foreach: Optional[bool] = None, *,
                 capturable: bool = False, maximize: bool = False,
                 differentiable: bool = False) -> None:
        super().__init__(params, _defaults(locals()))


class Adamax(_FastbnOptimizer):
    """`fastbn.optim.Adamax` (torch.optim.Adamax's update) for torch parameters.

    Parameters: lr, betas, eps, weight_decay, maximize as torch.optim.Adamax;
    params, foreach, capturable and differentiable as every optimizer here.

    State: ``step``, ``exp_avg``, ``exp_inf``, as torch.
    """

    _fastbn_class = fastbn_optim.Adamax

    def __init__(self, params: Iterable, lr: float = 2e-3,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, foreach: Optional[bool] = None, *,
                 maximize: bool = False, differentiable: bool = False,
                 capturable: bool = False) -> None:
        super().__init__(params, _defaults(locals()))


class Lion(_FastbnOptimizer):
    """`fastbn.optim.Lion` for torch parameters (torch has no Lion):
    c = beta1 * m + (1 - beta1) * g; param -= lr * (sign(c) + weight_decay *
    param); m = beta2 * m + (1 - beta2) * g.

    Parameters: lr (default 1e-4), betas (default (0.9, 0.99)), weight_decay
    (default 0, decoupled), maximize (default False); params as every
    optimizer here.

    State: ``exp_avg`` (m), as lion-pytorch.
    """

    _fastbn_class = fastbn_optim.Lion

    def __init__(self, params: Iterable, lr: float = 1e-4,
                 betas: Tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0, *,
                 maximize: bool = False) -> None:
        super().__init__(params, _defaults(locals()))
