"""fastbn: fast CPU batch normalization, fused optimizers and learning-rate
schedules for NumPy training code, with PyTorch's names and semantics.

Quick start::

    import numpy as np, fastbn
    x = np.random.rand(8, 16, 32, 32).astype(np.float32)
    y = fastbn.functional.batch_norm(x, running_mean, running_var, weight, bias)

Configuration: `show_config()`, `set_num_threads()`, `set_simd_target()`,
`use_backend("reference")`, `set_output_cache_bytes()` (the reuse of large
output buffers; see fastbn._output_cache).
"""
from ._version import __version__

try:
    from . import _core  # noqa: F401  (compiled extension)
except ImportError as error:  # pragma: no cover - depends on how fastbn was installed
    raise ImportError(
        "fastbn's compiled extensions are missing. If you are inside the fastbn source "
        "folder, you are importing the uncompiled sources: run from another directory after "
        "`pip install .`, or build in place with `python setup.py build_ext --inplace`."
    ) from error

from ._backend import get_backend, set_backend, use_backend
from ._config import (available_simd_targets, compiled_simd_targets, config_info,
                      get_num_threads, get_simd_target, get_user_num_threads,
                      set_num_threads, set_simd_target,
                      show_config, _select_initial_target)
from ._output_cache import (clear_output_cache, get_output_cache_bytes, output_cache_info,
                            set_output_cache_bytes)
from .parameter import Parameter
from .checkpoint import CheckpointError, load, load_into, save
from . import functional, reference
from . import nn
from .nn import BatchNorm1d, BatchNorm2d, BatchNorm3d
from . import optim, schedules

_select_initial_target()

__all__ = [
    "Parameter", "functional", "nn", "reference", "optim", "schedules",
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "save", "load", "load_into", "CheckpointError",
    "get_backend", "set_backend", "use_backend",
    "available_simd_targets", "compiled_simd_targets", "get_simd_target", "set_simd_target",
    "get_num_threads", "get_user_num_threads", "set_num_threads", "show_config", "config_info",
    "set_output_cache_bytes", "get_output_cache_bytes", "output_cache_info", "clear_output_cache",
]
