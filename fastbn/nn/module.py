"""`Module`: the base of fastbn's layers, with torch.nn.Module's names.

A module owns parameters (`fastbn.Parameter`), buffers (ndarrays that are
state but not trained, e.g. running statistics) and child modules.  Assigning
a Parameter or a Module to an attribute registers it (as in torch); buffers
are registered with `register_buffer`.  Registered values live in the
instance ``__dict__`` too, so reading ``self.weight`` costs a plain attribute
lookup on the per-call path.

There is no autograd: a layer's ``forward`` saves what its ``backward`` needs,
and ``backward(dy)`` returns the gradient of the input and ACCUMULATES the
parameters' gradients into ``param.grad`` (allocating it when None), as
``loss.backward()`` does in torch.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np

from .._validation import describe
from ..parameter import Parameter

__all__ = ["Module", "IncompatibleKeys"]


class IncompatibleKeys(NamedTuple):
    """What `Module.load_state_dict(strict=False)` did not match (torch's name)."""
    missing_keys: List[str]
    unexpected_keys: List[str]


class Module:
    """Base class of layers: parameters, buffers, children, train/eval mode,
    ``state_dict``/``load_state_dict``.

    Subclasses implement ``forward(x)`` (called by ``module(x)``) and
    ``backward(dy)``.
    """

    training: bool

    def __init__(self) -> None:
        set_attribute = object.__setattr__
        set_attribute(self, "training", True)
        set_attribute(self, "_parameters", OrderedDict())
        set_attribute(self, "_buffers", OrderedDict())
        set_attribute(self, "_modules", OrderedDict())

    # ---- registration -----------------------------------------------------

    def __setattr__(self, name: str, value) -> None:
        registries = self.__dict__.get("_parameters")
        if registries is None:
            raise AttributeError(
                f"cannot assign {name!r} before Module.__init__() is called")
        parameters, buffers, modules = self._parameters, self._buffers, self._modules
        if isinstance(value, Parameter):
            buffers.pop(name, None)
            modules.pop(name, None)
            parameters[name] = value
        elif isinstance(value, Module):
            parameters.pop(name, None)
            buffers.pop(name, None)
            modules[name] = value
        elif name in parameters:
            if value is not None:
                raise TypeError(f"{name}: expected a fastbn.Parameter or None for a registered "
                                f"parameter, got {describe(value)}")
            parameters[name] = None
        elif name in buffers:
            if value is not None and not isinstance(value, np.ndarray):
                raise TypeError(f"{name}: expected an ndarray or None for a registered buffer, "
                                f"got {describe(value)}")
            buffers[name] = value
        elif name in modules:
            if value is not None:
                raise TypeError(f"{name}: expected a fastbn.nn.Module or None for a registered "
                                f"submodule, got {describe(value)}")
            modules[name] = None
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        for registry in (self._parameters, self._buffers, self._modules):
            registry.pop(name, None)
        object.__delattr__(self, name)

    def register_parameter(self, name: str, param: Optional[Parameter]) -> None:
        """Register `param` (a Parameter, or None for an absent one) as `name`."""
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"{name}: expected a fastbn.Parameter or None, got {describe(param)}")
        self._check_new_name(name, self._parameters)
        self._parameters[name] = param
        object.__setattr__(self, name, param)

    def register_buffer(self, name: str, array: Optional[np.ndarray]) -> None:
        """Register `array` (state that is saved but not trained, or None) as `name`."""
        if array is not None and not isinstance(array, np.ndarray):
            raise TypeError(f"{name}: expected an ndarray or None, got {describe(array)}")
        self._check_new_name(name, self._buffers)
        self._buffers[name] = array
        object.__setattr__(self, name, array)

    def add_module(self, name: str, module: Optional["Module"]) -> None:
        """Register a child module (or None) as `name`."""
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"{name}: expected a fastbn.nn.Module or None, got {describe(module)}")
        self._check_new_name(name, self._modules)
        self._modules[name] = module
        object.__setattr__(self, name, module)

    def _check_new_name(self, name: str, registry: dict) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"name: expected a non-empty string without '.', got {name!r}")
        if name not in registry and hasattr(self, name):
            raise ValueError(f"name: attribute {name!r} already exists")

    # ---- calling ------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        """Compute the output (and save what `backward` needs)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forward()")

    def backward(self, dy):
        """Gradient of the input for the last forward; accumulates parameter grads."""
        raise NotImplementedError(f"{type(self).__name__} does not implement backward()")

    # ---- mode ---------------------------------------------------------------

    def train(self, mode: bool = True) -> "Module":
        """Set training mode (True) or evaluation mode (False) here and in
        every child; returns self."""
        if not isinstance(mode, bool):
            raise TypeError(f"mode: expected a bool, got {describe(mode)}")
        for module in self.modules():
            object.__setattr__(module, "training", mode)
        return self

    def eval(self) -> "Module":
        """Evaluation mode (``train(False)``); returns self."""
        return self.train(False)

    # ---- traversal ----------------------------------------------------------

    def named_children(self) -> Iterator[Tuple[str, "Module"]]:
        for name, module in self._modules.items():
            if module is not None:
                yield name, module

    def children(self) -> Iterator["Module"]:
        for _, module in self.named_children():
            yield module

    def named_modules(self, prefix: str = "") -> Iterator[Tuple[str, "Module"]]:
        """This module and every descendant, depth first, with dotted names."""
        yield prefix, self
        for name, module in self.named_children():
            yield from module.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator["Module"]:
        for _, module in self.named_modules():
            yield module

    def named_parameters(self, prefix: str = "", recurse: bool = True
                         ) -> Iterator[Tuple[str, Parameter]]:
        """(dotted name, Parameter) pairs; absent (None) parameters are skipped
        and a parameter shared by two modules is yielded once."""
        seen = set()
        modules = self.named_modules(prefix) if recurse else iter([(prefix, self)])
        for module_prefix, module in modules:
            for name, param in module._parameters.items():
                if param is None or id(param) in seen:
                    continue
                seen.add(id(param))
                yield (f"{module_prefix}.{name}" if module_prefix else name), param

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        """Every Parameter (for an optimizer: ``SGD(model.parameters(), lr)``)."""
        for _, param in self.named_parameters(recurse=recurse):
            yield param

    def named_buffers(self, prefix: str = "", recurse: bool = True
                      ) -> Iterator[Tuple[str, np.ndarray]]:
        modules = self.named_modules(prefix) if recurse else iter([(prefix, self)])
        for module_prefix, module in modules:
            for name, array in module._buffers.items():
                if array is not None:
                    yield (f"{module_prefix}.{name}" if module_prefix else name), array

    def buffers(self, recurse: bool = True) -> Iterator[np.ndarray]:
        for _, array in self.named_buffers(recurse=recurse):
            yield array

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every parameter's gradient (to None, or to zeros in place)."""
        for param in self.parameters():
            param.zero_grad(set_to_none)

    # ---- state ----------------------------------------------------------------

    def state_dict(self, destination: Optional[Dict] = None, prefix: str = "") -> "OrderedDict":
        """Parameters (their ``.data``) and buffers by dotted name, in torch's
        order (a module's parameters, then its buffers, then its children).

        The arrays are the module's own (not copies), as torch's tensors
        share storage; copy them to snapshot.
        """
        if destination is None:
            destination = OrderedDict()
        for name, param in self._parameters.items():
            if param is not None:
                destination[prefix + name] = param.data
        for name, array in self._buffers.items():
            if array is not None:
                destination[prefix + name] = array
        for name, module in self.named_children():
            module.state_dict(destination, prefix + name + ".")
        return destination

    def _state_targets(self) -> "OrderedDict":
        """name -> the ndarray a loaded value is copied into."""
        return self.state_dict()

    def _optional_state_keys(self) -> Tuple[str, ...]:
        """Local state keys that may be missing from a loaded state dict (the
        current value is kept); e.g. BatchNorm's num_batches_tracked, which
        older torch checkpoints lack."""
        return ()

    def load_state_dict(self, state_dict, strict: bool = True) -> IncompatibleKeys:
        """Copy values into the module's arrays in place.

        Accepts a fastbn or a torch ``state_dict`` converted with
        ``{k: v.numpy() for k, v in sd.items()}``.  Everything is validated
        (including that each target array is writeable) before anything is
        copied, so a failed load changes nothing; an exception during the
        copy itself (KeyboardInterrupt) restores the old values, which costs
        a temporary copy of the module's state.

        Raises
        ------
        ValueError
            Missing or unexpected keys (with ``strict=True``), wrong shapes,
            non-numeric values, integer values out of the target's range, a
            read-only target array (each naming the key).
        TypeError
            A float array of a different dtype than the module's (no silent
            casts), or a non-integer value for an integer buffer.
        """
        if not hasattr(state_dict, "keys") or not hasattr(state_dict, "__getitem__"):
            raise TypeError(f"state_dict: expected a mapping of names to arrays, "
                            f"got {describe(state_dict)}")
        targets = self._state_targets()
        optional = {prefix + key for prefix, module in self._named_module_prefixes()
                    for key in module._optional_state_keys()}
        missing = [key for key in targets if key not in state_dict and key not in optional]
        unexpected = [key for key in state_dict.keys() if key not in targets]
        if strict and (missing or unexpected):
            problems = []
            if missing:
                problems.append("missing key(s): " + ", ".join(repr(k) for k in missing))
            if unexpected:
                problems.append("unexpected key(s): " + ", ".join(repr(k) for k in unexpected))
            raise ValueError(f"state_dict: cannot load into {type(self).__name__}: "
                             + "; ".join(problems))
        loads = []
        for key, target in targets.items():
            if key not in state_dict:
                continue
            loads.append((target, _checked_state_value(key, state_dict[key], target)))
        # every value is known to fit; the old values are kept so that an
        # exception while copying (a KeyboardInterrupt, say) puts them back
        backups = [target.copy() for target, _ in loads]
        try:
            for target, value in loads:
                target[...] = value
        except BaseException:
            for (target, _), old in zip(loads, backups):
                target[...] = old
            raise
        return IncompatibleKeys(missing, unexpected)

    def _named_module_prefixes(self) -> Iterator[Tuple[str, "Module"]]:
        for name, module in self.named_modules():
            yield (name + "." if name else ""), module

    # ---- printing ---------------------------------------------------------------

    def extra_repr(self) -> str:
        """The constructor arguments shown by repr(); subclasses override."""
        return ""

    def __repr__(self) -> str:
        children = [f"({name}): " + repr(module).replace("\n", "\n  ")
                    for name, module in self.named_children()]
        if not children:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = ([self.extra_repr()] if self.extra_repr() else []) + children
        return f"{type(self).__name__}(\n  " + "\n  ".join(lines) + "\n)"


def _checked_state_value(key: str, value, target: np.ndarray) -> np.ndarray:
    """`value` as an array that can be copied into `target` without a cast
    that changes precision: same shape; same float dtype for float targets;
    any integer dtype for integer targets (counters)."""
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"state_dict[{key!r}]: expected a numeric array, got "
                         f"{describe(value)} ({error})") from None
    if type(array) is not np.ndarray:   # np.matrix and other subclasses
        array = array.view(np.ndarray)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"state_dict[{key!r}]: expected a numeric array, got {describe(value)}")
    if array.shape != target.shape:
        raise ValueError(f"state_dict[{key!r}]: expected shape {target.shape}, "
                         f"got {array.shape}")
    if target.dtype.kind == "f":
        # equality ignores nothing: a byte-swapped float array is refused too
        if array.dtype != target.dtype:
            raise TypeError(f"state_dict[{key!r}]: expected dtype {target.dtype} (the module's), "
                            f"got {array.dtype}; convert it with .astype(np.{target.dtype}) "
                            "or build the module with that dtype")
    elif array.dtype.kind not in "iu":
        raise TypeError(f"state_dict[{key!r}]: expected an integer array, got dtype {array.dtype}")
    elif not np.can_cast(array.dtype, target.dtype, casting="safe"):
        info = np.iinfo(target.dtype)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise ValueError(f"state_dict[{key!r}]: expected integers in [{info.min}, {info.max}] "
                             f"(the range of {target.dtype}), got {array.min()}..{array.max()}")
    if not target.flags.writeable:
        raise ValueError(f"state_dict[{key!r}]: cannot load into the module's array, which is "
                         "read-only (loading copies in place)")
    return array


def accumulate_grads(updates) -> None:
    """Add fresh gradients to their parameters' ``grad`` (or make them the
    grad where it is None), all or nothing.

    Parameters
    ----------
    updates : list of (Parameter, ndarray)
        IN.  Each fresh gradient has the parameter's shape and dtype and is
        owned by the caller (it may become ``param.grad``); every existing
        grad has already been checked (`check_grad_target`).

    Any exception while writing (a KeyboardInterrupt) undoes the writes made
    so far.  The largest in-place add runs last and needs no backup: once it
    has run, nothing is left to fail.
    """
    adds = sorted(((param, fresh) for param, fresh in updates if param.grad is not None),
                  key=lambda pair: pair[1].size)
    adopts = [(param, fresh) for param, fresh in updates if param.grad is None]
    last = adds.pop() if adds else None
    backups = [param.grad.copy() for param, _ in adds]
    try:
        for param, fresh in adds:
            param.grad += fresh
        for param, fresh in adopts:
            param.grad = fresh
        if last is not None:
            last[0].grad += last[1]
    except BaseException:
        for param, _ in adopts:
            param.grad = None
        for (param, _), old in zip(adds, backups):
            param.grad[...] = old
        raise
