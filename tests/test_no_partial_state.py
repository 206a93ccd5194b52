"""Failure injection for the layers: whatever fails, and wherever, the full
state (parameters, grads, running statistics, counters) is unchanged after
the exception, or (a KeyboardInterrupt after the call's commit point) fully
updated, exactly as a clean call leaves it.

Injected failures: a read-only buffer (each written buffer in turn), a bad
state entry, a MemoryError from every NumPy call and every bridge call on
the path (the output cache's allocation included, on outputs of 1 MiB and
more that take it), and a KeyboardInterrupt at every trace event of
fastbn's code.
"""
from __future__ import annotations

import gc
import importlib

import numpy as np
import pytest

import fastbn
import fastbn.nn as nn
from fastbn import _output_cache
from _one_rank_comm import OneRankComm  # noqa: E402
from _state_snapshot import (assert_same_state, count_library_calls, count_trace_events,
                             run_interrupted, run_out_of_memory, snapshot)

BACKENDS = ("fast", "reference")

# NumPy (and the bridge) as seen by the code under test; fastbn._output_cache:
# the bridge and the SyncBatchNorm pipeline allocate their outputs through its
# new_array (bound at their import, so it is reached through its ``np``)
_MODULES = ["fastbn.nn.batchnorm", "fastbn.nn.linear", "fastbn.nn.module", "fastbn._validation",
            "fastbn._bn_validation", "fastbn.reference._kernels", "fastbn.nn.syncbatchnorm",
            "fastbn.distributed._pipeline", "fastbn.distributed._comm", "fastbn._output_cache"]


class _ActiveKernels:
    """The active kernels object (the bridge on the fast backend) as an
    attribute, so that the injection can wrap it like a module's ``np``."""

    @property
    def kernels(self):
        return fastbn._backend.current_kernels()

    @kernels.setter
    def kernels(self, value):
        fastbn._backend._current.set(value)


PATCHES = [(importlib.import_module(name), "np") for name in _MODULES] + [
    (_ActiveKernels(), "kernels")]


# ---- the layers and calls under test -----------------------------------------------

# float32 activations of (2, 3, 192, 240): 1.05 MiB, outputs that come from the
# output cache
LARGE_SPATIAL = (192, 240)


def _bn_case(kind: str, momentum=0.1, large=False):
    rng = np.random.default_rng(7)
    spatial = LARGE_SPATIAL if large else (2, 3)
    if kind == "BatchNorm1d":
        layer, shape = nn.BatchNorm1d(3, momentum=momentum), (5, 3)
    elif kind == "BatchNorm2d":
        layer, shape = nn.BatchNorm2d(3, momentum=momentum), (2, 3) + spatial
    elif kind == "BatchNorm2d-channels-last":
        layer, shape = nn.BatchNorm2d(3, momentum=momentum, axis=-1), (2,) + spatial + (3,)
    else:
        layer, shape = nn.BatchNormReLU2d(3, momentum=momentum), (2, 3) + spatial
    layer.weight.data[...] = rng.uniform(0.5, 1.5, 3)
    layer.bias.data[...] = rng.uniform(-0.5, 0.5, 3)
    for _ in range(2):   # non-trivial running statistics and count
        layer(rng.standard_normal(shape).astype(np.float32))
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    return layer, x, dy


BN_KINDS = ("BatchNorm1d", "BatchNorm2d", "BatchNorm2d-channels-last", "BatchNormReLU2d")
# op name -> (prepare(layer, x, dy, grads), call(layer, x, dy))
#   grads: "none" (backward creates them) or "existing" (backward adds to them)


def _prepare_backward(mode):
    def prepare(layer, x, dy, grads):
        layer.train(mode == "train")
        layer(x)
        if grads == "existing":
            layer.weight.grad = np.full(3, 0.25, np.float32)
            layer.bias.grad = np.full(3, -0.5, np.float32)
        else:
            layer.zero_grad()
    return prepare


def _prepare_forward(mode):
    def prepare(layer, x, dy, grads):
        layer.train(mode == "train")
    return prepare


BN_OPS = {
    "train_forward": (_prepare_forward("train"), lambda layer, x, dy: layer(x)),
    "eval_forward": (_prepare_forward("eval"), lambda layer, x, dy: layer(x)),
    "train_backward": (_prepare_backward("train"), lambda layer, x, dy: layer.backward(dy)),
    "eval_backward": (_prepare_backward("eval"), lambda layer, x, dy: layer.backward(dy)),
}


def _bn_setup(kind, op, grads, momentum=0.1, large=False):
    layer, x, dy = _bn_case(kind, momentum, large)
    prepare, call = BN_OPS[op]
    prepare(layer, x, dy, grads)
    return layer, (lambda target: call(target, x, dy))


def _linear_setup(op, grads):
    rng = np.random.default_rng(3)
    layer = nn.Linear(4, 3, rng=rng)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    dy = rng.standard_normal((5, 3)).astype(np.float32)
    if op == "forward":
        return layer, (lambda target: target(x))
    layer(x)
    if grads == "existing":
        layer.weight.grad = np.full((3, 4), 0.25, np.float32)
        layer.bias.grad = np.full(3, -0.5, np.float32)
    return layer, (lambda target: target.backward(dy))


def _model():
    rng = np.random.default_rng(11)
    return nn.Sequential(nn.Linear(4, 3, rng=rng), nn.BatchNorm1d(3), nn.ReLU(),
                         nn.Linear(3, 2, rng=rng))


def _new_state():
    """A valid state dict with every value different from _model()'s."""
    state = {key: np.asarray(value).copy() for key, value in _model().state_dict().items()}
    for key, value in state.items():
        value += 1 if value.dtype.kind == "f" else 5
    return state


def _load_setup():
    state = _new_state()
    return _model(), (lambda target: target.load_state_dict(state))


SETUPS = {}
for _kind in BN_KINDS:
    for _op in BN_OPS:
        for _grads in (("none", "existing") if "backward" in _op else ("none",)):
            SETUPS[f"{_kind}-{_op}-grads_{_grads}"] = (
                lambda kind=_kind, op=_op, grads=_grads: _bn_setup(kind, op, grads))
SETUPS["BatchNorm1d-momentum_None-train_forward"] = lambda: _bn_setup(
    "BatchNorm1d", "train_forward", "none", momentum=None)
for _op in ("forward", "backward"):
    for _grads in (("none", "existing") if _op == "backward" else ("none",)):
        SETUPS[f"Linear-{_op}-grads_{_grads}"] = (
            lambda op=_op, grads=_grads: _linear_setup(op, grads))
SETUPS["Module.load_state_dict"] = _load_setup




def _collective(call):
    """A SyncBatchNorm call: a rank's local failure (its checks, its
    statistics or sums) reaches every rank as a ValueError whose cause is
    the local error; the injected MemoryError is re-raised from it."""
    def run(target):
        try:
            return call(target)
        except ValueError as error:
            if isinstance(error.__cause__, MemoryError):
                raise error.__cause__
            raise
    return run


def _sync_setup(op, grads, momentum=0.1, axis=1, large=False):
    """SyncBatchNorm over a 1-rank stand-in: the same promise as the local
    layers (its running statistics, counter and grads are written by Python
    after the exchange, not by one kernel call)."""
    rng = np.random.default_rng(7)
    layer = nn.SyncBatchNorm(3, momentum=momentum, axis=axis, comm=OneRankComm())
    spatial = LARGE_SPATIAL if large else (2, 3)
    shape = (2, 3) + spatial if axis == 1 else (2,) + spatial + (3,)
    layer.weight.data[...] = rng.uniform(0.5, 1.5, 3)
    layer.bias.data[...] = rng.uniform(-0.5, 0.5, 3)
    for _ in range(2):
        layer(rng.standard_normal(shape).astype(np.float32))
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    prepare, call = BN_OPS[op]
    prepare(layer, x, dy, grads)
    return layer, _collective(lambda target: call(target, x, dy))


SETUPS["SyncBatchNorm-train_forward"] = lambda: _sync_setup("train_forward", "none")
SETUPS["SyncBatchNorm-momentum_None-train_forward"] = lambda: _sync_setup(
    "train_forward", "none", momentum=None)
SETUPS["SyncBatchNorm-channels-last-train_forward"] = lambda: _sync_setup(
    "train_forward", "none", axis=-1)
for _grads in ("none", "existing"):
    SETUPS[f"SyncBatchNorm-train_backward-grads_{_grads}"] = (
        lambda grads=_grads: _sync_setup("train_backward", grads))


# Outputs of 1 MiB and more, which the bridge and the pipeline take from the
# output cache: only for the MemoryError test (the KeyboardInterrupt test runs
# a setup per trace event, and the cached path adds no state of the layer)
LARGE_SETUPS = {}
for _kind in ("BatchNorm2d", "BatchNorm2d-channels-last", "BatchNormReLU2d"):
    for _op in BN_OPS:
        _grads = "existing" if "backward" in _op else "none"
        LARGE_SETUPS[f"large-{_kind}-{_op}-grads_{_grads}"] = (
            lambda kind=_kind, op=_op, grads=_grads: _bn_setup(kind, op, grads, large=True))
for _axis in (1, -1):
    LARGE_SETUPS[f"large-SyncBatchNorm-axis{_axis}-train_forward"] = (
        lambda axis=_axis: _sync_setup("train_forward", "none", axis=axis, large=True))
    LARGE_SETUPS[f"large-SyncBatchNorm-axis{_axis}-train_backward-grads_existing"] = (
        lambda axis=_axis: _sync_setup("train_backward", "existing", axis=axis, large=True))


@pytest.fixture(params=BACKENDS)
def backend(request):
    with fastbn.use_backend(request.param):
        yield request.param


def _expected_after(setup):
    """(state before, state after a clean call) of a fresh setup."""
    layer, call = setup()
    before = snapshot(layer)
    call(layer)
    return before, snapshot(layer)


# ---- KeyboardInterrupt at every trace event --------------------------------------------


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_keyboard_interrupt_anywhere_leaves_state_unchanged_or_complete(name, backend):
    setup = SETUPS[name]
    before, after = _expected_after(setup)
    layer, call = setup()
    points = count_trace_events(lambda: call(layer))
    assert points > 5      # the hooks see the call path
    outcomes = {"unchanged": 0, "complete": 0}
    for k in range(points):
        layer, call = setup()
        assert run_interrupted(lambda: call(layer), k), f"event {k} was not reached"
        state = snapshot(layer)
        if state == before:
            outcomes["unchanged"] += 1
        else:
            assert_same_state(after, state, f"{name}, interrupted at event {k}")
            outcomes["complete"] += 1
    assert outcomes["unchanged"] > 0


# ---- MemoryError from every NumPy and bridge call ---------------------------------------


@pytest.mark.parametrize("name", sorted(SETUPS) + sorted(LARGE_SETUPS))
def test_memory_error_anywhere_leaves_state_unchanged(name, backend):
    setup = SETUPS.get(name) or LARGE_SETUPS[name]
    layer, call = setup()
    calls = count_library_calls(lambda: call(layer), PATCHES)
    # Linear's forward allocates only through ufuncs (matmul), not patched
    assert calls > 0 or name == "Linear-forward-grads_none"
    if name in LARGE_SETUPS and backend == "fast":
        # the output comes through the cache: its allocation is among the calls
        layer, call = setup()
        assert count_library_calls(lambda: call(layer), [(_output_cache, "np")]) > 0
    _assert_every_memory_error_leaves_state(name, setup, calls)
    # the cache's books still balance: what it counts as kept is what it keeps
    gc.collect()
    info = _output_cache.output_cache_info()
    free = _output_cache._cache.free
    assert info["retained"] == sum(key[0] * len(entries) for key, entries in free.items())
    assert info["buffers"] == sum(len(entries) for entries in free.values())
    assert info["retained"] <= info["cap"]


def _assert_every_memory_error_leaves_state(name, setup, calls):
    for k in range(calls):
        layer, call = setup()
        before = snapshot(layer)
        assert run_out_of_memory(lambda: call(layer), k, PATCHES)
        assert_same_state(before, snapshot(layer), f"{name}, MemoryError at call {k}")


@pytest.mark.parametrize("name", sorted(LARGE_SETUPS))
def test_memory_error_with_the_cache_off_leaves_state_unchanged(name):
    # large outputs are then allocated at a chosen page offset
    # (_output_cache.placed_array), outside the cache
    setup = LARGE_SETUPS[name]
    previous = fastbn.get_output_cache_bytes()
    fastbn.set_output_cache_bytes(0)
    try:
        layer, call = setup()
        assert count_library_calls(lambda: call(layer), [(_output_cache, "np")]) > 0
        layer, call = setup()
        calls = count_library_calls(lambda: call(layer), PATCHES)
        _assert_every_memory_error_leaves_state(name, setup, calls)
    finally:
        fastbn.set_output_cache_bytes(previous)


# ---- a read-only buffer, each written buffer in turn ---------------------------------------

TRAIN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.mark.parametrize("kind", BN_KINDS)
@pytest.mark.parametrize("buffer", TRAIN_BUFFERS)
def test_read_only_buffer_fails_training_forward_before_any_write(kind, buffer, backend):
    layer, call = _bn_setup(kind, "train_forward", "none")
    getattr(layer, buffer).flags.writeable = False
    before = snapshot(layer)
    with pytest.raises(ValueError, match=f"{buffer}: expected a writeable array"):
        call(layer)
    assert_same_state(before, snapshot(layer))


@pytest.mark.parametrize("kind", BN_KINDS)
@pytest.mark.parametrize("mode", ("train", "eval"))
@pytest.mark.parametrize("param", ("weight", "bias"))
def test_read_only_grad_fails_bn_backward_before_any_write(kind, mode, param, backend):
    layer, call = _bn_setup(kind, f"{mode}_backward", "existing")
    getattr(layer, param).grad.flags.writeable = False
    before = snapshot(layer)
    with pytest.raises(ValueError, match=f"{param}.grad: expected a writeable array"):
        call(layer)
    assert_same_state(before, snapshot(layer))


@pytest.mark.parametrize("param", ("weight", "bias"))
def test_read_only_grad_fails_linear_backward_before_any_write(param, backend):
    layer, call = _linear_setup("backward", "existing")
    getattr(layer, param).grad.flags.writeable = False
    before = snapshot(layer)
    with pytest.raises(ValueError, match=f"{param}.grad: expected a writeable array"):
        call(layer)
    assert_same_state(before, snapshot(layer))


@pytest.mark.parametrize("key", sorted(_model().state_dict()))
def test_read_only_target_fails_load_state_dict_naming_the_key(key):
    model = _model()
    model.state_dict()[key].flags.writeable = False
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"state_dict\['{key}'\].*read-only"):
        model.load_state_dict(_new_state())
    assert_same_state(before, snapshot(model))


# ---- a bad state entry ------------------------------------------------------------------

BAD_GRADS = {
    "float64": (lambda grad: grad.astype(np.float64), TypeError, "dtype float32"),
    "wrong shape": (lambda grad: np.zeros(grad.size + 1, grad.dtype), ValueError, "shape"),
}


@pytest.mark.parametrize("kind", BN_KINDS)
@pytest.mark.parametrize("param", ("weight", "bias"))
@pytest.mark.parametrize("bad", sorted(BAD_GRADS))
def test_bad_grad_fails_bn_backward_before_any_write(kind, param, bad, backend):
    make_bad, error, message = BAD_GRADS[bad]
    layer, call = _bn_setup(kind, "train_backward", "existing")
    target = getattr(layer, param)
    target.grad = make_bad(target.grad)
    before = snapshot(layer)
    with pytest.raises(error, match=f"{param}.grad.*{message}"):
        call(layer)
    assert_same_state(before, snapshot(layer))


@pytest.mark.parametrize("param", ("weight", "bias"))
@pytest.mark.parametrize("bad", sorted(BAD_GRADS))
def test_bad_grad_fails_linear_backward_before_any_write(param, bad, backend):
    make_bad, error, message = BAD_GRADS[bad]
    layer, call = _linear_setup("backward", "existing")
    target = getattr(layer, param)
    target.grad = make_bad(target.grad) if bad == "float64" else np.zeros(
        target.data.shape[:-1] + (target.data.shape[-1] + 1,), np.float32)
    before = snapshot(layer)
    with pytest.raises(error, match=f"{param}.grad.*{message}"):
        call(layer)
    assert_same_state(before, snapshot(layer))


BAD_COUNTERS = {
    "float counter": (np.array(2.0), TypeError, "integer"),
    "1-d counter": (np.array([2]), TypeError, "0-d"),
    "byte-swapped": (np.array(2, ">i8" if np.little_endian else "<i8"), TypeError, "native"),
}


@pytest.mark.parametrize("bad", sorted(BAD_COUNTERS))
def test_bad_counter_fails_training_forward_before_any_write(bad, backend):
    value, error, message = BAD_COUNTERS[bad]
    layer, call = _bn_setup("BatchNorm2d", "train_forward", "none")
    layer.num_batches_tracked = value
    before = snapshot(layer)
    with pytest.raises(error, match=f"num_batches_tracked.*{message}"):
        call(layer)
    assert_same_state(before, snapshot(layer))


def _bad_entries(key, value):
    yield "wrong shape", np.zeros(value.shape + (2,), value.dtype), ValueError
    yield "non-numeric", np.array(["a"] * max(value.size, 1)).reshape(value.shape), ValueError
    if value.dtype.kind == "f":
        yield "other float dtype", value.astype(np.float64), TypeError
    else:
        yield "out of int64 range", np.array(2 ** 63, np.uint64), ValueError


@pytest.mark.parametrize("key", sorted(_model().state_dict()))
def test_bad_entry_fails_load_state_dict_naming_the_key(key):
    model = _model()
    before = snapshot(model)
    for what, value, error in _bad_entries(key, model.state_dict()[key]):
        state = _new_state()
        state[key] = value
        with pytest.raises(error, match=rf"state_dict\['{key}'\]"):
            model.load_state_dict(state)
        assert_same_state(before, snapshot(model), f"{key}: {what}")
