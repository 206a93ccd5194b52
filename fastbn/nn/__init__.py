"""Layers with torch.nn's names and semantics (NumPy in, NumPy out, explicit
``backward``)."""
from .module import IncompatibleKeys, Module
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["Module", "IncompatibleKeys", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]
