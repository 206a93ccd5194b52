"""Failure-injection helpers: snapshot an object's full state, compare two
snapshots, and run a call with a failure injected at its k-th step.

Reusable by any test of the promise "an exception means nothing changed":

    before = snapshot(layer)
    with pytest.raises(ValueError):
        layer(x)
    assert_same_state(before, snapshot(layer))

``snapshot`` understands fastbn Modules (every parameter's data and grad, and
every registered buffer, None included), Parameters, ndarrays, and dicts /
lists / tuples of those (so an optimizer's ``state`` and ``param_groups`` can
be snapshotted with ``snapshot({"state": opt.state, "groups": opt.param_groups})``).

Two injectors:

- ``run_interrupted(fn, k)`` raises KeyboardInterrupt at the k-th trace event
  (call, line, return, C call, C return) of a frame in fastbn's own code,
  which is every point where a real Ctrl-C could surface and more (a real
  signal only surfaces at calls and loop back-edges);
  ``count_trace_events(fn)`` gives the number of such points.
- ``run_out_of_memory(fn, k, patches)`` makes the k-th function call made
  through the patched module attributes (a module's ``np``, a Cython
  bridge) raise MemoryError, as an allocation inside it would;
  ``count_library_calls(fn, patches)`` gives the number of such calls.
"""
from __future__ import annotations

import copy
import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterable

import numpy as np

import fastbn
from fastbn.nn import Module
from fastbn.parameter import Parameter

_FASTBN_DIR = os.path.dirname(fastbn.__file__) + os.sep


# ---- snapshots -----------------------------------------------------------------


def snapshot(obj):
    """A deep, comparable copy of `obj`'s state (see the module docstring)."""
    if isinstance(obj, Module):
        state = {}
        for prefix, module in obj.named_modules():
            dot = prefix + "." if prefix else ""
            for name, param in module._parameters.items():
                state[dot + name] = snapshot(param)
            for name, array in module._buffers.items():
                state[dot + name] = snapshot(array)
        return state
    if isinstance(obj, Parameter):
        return {"data": snapshot(obj.data), "grad": snapshot(obj.grad)}
    if isinstance(obj, np.ndarray):
        return ("ndarray", obj.dtype.str, obj.shape, obj.tobytes())
    if isinstance(obj, dict):
        return {key: snapshot(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(value) for value in obj)
    return copy.deepcopy(obj)


def assert_same_state(before, after, what: str = "state") -> None:
    """Bitwise equality of two snapshots, with the first difference named."""
    difference = _first_difference(before, after, what)
    assert difference is None, difference


def _first_difference(a, b, path):
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{path}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            found = _first_difference(a[key], b[key], f"{path}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and not (
            a and a[0] == "ndarray"):
        if len(a) != len(b):
            return f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{path}[{i}]")
            if found:
                return found
        return None
    if a != b:
        return f"{path}: {_show(a)} != {_show(b)}"
    return None


def _show(value):
    if isinstance(value, tuple) and value and value[0] == "ndarray":
        _, dtype, shape, data = value
        return repr(np.frombuffer(data, dtype).reshape(shape))
    return repr(value)


# ---- KeyboardInterrupt at every point ----------------------------------------------


@contextmanager
def _hooks(on_event: Callable[[], None]):
    """Call `on_event` at every trace and C-call event of fastbn's frames."""
    def in_fastbn(frame) -> bool:
        return frame.f_code.co_filename.startswith(_FASTBN_DIR)

    def local(frame, event, arg):
        on_event()
        return local

    def tracer(frame, event, arg):
        if not in_fastbn(frame):
            return None
        on_event()               # the 'call' event
        return local

    def profiler(frame, event, arg):
        if event in ("c_call", "c_return") and in_fastbn(frame):
            on_event()

    old_trace, old_profile = sys.gettrace(), sys.getprofile()
    sys.settrace(tracer)
    sys.setprofile(profiler)
    try:
        yield
    finally:
        sys.settrace(old_trace)
        sys.setprofile(old_profile)


def count_trace_events(fn: Callable[[], object]) -> int:
    """Number of points at which `run_interrupted` can interrupt `fn()`."""
    count = 0

    def on_event():
        nonlocal count
        count += 1
    with _hooks(on_event):
        fn()
    return count


def run_interrupted(fn: Callable[[], object], k: int) -> bool:
    """Run `fn()` with KeyboardInterrupt raised at its k-th event (0-based);
    True if it was interrupted."""
    seen = 0
    fired = False

    def on_event():
        nonlocal seen, fired
        if fired:
            return
        if seen == k:
            fired = True
            raise KeyboardInterrupt(f"injected at event {k}")
        seen += 1
    try:
        with _hooks(on_event):
            fn()
    except KeyboardInterrupt:
        if not fired:
            raise
        return True
    return False


# ---- MemoryError from the k-th library call ------------------------------------------


class _Countdown:
    def __init__(self, k: int) -> None:
        self.k = k
        self.calls = 0
        self.fired = False

    def tick(self, what: str) -> None:
        if self.calls == self.k:
            self.fired = True
            self.calls += 1
            raise MemoryError(f"injected at call {self.k} ({what})")
        self.calls += 1


class _Failing:
    """Stands in for a module attribute such as ``np`` or a Cython bridge:
    its functions are counted and the k-th call raises MemoryError before
    running; types, ufuncs and constants pass through."""

    def __init__(self, original, countdown: _Countdown) -> None:
        self._original = original
        self._countdown = countdown

    def __getattr__(self, name):
        value = getattr(self._original, name)
        if not callable(value) or isinstance(value, (type, np.ufunc)):
            return value
        countdown = self._countdown
        label = f"{getattr(self._original, '__name__', '?')}.{name}"

        def counted(*args, **kwargs):
            countdown.tick(label)
            return value(*args, **kwargs)
        return counted


def _with_failing(fn, patches: Iterable, k: int) -> _Countdown:
    countdown = _Countdown(k)
    patches = list(patches)
    saved = [getattr(module, attribute) for module, attribute in patches]
    for (module, attribute), original in zip(patches, saved):
        setattr(module, attribute, _Failing(original, countdown))
    try:
        fn()
    except MemoryError:
        if not countdown.fired:
            raise
    finally:
        for (module, attribute), original in zip(patches, saved):
            setattr(module, attribute, original)
    return countdown


def count_library_calls(fn: Callable[[], object], patches: Iterable) -> int:
    """Number of calls `fn()` makes through the patched attributes: `patches`
    is a list of (module, attribute name), e.g. ``[(fastbn.nn.linear, "np")]``."""
    return _with_failing(fn, patches, -1).calls


def run_out_of_memory(fn: Callable[[], object], k: int, patches: Iterable) -> bool:
    """Run `fn()` with its k-th call through `patches` raising MemoryError;
    True if it was raised."""
    return _with_failing(fn, patches, k).fired
