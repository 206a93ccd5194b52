"""Optimizers with torch.optim's names, defaults and semantics, updated by
fused multi-tensor kernels (one call per param group and step).

>>> opt = fastbn.optim.Adam(model_params, lr=1e-3)
>>> opt.zero_grad(); ...backward...; opt.step()
"""
from .adadelta import Adadelta
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .adamax import Adamax
from .clip_grad import clip_grad_norm_
from .lion import Lion
from .nadam import NAdam
from .optimizer import Optimizer
from .radam import RAdam
from .rmsprop import RMSprop
from .sgd import SGD, Momentum
from . import lr_scheduler
from . import swa_utils
from .lr_range_test import lr_range_test

__all__ = ["Optimizer", "SGD", "Momentum", "RMSprop", "Adam", "AdamW", "Adagrad", "Lion",
           "NAdam", "RAdam", "Adadelta", "Adamax",
           "clip_grad_norm_", "lr_scheduler", "lr_range_test", "swa_utils"]
