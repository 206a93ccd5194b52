"""`Sequential` (torch.nn.Sequential): modules applied in order, and their
backward passes in reverse order."""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterator, Union

from .._validation import describe
from .module import Module

__all__ = ["Sequential"]


class Sequential(Module):
    """A chain of modules.

    ``Sequential(m0, m1, ...)`` names the children "0", "1", ... (so the
    state_dict keys are torch's: "0.weight", "1.running_mean", ...);
    ``Sequential(OrderedDict(name=module, ...))`` uses the given names.

    ``forward(x)`` feeds x through every child; ``backward(dy)`` runs the
    children's backward passes in reverse order and returns the gradient of
    the input (parameter gradients accumulate in each ``param.grad``)::

        logits = model(x)
        loss = criterion(logits, y)
        optimizer.zero_grad()
        model.backward(criterion.backward())
        optimizer.step()
    """

    def __init__(self, *modules) -> None:
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], OrderedDict):
            for name, module in modules[0].items():
                self._check_module(name, module)
                self.add_module(name, module)
        else:
            for index, module in enumerate(modules):
                self._check_module(str(index), module)
                self.add_module(str(index), module)

    @staticmethod
    def _check_module(name, module) -> None:
        if not isinstance(module, Module):
            raise TypeError(f"Sequential: module {name!r}: expected a fastbn.nn.Module, "
                            f"got {describe(module)}")

    # ---- sequence protocol --------------------------------------------------

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def __getitem__(self, index: Union[int, slice]) -> Module:
        """A child by position, or a new Sequential of a slice (sharing the
        modules, keeping their names)."""
        items = list(self._modules.items())
        if isinstance(index, slice):
            return Sequential(OrderedDict(items[index]))
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"index: expected an int or a slice, got {describe(index)}")
        if not -len(items) <= index < len(items):
            raise IndexError(f"index {index} is out of range for a Sequential of {len(items)} modules")
        return items[index][1]

    def append(self, module: Module) -> "Sequential":
        """Add a module at the end (named by its position); returns self."""
        name = str(len(self._modules))
        self._check_module(name, module)
        self.add_module(name, module)
        return self

    # ---- passes -------------------------------------------------------------

    def forward(self, x):
        for module in self._modules.values():
            x = module(x)
        return x

    def backward(self, dy):
        for module in reversed(self._modules.values()):
            dy = module.backward(dy)
        return dy
