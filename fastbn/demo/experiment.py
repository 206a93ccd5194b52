"""The demo's experiments: which configurations run, the model, the training
loop and what is recorded per run.

Every run of one demo starts from the same initial weights (the model is
built from the same seed whatever the configuration; the BatchNorm layers
hold no random state) and sees the same batches in the same order, so two
runs differ only by the configuration.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .. import nn, optim
from ..optim import lr_scheduler
from .data import Dataset

__all__ = ["RunConfig", "RunResult", "OPTIMIZERS", "VARIANTS", "SCHEDULES", "build_configs", "make_mlp",
           "make_optimizer", "make_scheduler", "train_run"]

#: name -> (class, normal lr, high lr, lr sweep).  The normal lrs are the
#: usual defaults; every high lr is 30x the normal one.  Momentum is the
#: textbook form v = 0.9 v + 0.1 g, so its lr is 10x a torch SGD lr.
OPTIMIZERS: Dict[str, tuple] = {
    "Momentum": (optim.Momentum, 0.1, 3.0, (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)),
    "RMSprop": (optim.RMSprop, 1e-3, 3e-2, (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3)),
    "Adam": (optim.Adam, 1e-3, 3e-2, (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3)),
}
#: Variants of an optimizer above: name -> (optimizer, extra keyword
#: arguments).  They run at the optimizer's normal lr, constant schedule,
#: with and without BN, next to its float32 runs (not in the sweep or plots).
#: "Adam-bf16st": Adam keeping exp_avg and exp_avg_sq in bfloat16 with
#: stochastic rounding (needs ml_dtypes).
VARIANTS: Dict[str, tuple] = {
    "Adam-bf16st": ("Adam", dict(state_dtype="bfloat16")),
}
SCHEDULES = ("constant", "step", "exponential", "cyclical")
LR_LEVELS = ("normal", "high")


@dataclass(frozen=True)
class RunConfig:
    """One training run."""

    batch_norm: bool
    optimizer: str
    lr: float
    schedule: str = "constant"
    lr_level: str = ""          # 'normal', 'high', or '' for the sweep-only lrs

    @property
    def label(self) -> str:
        bn = "BN" if self.batch_norm else "no BN"
        return f"{bn}, {self.optimizer}, lr={self.lr:g}, {self.schedule}"


@dataclass
class RunResult:
    """What one run recorded.  Per-epoch lists have one entry per finished
    epoch (fewer than requested when the run diverged)."""

    config: RunConfig
    train_loss: List[float] = field(default_factory=list)   # mean batch loss of the epoch
    train_accuracy: List[float] = field(default_factory=list)
    test_accuracy: List[float] = field(default_factory=list)
    test_loss: List[float] = field(default_factory=list)
    lrs: List[float] = field(default_factory=list)           # lr of every optimizer step
    epochs_to_target: Optional[int] = None
    diverged: bool = False
    seconds: float = 0.0

    @property
    def final_train_accuracy(self) -> float:
        return self.train_accuracy[-1] if self.train_accuracy else float("nan")

    @property
    def final_test_accuracy(self) -> float:
        return self.test_accuracy[-1] if self.test_accuracy else float("nan")

    def as_dict(self) -> dict:
        data = asdict(self)
        data["config"]["label"] = self.config.label
        return data


def build_configs(mode: str = "default") -> List[RunConfig]:
    """The runs of a demo.

    'default': every optimizer with and without BN at its normal and high lr
    with a constant lr; the step, exponential and cyclical schedules at the
    normal lr; the lr sweep (constant lr) for the accuracy-vs-lr plot.
    'all': every schedule at both lrs, plus the sweep.
    'quick': one optimizer (Adam), both lrs, constant and cyclical, no sweep.
    """
    if mode not in ("default", "all", "quick"):
        raise ValueError(f"mode: expected 'default', 'all' or 'quick', got {mode!r}")
    configs: List[RunConfig] = []
    optimizers = ["Adam"] if mode == "quick" else list(OPTIMIZERS)
    for name in optimizers:
        _cls, normal, high, sweep = OPTIMIZERS[name]
        for batch_norm in (True, False):
            for level, lr in (("normal", normal), ("high", high)):
                if mode == "all":
                    schedules: Sequence[str] = SCHEDULES
                elif mode == "quick":
                    schedules = ("constant", "cyclical") if level == "normal" else ("constant",)
                else:
                    schedules = SCHEDULES if level == "normal" else ("constant",)
                configs += [RunConfig(batch_norm, name, lr, schedule, level) for schedule in schedules]
            if mode != "quick":
                configs += [RunConfig(batch_norm, name, lr, "constant")
                            for lr in sweep if lr not in (normal, high)]
    if mode != "quick":
        for variant, (base, _kwargs) in VARIANTS.items():
            if _variant_available(variant):
                configs += [RunConfig(batch_norm, variant, OPTIMIZERS[base][1], "constant", "normal")
                            for batch_norm in (True, False)]
    return configs


def _variant_available(name: str) -> bool:
    if VARIANTS[name][1].get("state_dtype") != "bfloat16":
        return True
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        return False
    return True


def make_mlp(num_features: int, num_classes: int, hidden: Sequence[int] = (128, 64), *,
             batch_norm: bool = True, seed: int = 0, dtype=np.float32) -> nn.Sequential:
    """Linear -> [BatchNorm1d] -> ReLU per hidden layer, then a Linear to the
    logits; He (Kaiming) initialization from `seed`, identical with and
    without BatchNorm."""
    rng = np.random.default_rng(seed)
    layers = []
    width = num_features
    for size in hidden:
        layers.append(nn.Linear(width, size, init="kaiming", rng=rng, dtype=dtype))
        if batch_norm:
            layers.append(nn.BatchNorm1d(size, dtype=dtype))
        layers.append(nn.ReLU())
        width = size
    layers.append(nn.Linear(width, num_classes, init="kaiming", rng=rng, dtype=dtype))
    return nn.Sequential(*layers)


def make_optimizer(name: str, params, lr: float):
    """The optimizer `name` (a key of OPTIMIZERS or VARIANTS) over `params`."""
    base, kwargs = VARIANTS.get(name, (name, {}))
    cls = OPTIMIZERS[base][0]
    return cls(params, lr=lr, **kwargs)


def make_scheduler(schedule: str, optimizer, lr: float, epochs: int, steps_per_epoch: int):
    """(scheduler or None, whether it steps every batch)."""
    if schedule == "constant":
        return None, False
    if schedule == "step":
        # /5 at 40 % and 80 % of training
        return lr_scheduler.StepLR(optimizer, step_size=max(1, round(0.4 * epochs)), gamma=0.2), False
    if schedule == "exponential":
        # the last epoch runs at 5 % of the initial lr
        gamma = 0.05 ** (1.0 / max(epochs - 1, 1))
        return lr_scheduler.ExponentialLR(optimizer, gamma=gamma), False
    if schedule == "cyclical":
        # Smith's triangular2: up and down between lr/10 and lr in 2 + 2
        # epochs, the amplitude halving every cycle
        return lr_scheduler.CyclicLR(optimizer, base_lr=lr / 10, max_lr=lr,
                                     step_size_up=2 * steps_per_epoch, mode="triangular2",
                                     cycle_momentum=False), True
    raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")


def _evaluate(model: nn.Sequential, criterion: nn.CrossEntropyLoss, x: np.ndarray,
              y: np.ndarray, batch_size: int = 1024):
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(y), batch_size):
        logits = model(x[start:start + batch_size])
        targets = y[start:start + batch_size]
        loss_sum += float(criterion(logits, targets)) * len(targets)
        correct += int((logits.argmax(axis=1) == targets).sum())
    return correct / len(y), loss_sum / len(y)


def train_run(config: RunConfig, dataset: Dataset, *, epochs: int, batch_size: int = 64,
              seed: int = 0, target_accuracy: float = 0.95, hidden: Sequence[int] = (128, 64),
              on_epoch: Optional[Callable[[int, float], None]] = None) -> RunResult:
    """Train one configuration and record its curves.

    The run stops early, flagged as diverged, when a batch loss is not finite.
    `on_epoch(epoch, train_loss)` is called after each epoch (progress bars).
    """
    dtype = dataset.x_train.dtype
    model = make_mlp(dataset.num_features, dataset.num_classes, hidden,
                     batch_norm=config.batch_norm, seed=seed, dtype=dtype)
    optimizer = make_optimizer(config.optimizer, model.parameters(), config.lr)
    n = len(dataset.y_train)
    steps_per_epoch = math.ceil(n / batch_size)
    scheduler, per_batch = make_scheduler(config.schedule, optimizer, config.lr, epochs,
                                          steps_per_epoch)
    criterion = nn.CrossEntropyLoss()
    order_rng = np.random.default_rng(seed + 1)
    result = RunResult(config)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = order_rng.permutation(n)
        loss_sum = 0.0
        for first in range(0, n, batch_size):
            batch = order[first:first + batch_size]
            if len(batch) < 2 and config.batch_norm:
                continue     # BatchNorm needs 2 samples per channel in training
            logits = model(dataset.x_train[batch])
            loss = float(criterion(logits, dataset.y_train[batch]))
            if not math.isfinite(loss):
                result.diverged = True
                break
            loss_sum += loss * len(batch)
            optimizer.zero_grad()
            model.backward(criterion.backward())
            result.lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if per_batch:
                scheduler.step()
        if scheduler is not None and not per_batch and not result.diverged:
            scheduler.step()
        # a diverged run still gets this last record: its (chance-level) accuracy
        result.train_loss.append(math.nan if result.diverged else loss_sum / n)
        train_accuracy, _ = _evaluate(model, criterion, dataset.x_train, dataset.y_train)
        test_accuracy, test_loss = _evaluate(model, criterion, dataset.x_test, dataset.y_test)
        result.train_accuracy.append(train_accuracy)
        result.test_accuracy.append(test_accuracy)
        result.test_loss.append(test_loss)
        if result.epochs_to_target is None and test_accuracy >= target_accuracy:
            result.epochs_to_target = epoch
        if on_epoch is not None:
            on_epoch(epoch, result.train_loss[-1])
        if result.diverged:
            break
    result.seconds = time.perf_counter() - start
    return result
