"""`convert`: switch a torch model's BatchNorm layers to fastbn's, in place."""
from __future__ import annotations

from torch import nn

from .batchnorm import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormReLU1d,
                        BatchNormReLU2d, BatchNormReLU3d)

__all__ = ["convert"]

_FAST_CLASS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d,
               nn.BatchNorm3d: BatchNorm3d}
_FUSED_CLASS = {BatchNorm1d: BatchNormReLU1d, BatchNorm2d: BatchNormReLU2d,
                BatchNorm3d: BatchNormReLU3d}


def convert(module: nn.Module, *, fuse_relu: bool = False) -> nn.Module:
    """Make every ``torch.nn.BatchNorm1d/2d/3d`` in `module` run on fastbn.

    Each layer is converted in place by changing its class to the matching
    `fastbn.torch.BatchNorm1d/2d/3d` (a subclass of torch's): the layer
    object, its parameters, buffers, hooks and attributes are the SAME
    objects as before, so an optimizer built on ``model.parameters()``
    keeps working and the state_dict is unchanged.  Only layers whose type
    is exactly torch's class are converted (subclasses such as
    ``SyncBatchNorm`` or user subclasses are left alone).

    Parameters
    ----------
    module : torch.nn.Module
        IN-OUT.  The model (it may itself be a BatchNorm layer).
    fuse_relu : bool, keyword-only
        Also fuse each BatchNorm that is directly followed by a
        ``torch.nn.ReLU`` in an ``nn.Sequential``: the BatchNorm becomes
        `BatchNormReLU1d/2d/3d` and the ReLU's slot becomes ``nn.Identity``
        (neither holds state, so the state_dict keys do not change).

    Returns
    -------
    torch.nn.Module
        `module` itself.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    for layer in module.modules():
        fast_class = _FAST_CLASS.get(type(layer))
        if fast_class is not None:
            layer.__class__ = fast_class
    if fuse_relu:
        for container in module.modules():
            if isinstance(container, nn.Sequential):
                _fuse_in_sequential(container)
    return module


def _fuse_in_sequential(sequential: nn.Sequential) -> None:
    names = list(sequential._modules)
    for name, next_name in zip(names, names[1:]):
        layer, following = sequential._modules[name], sequential._modules[next_name]
        fused_class = _FUSED_CLASS.get(type(layer))
        if fused_class is not None and type(following) is nn.ReLU:
            layer.__class__ = fused_class
            sequential._modules[next_name] = nn.Identity()
