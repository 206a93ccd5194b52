"""Weight averaging (torch.optim.swa_utils): `AveragedModel` keeps a running
average (SWA) or exponential moving average (EMA) of a model's weights,
`SWALR` anneals the learning rate to a constant for the averaging phase, and
`update_bn` recomputes the BatchNorm running statistics of the averaged model.

The averaging is one fused multi-tensor call per dtype over every parameter
(the optimizer kernels' ``lerp``: avg += w * (current - avg), torch.lerp's
form), so averaging a large model costs one pass over its weights.

>>> swa_model = AveragedModel(model)
>>> scheduler = SWALR(optimizer, swa_lr=0.05)
>>> for epoch in range(epochs):
...     train_one_epoch(model, optimizer)
...     if epoch >= swa_start:
...         swa_model.update_parameters(model)
...         scheduler.step()
>>> update_bn(loader, swa_model)
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Iterable, List, Optional, Sequence, Union

import numpy as np

from .._backend import current_kernels
from .._validation import FLOAT_DTYPES, check_int, check_range, describe
from ..nn.batchnorm import _BatchNorm
from ..nn.module import Module
from .lr_scheduler import LRScheduler, _as_lr, _per_group, _warn_get_lr_called_outside_step

__all__ = ["AveragedModel", "SWALR", "get_ema_multi_avg_fn", "get_swa_multi_avg_fn", "update_bn"]

MultiAvgFn = Callable[[List[np.ndarray], List[np.ndarray], int], None]


# section: averaging functions --------------------------------------------------

def _lerp(averages: Sequence[np.ndarray], currents: Sequence[np.ndarray], weight: float) -> None:
    """averages[i] += weight * (currents[i] - averages[i]) in place, all pairs
    in one call of the current kernels object (one kernel call per dtype on
    the fast backend)."""
    averages, currents = list(averages), list(currents)
    if len(averages) != len(currents):
        raise ValueError(f"current_param_list: expected {len(averages)} arrays (one per "
                         f"averaged array), got {len(currents)}")
    ready = []
    for index, (average, current) in enumerate(zip(averages, currents)):
        for name, array in (("averaged_param_list", average), ("current_param_list", current)):
            if not isinstance(array, np.ndarray):
                raise TypeError(f"{name}[{index}]: expected a numpy.ndarray, got {describe(array)}")
        if average.dtype not in FLOAT_DTYPES:
            raise TypeError(f"averaged_param_list[{index}]: expected dtype float32 or float64, "
                            f"got {average.dtype}")
        if current.dtype != average.dtype or current.shape != average.shape:
            raise ValueError(f"current_param_list[{index}]: expected dtype {average.dtype} and shape "
                             f"{average.shape} (the averaged array's), got {current.dtype} "
                             f"and {current.shape}")
        if not (average.flags.c_contiguous and average.flags.aligned and average.flags.writeable):
            raise ValueError(f"averaged_param_list[{index}]: expected a writeable, aligned, "
                             "C-contiguous array (updated in place)")
        ready.append(np.require(current, requirements=["C", "A"]))
    current_kernels().lerp_(averages, ready, float(weight))


def get_ema_multi_avg_fn(decay: float = 0.999) -> MultiAvgFn:
    """The EMA update for `AveragedModel`: avg = decay * avg + (1 - decay) * current.

    Parameters
    ----------
    decay : float, default 0.999, in [0, 1]

    Returns
    -------
    callable
        ``fn(averaged_param_list, current_param_list, num_averaged)``: updates
        the float32/float64 arrays of the first list in place (one fused
        call), computed as torch.lerp(avg, current, 1 - decay).
    """
    decay = check_range(decay, "decay", 0.0, 1.0)

    def ema_update(averaged_param_list: List[np.ndarray], current_param_list: List[np.ndarray],
                   num_averaged: int) -> None:
        _lerp(averaged_param_list, current_param_list, 1.0 - decay)

    return ema_update


def get_swa_multi_avg_fn() -> MultiAvgFn:
    """The SWA update for `AveragedModel` (its default): the running mean,
    avg += (current - avg) / (num_averaged + 1).

    Returns
    -------
    callable
        ``fn(averaged_param_list, current_param_list, num_averaged)``, as
        `get_ema_multi_avg_fn`'s, computed as torch.lerp(avg, current,
        1 / (num_averaged + 1)).
    """

    def swa_update(averaged_param_list: List[np.ndarray], current_param_list: List[np.ndarray],
                   num_averaged: int) -> None:
        _lerp(averaged_param_list, current_param_list, 1.0 / (int(num_averaged) + 1))

    return swa_update


# section: AveragedModel ------------------------------------------------------------

class AveragedModel(Module):
    """A copy of a fastbn model whose weights are an average of another model's.

    Parameters
    ----------
    model : fastbn.nn.Module
        Deep-copied; the copy (``self.module``) holds the averages.
    multi_avg_fn : callable, optional
        ``fn(averaged_list, current_list, num_averaged)`` updating the first
        list in place; default `get_swa_multi_avg_fn()` (the running mean).
        `get_ema_multi_avg_fn(decay)` gives an EMA.
    use_buffers : bool, default False
        True averages the floating-point buffers too (running statistics);
        False copies the model's buffers on every update.

    Attributes
    ----------
    module : Module
    n_averaged : ndarray (0-d int64 buffer)
        Updates so far; the first update copies the model's values.

    Notes
    -----
    As in torch, ``module(x)`` and the state-dict keys go through
    ``module.`` (``module.0.weight``, ``n_averaged``).  Integer buffers
    (``num_batches_tracked``) are copied from the model, never averaged.
    """

    def __init__(self, model: Module, multi_avg_fn: Optional[MultiAvgFn] = None,
                 use_buffers: bool = False) -> None:
        if not isinstance(model, Module):
            raise TypeError(f"model: expected a fastbn.nn.Module, got {describe(model)}")
        if multi_avg_fn is not None and not callable(multi_avg_fn):
            raise TypeError(f"multi_avg_fn: expected a function or None, got {describe(multi_avg_fn)}")
        if not isinstance(use_buffers, (bool, np.bool_)):
            raise TypeError(f"use_buffers: expected a bool, got {describe(use_buffers)}")
        super().__init__()
        self.module = copy.deepcopy(model)
        self.register_buffer("n_averaged", np.array(0, dtype=np.int64))
        object.__setattr__(self, "multi_avg_fn", multi_avg_fn)
        object.__setattr__(self, "use_buffers", bool(use_buffers))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, dy):
        return self.module.backward(dy)

    def _averaged_arrays(self, model: Module) -> List[tuple]:
        """(averaged array, model array, name) pairs, checked to match."""
        def arrays(source: Module):
            named = [(name, param.data) for name, param in source.named_parameters()]
            if self.use_buffers:
                named += [(name, buffer) for name, buffer in source.named_buffers()]
            return named

        mine, theirs = arrays(self.module), arrays(model)
        if len(mine) != len(theirs):
            raise ValueError(f"model: expected {len(mine)} parameters{' and buffers' if self.use_buffers else ''} "
                             f"(as the averaged model has), got {len(theirs)}")
        pairs = []
        for (name, average), (_, current) in zip(mine, theirs):
            if not isinstance(current, np.ndarray) or current.shape != average.shape \
                    or current.dtype != average.dtype:
                raise ValueError(f"model: {name}: expected an array of dtype {average.dtype} and shape "
                                 f"{average.shape} (the averaged model's), got {describe(current)}")
            pairs.append((average, current, name))
        return pairs

    def update_parameters(self, model: Module) -> None:
        """Fold `model`'s current weights into the average (the first call
        copies them), then count the update in ``n_averaged``.

        Raises
        ------
        TypeError, ValueError
            `model` is not a Module or its parameters (and buffers, with
            use_buffers) do not match the averaged model's in number, shape
            and dtype; nothing is changed then.
        """
        if not isinstance(model, Module):
            raise TypeError(f"model: expected a fastbn.nn.Module, got {describe(model)}")
        pairs = self._averaged_arrays(model)
        copied_buffers = []
        if not self.use_buffers:
            mine = list(self.module.buffers())
            theirs = list(model.buffers())
            if len(mine) != len(theirs) or any(a.shape != b.shape for a, b in zip(mine, theirs)):
                raise ValueError(f"model: expected {len(mine)} buffers shaped as the averaged "
                                 f"model's, got {len(theirs)}")
            copied_buffers = list(zip(mine, theirs))
        n_averaged = int(self.n_averaged)
        if n_averaged == 0:
            for average, current, _ in pairs:
                np.copyto(average, current)
        else:
            floating = [(a, c) for a, c, _ in pairs if a.dtype.kind == "f"]
            for average, current, _ in pairs:
                if average.dtype.kind != "f":
                    np.copyto(average, current)
            if floating:
                average_fn = self.multi_avg_fn if self.multi_avg_fn is not None else get_swa_multi_avg_fn()
                average_fn([a for a, _ in floating], [c for _, c in floating], n_averaged)
        for average, current in copied_buffers:
            np.copyto(average, current)
        self.n_averaged[...] = n_averaged + 1


# section: update_bn -------------------------------------------------------------------

def update_bn(loader: Iterable[Any], model: Module) -> None:
    """Recompute the running statistics of every BatchNorm layer of `model`
    from one pass over `loader`.

    The running statistics are reset and the momenta set to None (a
    cumulative average over the batches), the model runs in training mode
    on every batch (the first element when a batch is a list or tuple), then
    the momenta and the training mode are restored, also when the pass
    raises.  A model without BatchNorm layers is left alone.

    Parameters
    ----------
    loader : iterable
        Batches of inputs, or (input, target, ...) tuples.
    model : fastbn.nn.Module
    """
    if not isinstance(model, Module):
        raise TypeError(f"model: expected a fastbn.nn.Module, got {describe(model)}")
    layers = [module for module in model.modules() if isinstance(module, _BatchNorm)]
    if not layers:
        return
    momenta = [layer.momentum for layer in layers]
    was_training = model.training
    for layer in layers:
        layer.reset_running_stats()
    try:
        model.train()
        for layer in layers:
            layer.momentum = None
        for batch in loader:
            if isinstance(batch, (list, tuple)):
                batch = batch[0]
            model(batch)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.train(was_training)


# section: SWALR ------------------------------------------------------------------------

class SWALR(LRScheduler):
    """Anneal each group's lr to a constant `swa_lr` over `anneal_epochs`
    steps, then hold it (torch.optim.swa_utils.SWALR).

    At step k, t = clamp(k / max(1, anneal_epochs), 0, 1) and
    alpha = (1 - cos(pi t)) / 2 ('cos') or t ('linear');
    lr = swa_lr * alpha + lr0 * (1 - alpha), where lr0 is recovered from the
    current lr and the previous alpha (so changes made to the lr by other
    code are carried along, as in torch).

    Parameters
    ----------
    optimizer : Optimizer
    swa_lr : float or list of float
        One value for every group, or one per group (stored as
        ``group['swa_lr']``).
    anneal_epochs : int, default 10, >= 0
    anneal_strategy : {'cos', 'linear'}, default 'cos'
    last_epoch : int, default -1
    """

    def __init__(self, optimizer, swa_lr: Union[float, Sequence[float]], anneal_epochs: int = 10,
                 anneal_strategy: str = "cos", last_epoch: int = -1) -> None:
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy: expected 'cos' or 'linear', got {anneal_strategy!r}")
        self.anneal_epochs = check_int(anneal_epochs, "anneal_epochs", minimum=0)
        self._anneal_strategy = anneal_strategy
        self._swa_lr = swa_lr
        super().__init__(optimizer, last_epoch)

    def _attach(self, optimizer, last_epoch: int) -> None:
        # Inside the base class's undo-on-error guard, so a refused argument
        # leaves no 'swa_lr' behind in the groups.
        swa_lrs = _per_group("swa_lr", optimizer, self._swa_lr)
        del self._swa_lr
        for value, group in zip(swa_lrs, optimizer.param_groups):
            group["swa_lr"] = value
        super()._attach(optimizer, last_epoch)

    def _anneal(self, t: float) -> float:
        if self._anneal_strategy == "cos":
            return (1 - math.cos(math.pi * t)) / 2
        return t

    @staticmethod
    def _initial_lr(lr: float, swa_lr: float, alpha: float) -> float:
        if alpha == 1:
            return swa_lr
        return (lr - alpha * swa_lr) / (1 - alpha)

    def get_lr(self) -> List[float]:
        _warn_get_lr_called_outside_step(self)
        step = self._step_count - 1
        if self.anneal_epochs == 0:
            step = max(1, step)
        previous_alpha = self._anneal(max(0, min(1, (step - 1) / max(1, self.anneal_epochs))))
        alpha = self._anneal(max(0, min(1, step / max(1, self.anneal_epochs))))
        lrs = []
        for index, group in enumerate(self.optimizer.param_groups):
            swa_lr = _as_lr(group["swa_lr"], f"param_groups[{index}]['swa_lr']")
            lr0 = self._initial_lr(_as_lr(group["lr"], f"param_groups[{index}]['lr']"),
                                   swa_lr, previous_alpha)
            lrs.append(swa_lr * alpha + lr0 * (1 - alpha))
        return lrs
