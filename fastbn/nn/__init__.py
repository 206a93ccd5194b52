"""Layers with torch.nn's names and semantics (NumPy in, NumPy out, explicit
``backward``)."""
from .module import IncompatibleKeys, Module
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .batchnorm_relu import BatchNormReLU1d, BatchNormReLU2d, BatchNormReLU3d
from .syncbatchnorm import SyncBatchNorm
from . import init
from .linear import Linear
from .activation import ReLU
from .dropout import Dropout
from .flatten import Flatten
from .container import Sequential
from .loss import CrossEntropyLoss, MSELoss
from .fold import fold_batchnorm

__all__ = ["Module", "IncompatibleKeys", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
           "BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d", "SyncBatchNorm",
           "init", "Linear", "ReLU", "Dropout", "Flatten", "Sequential", "CrossEntropyLoss",
           "MSELoss", "fold_batchnorm"]
