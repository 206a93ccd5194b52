"""fastbn's CPU kernels as a drop-in backend for PyTorch models.

One line for an existing model::

    import fastbn.torch
    fastbn.torch.convert(model, fuse_relu=True)   # in place; same parameters

or build with `fastbn.torch.BatchNorm2d` (a ``torch.nn.BatchNorm2d``) etc.
`fastbn.torch.optim` has the fused optimizers as ``torch.optim.Optimizer``
subclasses (``fastbn.torch.optim.Adam(model.parameters())``) and
`clip_grad_norm_` clips gradients with the fused norm kernel.
`SyncBatchNorm` and `convert_sync_batchnorm` synchronize batch statistics
over ``torch.distributed`` (gloo) for CPU tensors, which torch's own
SyncBatchNorm refuses.
The kernels are registered as torch custom ops (``torch.ops.fastbn.*``,
see `fastbn.torch._ops`), so autograd, ``torch.compile``, ``torch.export``
and ``torch.autograd.gradcheck`` work through them; plain eager calls of
the modules skip the op dispatch and run the same kernels directly
(bit-identical results, a fraction of the per-call cost).

Output buffers: the modules' large outputs (forward y, backward dx; 1 MiB
and more) are reused from a cache once every tensor that could see them is
gone, instead of page-faulting fresh memory in at every call; it is fastbn's
one output cache (the NumPy API uses it too) and keeps at most 256 MiB of
free buffers by default (`set_output_cache_bytes`, the same function as
``fastbn.set_output_cache_bytes``; 0 turns it off; or
``FASTBN_OUTPUT_CACHE_BYTES`` in the environment).

Threads: fastbn's kernels use ``torch.get_num_threads()`` threads unless a
count was set with `fastbn.set_num_threads`.  fastbn's OpenMP runtime and
torch's are separate; on a shared or loaded machine set
``OMP_WAIT_POLICY=passive`` in the environment before starting Python so
that idle workers sleep instead of spinning (measured in the README).

Requires torch (``pip install fastbn[torch]``); the rest of fastbn never
imports it.
"""
try:
    import torch  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("fastbn.torch needs PyTorch: pip install 'fastbn[torch]'") from error

from . import _ops  # noqa: F401  (registers torch.ops.fastbn.*)
from .batchnorm import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormReLU1d,
                        BatchNormReLU2d, BatchNormReLU3d)
from .clip_grad import clip_grad_norm_
from .convert import convert
from .._output_cache import get_output_cache_bytes, output_cache_info, set_output_cache_bytes
from .syncbatchnorm import SyncBatchNorm, SyncBatchNormReLU, convert_sync_batchnorm
from . import optim

_ops.sync_num_threads()

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormReLU1d",
           "BatchNormReLU2d", "BatchNormReLU3d", "SyncBatchNorm", "SyncBatchNormReLU",
           "convert", "convert_sync_batchnorm", "clip_grad_norm_", "optim",
           "set_output_cache_bytes", "get_output_cache_bytes", "output_cache_info"]
