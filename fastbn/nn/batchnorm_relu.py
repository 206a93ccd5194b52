"""BatchNormReLU1d / 2d / 3d: batch norm followed by a ReLU, fused.

``nn.BatchNormReLU2d(C)`` computes exactly what
``nn.Sequential(nn.BatchNorm2d(C), nn.ReLU())`` computes, with the same
parameters, buffers and state_dict keys as the BatchNorm layer, in one pass:
the forward applies the ReLU in the normalization's store, and the backward
recomputes the ReLU mask from the saved input instead of keeping the output.
It saves a full read and write of the activation in each direction (see
the ``bn_relu_*`` against ``bn_then_relu_*`` cases of ``fastbn bench``).

A state_dict of ``Sequential(BatchNorm2d, ReLU)`` loads into it after
dropping the ReLU's index; `fastbn.nn.fold_batchnorm` folds a
Linear -> BatchNormReLU1d pair into a Linear followed by a ReLU.
"""
from __future__ import annotations

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d"]


class BatchNormReLU1d(BatchNorm1d):
    """``relu(BatchNorm1d(x))``, fused: input (N, C) or (N, C, L).
    Parameters, modes and state as `BatchNorm1d`; ``backward(dy)`` takes the
    gradient of the ReLU's output."""

    fused_relu = True


class BatchNormReLU2d(BatchNorm2d):
    """``relu(BatchNorm2d(x))``, fused: input (N, C, H, W) (or channels-last
    with ``axis=-1``).  Parameters, modes and state as `BatchNorm2d`."""

    fused_relu = True


class BatchNormReLU3d(BatchNorm3d):
    """``relu(BatchNorm3d(x))``, fused: input (N, C, D, H, W) (or
    channels-last with ``axis=-1``).  Parameters, modes and state as
    `BatchNorm3d`."""

    fused_relu = True
