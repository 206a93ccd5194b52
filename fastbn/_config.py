"""Threads, SIMD target and the configuration report (`show_config`)."""
from __future__ import annotations

import os
import platform
import sys
import warnings
from typing import Dict, List, Optional

import numpy as np

from . import _core
from ._validation import check_int

TARGET_NAMES = _core.TARGET_NAMES


# ---- SIMD targets ---------------------------------------------------------

def available_simd_targets() -> List[str]:
    """Targets this build contains AND this CPU can run, lowest first."""
    return [name for index, name in enumerate(TARGET_NAMES)
            if _core.target_compiled(index) and _core.cpu_supports(index)]


def compiled_simd_targets() -> List[str]:
    """Targets compiled into this build (some may not run on this CPU)."""
    return [name for index, name in enumerate(TARGET_NAMES) if _core.target_compiled(index)]


def get_simd_target() -> str:
    """The SIMD target every kernel call uses now."""
    return TARGET_NAMES[_core.get_target_index()]


def set_simd_target(name: str) -> None:
    """Force a SIMD target ("baseline", "avx2", "avx512") for every kernel.

    Raises ValueError for an unknown name or one this CPU/build cannot run
    (see `available_simd_targets()`).  Process-wide.
    """
    if name not in TARGET_NAMES:
        raise ValueError(f"simd target: expected one of {TARGET_NAMES}, got {name!r}")
    if name not in available_simd_targets():
        raise ValueError(
            f"simd target: {name!r} is not available on this machine "
            f"(available: {available_simd_targets()})")
    _core.set_target_index(TARGET_NAMES.index(name))


def _select_initial_target() -> None:
    """Best available target, or FASTBN_SIMD when it names a runnable one."""
    available = available_simd_targets()
    best = available[-1]
    requested = os.environ.get("FASTBN_SIMD", "").strip().lower()
    if requested:
        if requested not in TARGET_NAMES:
            warnings.warn(f"FASTBN_SIMD={requested!r} is not one of {TARGET_NAMES}; using {best!r}",
                          RuntimeWarning, stacklevel=3)
        elif requested not in available:
            warnings.warn(f"FASTBN_SIMD={requested!r} is not supported on this machine "
                          f"(available: {available}); using {best!r}", RuntimeWarning, stacklevel=3)
        else:
            best = requested
    _core.set_target_index(TARGET_NAMES.index(best))


# ---- threads --------------------------------------------------------------

# The count last given to set_num_threads (None: none in effect).  Kept apart
# from the core's limit, which integrations such as fastbn.torch also set
# (`_follow_num_threads`) without it counting as the user's choice.
_user_num_threads: Optional[int] = None


def set_num_threads(n: Optional[int]) -> None:
    """Use at most `n` threads in kernels (None restores the OpenMP default,
    i.e. OMP_NUM_THREADS or the number of cores).  threadpoolctl limits and
    OMP_NUM_THREADS still cap it."""
    global _user_num_threads
    if n is None:
        _core.set_user_threads(0)
        _user_num_threads = None
        return
    n = check_int(n, "n", minimum=1)
    _core.set_user_threads(n)
    _user_num_threads = n


def get_num_threads() -> int:
    """Threads the next kernel call in this thread may use (large inputs)."""
    return _core.num_threads()


def get_user_num_threads() -> Optional[int]:
    """The thread count set explicitly with `set_num_threads`, or None.

    None when `set_num_threads` was never called or was last called with
    None.  Integrations that pick a count themselves (fastbn.torch follows
    ``torch.get_num_threads()``) do so only while this is None, and their
    count is not reported here; `get_num_threads` gives the count in effect.

    Returns
    -------
    int or None
    """
    return _user_num_threads


def _follow_num_threads(n: int) -> None:
    """Limit kernels to `n` threads on behalf of an integration, unless the
    user chose a count (`get_user_num_threads` stays None)."""
    if _user_num_threads is None and _core.get_user_threads() != n:
        _core.set_user_threads(n)


# ---- report ---------------------------------------------------------------

def config_info() -> Dict[str, object]:
    from ._version import __version__
    return {
        "fastbn": __version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu": _cpu_name(),
        "simd_target": get_simd_target(),
        "simd_available": available_simd_targets(),
        "simd_compiled": compiled_simd_targets(),
        "openmp": _core.openmp_enabled(),
        "threads": get_num_threads(),
        "cpu_count": os.cpu_count(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "FASTBN_SIMD": os.environ.get("FASTBN_SIMD"),
        "backend": _backend_name(),
    }


def _backend_name() -> str:
    from ._backend import get_backend
    return get_backend()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def show_config(file=None) -> None:
    """Print version, SIMD targets, OpenMP status and thread count."""
    info = config_info()
    out = file or sys.stdout
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(value)
        elif isinstance(value, bool):
            value = "enabled" if value else "disabled (serial kernels)"
        print(f"{key:<{width}} : {value}", file=out)
