"""The backend seam: every public function asks `current_backend()` whether to
run the compiled kernels ("fast") or the pure-NumPy oracle ("reference").

The choice lives in a ContextVar, so `use_backend` in one thread (or asyncio
task) does not change what another thread runs.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

BACKENDS = ("fast", "reference")

_current = contextvars.ContextVar("fastbn_backend", default="fast")


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name: expected a backend name (a str, one of {BACKENDS}), "
                        f"got {type(name).__name__} {name!r}")
    if name not in BACKENDS:
        raise ValueError(f"name: expected a backend name, one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """Return the active backend name: "fast" (C kernels) or "reference" (NumPy)."""
    return _current.get()


def set_backend(name: str) -> None:
    """Select the backend for the current thread/context ("fast" or "reference").

    Raises
    ------
    TypeError
        `name` is not a str.
    ValueError
        `name` is not one of the backend names.
    """
    _current.set(_check_name(name))


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Context manager running the public API on the named backend.

    >>> with fastbn.use_backend("reference"):
    ...     y = fastbn.functional.batch_norm(x, mean, var)
    """
    token = _current.set(_check_name(name))
    try:
        yield name
    finally:
        _current.reset(token)


def is_reference() -> bool:
    return _current.get() == "reference"
