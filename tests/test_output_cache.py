"""The NumPy API and the output-buffer cache (fastbn/_output_cache.py): the
outputs the batch-norm kernels allocate (forward y, backward dx) of 1 MiB
and more come from the cache, for the functional API, the layers,
SyncBatchNorm and bfloat16 alike.  Checked here:

- an output still visible (the array, a view, slice or reshape of it, or
  another layer's saved input) is never handed out again: its values stay
  and later outputs get other memory;
- once nothing sees it, the next call of the same size reuses it;
- the results are the same bits with the cache on and off (the cache filled
  with NaN buffers first) and match the NumPy reference backend;
- smaller outputs and ``out=`` bypass the cache; the cap holds, 0 releases
  everything; the environment variables set the initial cap;
- an exception during a call (a bad argument, a MemoryError in the cache's
  allocation) changes no running statistic or grad and loses or corrupts no
  buffer of the cache.

fastbn.torch's side of the same cache: tests/test_torch_output_cache.py."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import types

import numpy as np
import pytest

import fastbn
import fastbn.nn as nn
from fastbn import _output_cache
from fastbn import functional as F
from _one_rank_comm import OneRankComm  # noqa: E402
from _state_snapshot import assert_same_state, snapshot  # noqa: E402

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastbn.__file__)))
MIB = 2**20
CHANNELS = 8
# float32 outputs of 1.125 MiB (just over the cache's minimum; float64: 2.25 MiB)
SHAPES = {1: (4, CHANNELS, 96, 96), -1: (4, 96, 96, CHANNELS)}
SHAPE_1D = (36864, CHANNELS)
# float32 tolerances of the other fast-vs-reference tests (tests/conftest.py)
TOLERANCE = {np.dtype(np.float32): dict(rtol=2e-5, atol=2e-5),
             np.dtype(np.float64): dict(rtol=1e-12, atol=1e-12)}

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # the bfloat16 tests skip
    BF16 = None
needs_bf16 = pytest.mark.skipif(BF16 is None, reason="needs ml_dtypes")
# bfloat16 outputs of 1.125 MiB
BF16_SHAPE = (8, CHANNELS, 96, 96)


@pytest.fixture
def cache():
    """The cache on, empty, with a 64 MiB cap; the previous cap restored."""
    previous = fastbn.get_output_cache_bytes()
    gc.collect()
    fastbn.clear_output_cache()
    fastbn.set_output_cache_bytes(64 * MIB)
    try:
        yield _output_cache
    finally:
        gc.collect()
        fastbn.set_output_cache_bytes(previous)
        fastbn.clear_output_cache()


def address(array):
    return array.__array_interface__["data"][0]


def buffer_of(array):
    """The first page of an array's memory: a cache buffer is handed out at
    one of a few offsets within that page (where its inputs allow)."""
    return address(array) // 4096


def is_leased(array):
    """The array's memory is a cache buffer (its base chain ends at a lease)."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, _output_cache._Lease)


def info():
    return fastbn.output_cache_info()


def make_data(seed, dtype=np.float32, shape=SHAPES[1], axis=1):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 1.5 + 0.25).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    vector_dtype = np.float32 if dtype == BF16 else dtype
    channels = shape[axis]
    params = {
        "weight": (rng.random(channels) + 0.5).astype(vector_dtype),
        "bias": rng.standard_normal(channels).astype(vector_dtype),
        "running_mean": (rng.standard_normal(channels) * 0.1).astype(vector_dtype),
        "running_var": (rng.random(channels) + 0.5).astype(vector_dtype),
    }
    return x, dy, params


# Every functional call that allocates a large output, as
# name -> call(x, dy, params, axis, out) returning the allocated output
# (params' running statistics are updated by the training calls).


def _train_stats(x, params, axis, relu=False):
    forward = F.batch_norm_relu_forward_train if relu else F.batch_norm_forward_train
    # out= given: this helper's forward does not touch the cache
    _, mean, invstd = forward(x, params["weight"], params["bias"], axis=axis,
                              out=np.empty_like(x))
    return mean, invstd


CALLS = {
    "batch_norm-train": lambda x, dy, p, axis, out: F.batch_norm(
        x, p["running_mean"], p["running_var"], p["weight"], p["bias"], training=True,
        axis=axis, out=out),
    "batch_norm-eval": lambda x, dy, p, axis, out: F.batch_norm(
        x, p["running_mean"], p["running_var"], p["weight"], p["bias"], training=False,
        axis=axis, out=out),
    "batch_norm_forward_train": lambda x, dy, p, axis, out: F.batch_norm_forward_train(
        x, p["weight"], p["bias"], axis=axis, out=out, running_mean=p["running_mean"],
        running_var=p["running_var"])[0],
    "batch_norm_backward": lambda x, dy, p, axis, out: F.batch_norm_backward(
        dy, x, *_train_stats(x, p, axis), p["weight"], axis=axis, out=out)[0],
    "batch_norm_backward_eval": lambda x, dy, p, axis, out: F.batch_norm_backward_eval(
        dy, x, p["running_mean"], p["running_var"], p["weight"], axis=axis, out=out)[0],
    "batch_norm_relu-train": lambda x, dy, p, axis, out: F.batch_norm_relu(
        x, p["running_mean"], p["running_var"], p["weight"], p["bias"], training=True,
        axis=axis, out=out),
    "batch_norm_relu-eval": lambda x, dy, p, axis, out: F.batch_norm_relu(
        x, p["running_mean"], p["running_var"], p["weight"], p["bias"], axis=axis, out=out),
    "batch_norm_relu_forward_train": lambda x, dy, p, axis, out:
        F.batch_norm_relu_forward_train(x, p["weight"], p["bias"], axis=axis, out=out)[0],
    "batch_norm_relu_backward": lambda x, dy, p, axis, out: F.batch_norm_relu_backward(
        dy, x, *_train_stats(x, p, axis, relu=True), p["weight"], p["bias"], axis=axis,
        out=out)[0],
    "batch_norm_relu_backward_eval": lambda x, dy, p, axis, out:
        F.batch_norm_relu_backward_eval(dy, x, p["running_mean"], p["running_var"],
                                        p["weight"], p["bias"], axis=axis, out=out)[0],
    "batch_norm_apply": lambda x, dy, p, axis, out: F.batch_norm_apply(
        x, *_train_stats(x, p, axis), p["weight"], p["bias"], axis=axis, out=out),
}


def run(name, seed, dtype=np.float32, axis=1, out=None, shape=None):
    x, dy, params = make_data(seed, dtype, shape or SHAPES[axis], axis)
    return CALLS[name](x, dy, params, axis, out)


# section: functional API: held outputs are kept, dropped ones reused -----------------


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("name", sorted(CALLS))
def test_functional_output_comes_from_the_cache_and_is_reused_once_dropped(cache, name, axis):
    y = run(name, 0, axis=axis)
    assert is_leased(y) and not y.flags.owndata
    assert y.flags.c_contiguous and y.flags.writeable and y.flags.aligned
    # on a cache-line boundary, so the kernels' vector stores are aligned
    # (where it sits in its page against the inputs: the tests of
    # page_offset_for below)
    assert address(y) % 64 == 0
    first = buffer_of(y)
    before = info()
    del y
    assert info()["buffers"] == before["buffers"] + 1
    y = run(name, 1, axis=axis)
    # the same buffer (its page offset follows this call's inputs)
    assert buffer_of(y) == first
    after = info()
    assert after["hits"] == before["hits"] + 1
    assert after["misses"] == before["misses"]
    # and the reused buffer holds this call's result, not the last one's
    assert np.array_equal(y, _without_cache(lambda: run(name, 1, axis=axis)))


def _without_cache(fn):
    previous = fastbn.get_output_cache_bytes()
    fastbn.set_output_cache_bytes(0)
    try:
        result = fn()
        assert not is_leased(result)
        return result
    finally:
        fastbn.set_output_cache_bytes(previous)


def _holders(y):
    """Ways to keep an output's memory visible after `del y`: (kept object,
    function reading the memory from it).  The functions must not see y."""
    dtype, shape = y.dtype, y.shape
    return {
        "array": (y, lambda held: held),
        "slice": (y[1:, 2], lambda held: held),
        "strided view": (y[:, ::3], lambda held: held),
        "reshape": (y.reshape(shape[0], -1), lambda held: held),
        "dtype view": (y.view(np.uint8), lambda held: held.view(dtype).reshape(shape)),
        "memoryview": (memoryview(y), lambda held: np.asarray(held)),
        "frombuffer": (np.frombuffer(y, dtype), lambda held: held.reshape(shape)),
    }


@pytest.mark.parametrize("holder", sorted(_holders(np.zeros((2, 3, 4)))))
@pytest.mark.parametrize("name", ["batch_norm-train", "batch_norm_backward",
                                  "batch_norm_relu-eval"])
def test_functional_output_still_visible_is_never_handed_out_again(cache, name, holder):
    y = run(name, 0)
    assert is_leased(y)
    first = buffer_of(y)
    held, read = _holders(y)[holder]
    kept = read(held).copy()
    del y
    others = [run(name, seed) for seed in range(1, 4)]
    assert all(buffer_of(other) != first for other in others)
    del others
    assert info()["buffers"] == 3
    for seed in range(4, 7):
        other = run(name, seed)  # each reuses a buffer an earlier one gave back
        assert buffer_of(other) != first
        del other
    assert np.array_equal(read(held), kept)
    del held
    gc.collect()
    assert info()["buffers"] == 4  # the held buffer went back once unseen
    outputs = [run(name, seed) for seed in range(7, 11)]
    assert first in {buffer_of(y) for y in outputs}
    assert info()["hits"] >= 7


def test_output_fed_to_the_next_call_as_out_or_input_is_not_reused(cache):
    y = run("batch_norm-train", 0)
    first = buffer_of(y)
    _, _, params = make_data(1)
    z = F.batch_norm(y, params["running_mean"], params["running_var"], training=True)
    assert buffer_of(z) != first
    kept = y.copy()
    view = y[:2]
    del y
    w = F.batch_norm(view, None, None, training=True)  # smaller than 1 MiB: plain
    assert w.flags.owndata
    assert np.array_equal(view, kept[:2])


# section: the layers -------------------------------------------------------------------


def make_layer(kind, axis=1, relu=False, dtype=np.float32):
    rng = np.random.default_rng(11)
    if kind == "BatchNorm1d":
        layer = (nn.BatchNormReLU1d if relu else nn.BatchNorm1d)(CHANNELS, dtype=dtype)
    elif kind == "SyncBatchNorm":
        layer = nn.SyncBatchNorm(CHANNELS, axis=axis, comm=OneRankComm(), dtype=dtype)
    else:
        layer = (nn.BatchNormReLU2d if relu else nn.BatchNorm2d)(CHANNELS, axis=axis,
                                                                 dtype=dtype)
    layer.weight.data[...] = rng.uniform(0.5, 1.5, CHANNELS)
    layer.bias.data[...] = rng.uniform(-0.5, 0.5, CHANNELS)
    return layer


LAYERS = {  # name -> (kind, axis, relu, input shape)
    "BatchNorm2d": ("BatchNorm2d", 1, False, SHAPES[1]),
    "BatchNorm2d-channels-last": ("BatchNorm2d", -1, False, SHAPES[-1]),
    "BatchNormReLU2d": ("BatchNorm2d", 1, True, SHAPES[1]),
    "BatchNorm1d": ("BatchNorm1d", 1, False, SHAPE_1D),
    "SyncBatchNorm": ("SyncBatchNorm", 1, False, SHAPES[1]),
    "SyncBatchNorm-channels-last": ("SyncBatchNorm", -1, False, SHAPES[-1]),
}


def layer_case(name, dtype=np.float32):
    kind, axis, relu, shape = LAYERS[name]
    if dtype == BF16 and shape != SHAPE_1D:
        shape = (2 * shape[0],) + shape[1:]
    return make_layer(kind, axis, relu), shape


def layer_step(layer, shape, seed, dtype=np.float32, training=True):
    """One forward and backward: (y, dx)."""
    layer.train(training)
    x, dy, _ = make_data(seed, dtype, shape)
    y = layer(x)
    return y, layer.backward(dy)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_outputs_come_from_the_cache_and_are_reused_once_dropped(cache, name):
    layer, shape = layer_case(name)
    y, dx = layer_step(layer, shape, 0)
    assert is_leased(y) and is_leased(dx)
    addresses = {buffer_of(y), buffer_of(dx)}
    assert len(addresses) == 2
    before = info()
    del y, dx
    assert info()["buffers"] == before["buffers"] + 2
    y, dx = layer_step(layer, shape, 1)
    assert {buffer_of(y), buffer_of(dx)} == addresses
    assert info()["hits"] == before["hits"] + 2
    layer.eval()
    del y
    y = layer(make_data(2, shape=shape)[0])
    assert buffer_of(y) in addresses


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_outputs_still_visible_are_never_handed_out_again(cache, name):
    layer, shape = layer_case(name)
    y, dx = layer_step(layer, shape, 0)
    y_view, dx_slice = y.reshape(-1), dx[1:]
    kept_y, kept_dx = y.copy(), dx.copy()
    held = {buffer_of(y), buffer_of(dx)}
    del y, dx
    for seed in range(1, 5):
        y, dx = layer_step(layer, shape, seed, training=seed % 2 == 1)
        assert buffer_of(y) not in held and buffer_of(dx) not in held
        del y, dx
    assert np.array_equal(y_view, kept_y.reshape(-1))
    assert np.array_equal(dx_slice, kept_dx[1:])


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("axis", [1, -1])
def test_output_saved_by_the_next_layer_is_not_reused_before_its_backward(cache, axis, relu):
    """A network: bn2 saves bn1's output as its input for its backward."""
    shape = SHAPES[axis]

    def network_step(cache_bytes):
        fastbn.set_output_cache_bytes(cache_bytes)
        bn1, bn2 = make_layer("BatchNorm2d", axis, relu), make_layer("BatchNorm2d", axis, relu)
        bn2.weight.data[...] += 0.25
        x, dy, _ = make_data(0, shape=shape)
        y2 = bn2(bn1(x))  # bn1's output is only alive in bn2's saved state
        kept = y2.copy()
        del y2
        # other calls of the same size while bn2 holds bn1's output
        other = make_layer("BatchNorm2d", axis, relu)
        for seed in range(1, 4):
            xi, dyi, _ = make_data(seed, shape=shape)
            other(xi)
            other.backward(dyi)
        dx = bn1.backward(bn2.backward(dy))
        return [kept, dx.copy(), bn1.weight.grad.copy(), bn2.weight.grad.copy(),
                bn2.bias.grad.copy(), bn1.running_mean.copy(), bn2.running_var.copy()]

    on, off = network_step(64 * MIB), network_step(0)
    for a, b in zip(on, off):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_results_are_the_same_bits_with_the_cache_on_and_off(cache, name):
    kind, axis, relu, shape = LAYERS[name]

    def steps(cache_bytes):
        fastbn.set_output_cache_bytes(cache_bytes)
        if cache_bytes:
            poison(shape, np.float32, 4)
        layer = make_layer(kind, axis, relu)
        results = []
        for seed in range(3):
            y, dx = layer_step(layer, shape, seed)
            results += [y, dx, layer.weight.grad.copy(), layer.bias.grad.copy(),
                        layer.running_mean.copy(), layer.running_var.copy()]
        y, dx = layer_step(layer, shape, 7, training=False)
        return results + [y, dx, layer.weight.grad.copy()]

    on, off = steps(64 * MIB), steps(0)
    for a, b in zip(on, off):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b)
    with fastbn.use_backend("reference"):
        expected = steps(0)
    for a, b in zip(on, expected):
        np.testing.assert_allclose(a, b, **{"rtol": 1e-4, "atol": 1e-4})


def poison(shape, dtype, count):
    """Fill the cache with `count` NaN (or 0xFF bytes) buffers of this size."""
    junk = [_output_cache.new_array(shape, np.dtype(dtype)) for _ in range(count)]
    for array in junk:
        assert is_leased(array)
        array.view(np.uint8).fill(0xFF)  # NaN in every float format
    del junk, array
    assert info()["buffers"] >= count


# section: same bits with the cache on and off; NumPy reference ----------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("name", sorted(CALLS))
def test_functional_results_same_bits_on_and_off_and_match_the_reference(cache, name, axis,
                                                                         dtype):
    def results(cache_bytes):
        fastbn.set_output_cache_bytes(cache_bytes)
        if cache_bytes:
            poison(SHAPES[axis], dtype, 2)
        x, dy, params = make_data(3, dtype, SHAPES[axis], axis)
        y = CALLS[name](x, dy, params, axis, None)
        assert is_leased(y) == bool(cache_bytes)
        return y, params["running_mean"], params["running_var"]

    on, off = results(64 * MIB), results(0)
    for a, b in zip(on, off):
        assert np.array_equal(a, b)
    with fastbn.use_backend("reference"):
        expected = results(0)
    scale = 10 if "backward" in name else 1  # as tests/test_bn_backward.py: a longer chain
    tolerance = {key: value * scale for key, value in TOLERANCE[np.dtype(dtype)].items()}
    for a, b in zip(on, expected):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, **tolerance)


# section: small outputs, out= -------------------------------------------------------------


@pytest.mark.parametrize("name", ["batch_norm-train", "batch_norm_backward",
                                  "batch_norm_relu-eval", "batch_norm_apply"])
def test_outputs_under_one_mib_are_plain_arrays(cache, name):
    poison(SHAPES[1], np.float32, 1)
    before = info()
    # 1 MiB less 2048 bytes: below the minimum
    small = (4, CHANNELS, 64, 127)
    assert int(np.prod(small)) * 4 < _output_cache.MIN_CACHED_BYTES
    y = run(name, 0, shape=small)
    assert y.flags.owndata and not is_leased(y)
    assert info() == before
    # exactly 1 MiB: from the cache (a miss: no buffer of that size yet)
    exact = (4, CHANNELS, 64, 128)
    assert int(np.prod(exact)) * 4 == _output_cache.MIN_CACHED_BYTES
    y = run(name, 0, shape=exact)
    assert is_leased(y)
    assert info()["misses"] == before["misses"] + 1


@pytest.mark.parametrize("name", sorted(CALLS))
def test_out_given_does_not_touch_the_cache(cache, name):
    poison(SHAPES[1], np.float32, 2)
    before = info()
    out = np.empty(SHAPES[1], np.float32)
    y = run(name, 0, out=out)
    assert y is out
    assert info() == before
    expected = _without_cache(lambda: run(name, 0))
    assert np.array_equal(out, expected)


def test_layers_small_outputs_are_plain_and_the_cache_untouched(cache):
    poison(SHAPES[1], np.float32, 1)
    before = info()
    layer = make_layer("BatchNorm2d")
    y, dx = layer_step(layer, (2, CHANNELS, 5, 7), 0)
    assert y.flags.owndata and dx.flags.owndata
    assert info() == before


# section: bfloat16 -------------------------------------------------------------------------

BF16_CALLS = ["batch_norm-train", "batch_norm-eval", "batch_norm_forward_train",
              "batch_norm_backward", "batch_norm_backward_eval", "batch_norm_relu-train",
              "batch_norm_relu_backward"]


def assert_bf16_close(actual, expected):
    """Within 1 bfloat16 ulp (2**-7 relative) of the reference backend's
    bfloat16 result (the tolerance of tests/test_bn_bf16.py's float32
    comparison), plus a small absolute term for values near 0."""
    assert actual.dtype == BF16 and expected.dtype == BF16
    a, b = actual.astype(np.float32), expected.astype(np.float32)
    np.testing.assert_allclose(a, b, rtol=2**-7, atol=2**-7)


@needs_bf16
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("name", BF16_CALLS)
def test_bfloat16_outputs_are_cached_bfloat16_with_correct_values(cache, name, axis):
    shape = BF16_SHAPE if axis == 1 else (8, 96, 96, CHANNELS)

    def results(cache_bytes):
        fastbn.set_output_cache_bytes(cache_bytes)
        if cache_bytes:
            poison(shape, BF16, 2)
        x, dy, params = make_data(5, BF16, shape, axis)
        y = CALLS[name](x, dy, params, axis, None)
        return y, params["running_mean"], params["running_var"]

    on = results(64 * MIB)
    y = on[0]
    assert y.dtype == BF16 and y.shape == shape
    assert is_leased(y) and not y.flags.owndata and y.flags.writeable
    assert address(y) % 64 == 0
    off = results(0)
    assert not is_leased(off[0])
    for a, b in zip(on, off):
        assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))
    with fastbn.use_backend("reference"):
        expected = results(0)
    assert_bf16_close(y, expected[0])
    np.testing.assert_allclose(on[1], expected[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(on[2], expected[2], rtol=1e-5, atol=1e-6)
    # reuse once dropped, not while a view is held (the runs above left the cache off)
    fastbn.set_output_cache_bytes(64 * MIB)
    poison(shape, BF16, 1)
    first = buffer_of(y)
    view = y[1:, :2]
    kept = view.copy()
    del y, on
    again = run(name, 6, BF16, axis, shape=shape)
    assert buffer_of(again) != first
    del again
    assert np.array_equal(view.view(np.uint16), kept.view(np.uint16))
    del view
    before = info()
    assert before["buffers"] == 2
    again = run(name, 7, BF16, axis, shape=shape)
    assert again.dtype == BF16
    assert info()["hits"] == before["hits"] + 1
    del again
    again = run(name, 8, BF16, axis, shape=shape)
    third = run(name, 9, BF16, axis, shape=shape)
    assert first in {buffer_of(again), buffer_of(third)}


@needs_bf16
def test_bfloat16_and_float16_buffers_of_one_size_are_not_confused(cache):
    """Keyed by (bytes, dtype character): a bfloat16 buffer given back is
    not handed out as float16 (or the other way), each keeps its dtype."""
    half = _output_cache.new_array(BF16_SHAPE, np.dtype(np.float16))
    half_address = buffer_of(half)
    del half
    y = run("batch_norm-train", 0, BF16, shape=BF16_SHAPE)
    assert y.dtype == BF16 and buffer_of(y) != half_address
    first = buffer_of(y)
    del y
    half = _output_cache.new_array(BF16_SHAPE, np.dtype(np.float16))
    assert half.dtype == np.float16 and buffer_of(half) == half_address
    y = run("batch_norm-train", 1, BF16, shape=BF16_SHAPE)
    assert y.dtype == BF16 and buffer_of(y) == first


@needs_bf16
def test_bfloat16_layer_outputs_reused_and_kept(cache):
    layer = make_layer("BatchNorm2d")
    y, dx = layer_step(layer, BF16_SHAPE, 0, BF16)
    assert y.dtype == BF16 and dx.dtype == BF16 and is_leased(y) and is_leased(dx)
    first = {buffer_of(y), buffer_of(dx)}
    kept = dx.copy()
    del y
    y, dx2 = layer_step(layer, BF16_SHAPE, 1, BF16)
    assert buffer_of(dx2) not in {buffer_of(dx)} and buffer_of(y) in first
    assert np.array_equal(dx.view(np.uint16), kept.view(np.uint16))


# section: the cap, 0, the environment ---------------------------------------------------


def test_cap_is_respected_and_zero_releases_everything(cache):
    nbytes = int(np.prod(SHAPES[1])) * 4
    fastbn.set_output_cache_bytes(2 * nbytes)
    outputs = [run("batch_norm-train", seed) for seed in range(3)]
    assert all(is_leased(y) for y in outputs)
    assert info()["buffers"] == 0  # in use: not counted
    del outputs
    state = info()
    assert (state["retained"], state["buffers"], state["cap"]) == (2 * nbytes, 2, 2 * nbytes)
    fastbn.set_output_cache_bytes(nbytes)
    assert (info()["retained"], info()["buffers"]) == (nbytes, 1)
    fastbn.set_output_cache_bytes(0)
    assert (info()["retained"], info()["buffers"], info()["cap"]) == (0, 0, 0)
    assert fastbn.get_output_cache_bytes() == 0
    before = info()
    y = run("batch_norm_backward", 0)
    assert not is_leased(y)
    del y
    assert info() == before


def test_lease_given_back_after_the_cap_went_to_zero_is_released(cache):
    y = run("batch_norm-train", 0)
    fastbn.set_output_cache_bytes(0)
    del y
    assert (info()["retained"], info()["buffers"]) == (0, 0)


def test_clear_output_cache_keeps_the_cap(cache):
    y = run("batch_norm-train", 0)
    del y
    assert info()["buffers"] == 1
    fastbn.clear_output_cache()
    assert (info()["retained"], info()["buffers"], info()["cap"]) == (0, 0, 64 * MIB)


@pytest.mark.parametrize("value, error", [(-1, ValueError), (1.5, TypeError), ("8", TypeError),
                                          (True, TypeError), (None, TypeError)])
def test_bad_cap_raises_naming_n_and_changes_nothing(cache, value, error):
    with pytest.raises(error, match=r"\bn\b"):
        fastbn.set_output_cache_bytes(value)
    assert fastbn.get_output_cache_bytes() == 64 * MIB


def test_top_level_and_torch_functions_are_the_same():
    assert fastbn.set_output_cache_bytes is _output_cache.set_output_cache_bytes
    assert fastbn.output_cache_info is _output_cache.output_cache_info
    torch_api = sys.modules.get("fastbn.torch")
    if torch_api is not None:
        assert torch_api.set_output_cache_bytes is fastbn.set_output_cache_bytes


def _python(code, tmp_path, **env):
    environment = {key: value for key, value in os.environ.items()
                   if key not in (_output_cache.ENV_VAR, _output_cache.LEGACY_ENV_VAR)}
    environment.update(env)
    environment["PYTHONPATH"] = os.pathsep.join(
        [PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=300)


def test_environment_variables_set_the_initial_cap(tmp_path):
    code = "import fastbn; print(fastbn.get_output_cache_bytes())"
    default = str(_output_cache.DEFAULT_CACHE_BYTES)
    assert _python(code, tmp_path).stdout.split() == [default]
    new, legacy = "FASTBN_OUTPUT_CACHE_BYTES", "FASTBN_TORCH_OUTPUT_CACHE_BYTES"
    assert _python(code, tmp_path, **{new: "12345"}).stdout.split() == ["12345"]
    assert _python(code, tmp_path, **{new: "0"}).stdout.split() == ["0"]
    assert _python(code, tmp_path, **{legacy: "777"}).stdout.split() == ["777"]
    # the new name wins; an empty or blank new one falls back to the legacy one
    assert _python(code, tmp_path, **{new: "5", legacy: "777"}).stdout.split() == ["5"]
    assert _python(code, tmp_path, **{new: " ", legacy: "777"}).stdout.split() == ["777"]
    bad = _python(code, tmp_path, **{new: "lots"})
    assert bad.returncode == 0 and bad.stdout.split() == [default]
    assert new in bad.stderr and "RuntimeWarning" in bad.stderr


def test_environment_zero_gives_plain_arrays(tmp_path):
    code = ("import numpy as np, fastbn\n"
            "x = np.ones((4, 8, 96, 96), np.float32); x[0] = 2\n"
            "y = fastbn.functional.batch_norm(x, None, None, training=True)\n"
            "base = y\n"
            "while isinstance(base, np.ndarray):\n"
            "    base = base.base\n"
            "print(isinstance(base, fastbn._output_cache._Lease),"
            " fastbn.output_cache_info()['misses'])\n")
    assert _python(code, tmp_path, FASTBN_OUTPUT_CACHE_BYTES="0").stdout.split() == ["False", "0"]
    assert _python(code, tmp_path).stdout.split() == ["True", "1"]


# section: errors ----------------------------------------------------------------------


def _warm(shape=SHAPES[1], dtype=np.float32):
    """One free buffer of this size in the cache; its address."""
    y = _output_cache.new_array(shape, np.dtype(dtype))
    first = buffer_of(y)
    del y
    return first


def assert_cache_intact(first, before):
    """The free buffer is still there (same counts) and the next call of
    its size gets it."""
    gc.collect()
    after = info()
    assert (after["retained"], after["buffers"]) == (before["retained"], before["buffers"])
    y = run("batch_norm-train", 99)
    assert buffer_of(y) == first


BAD_LAYER_CALLS = {
    # name -> (break the layer or make a bad argument, call, error)
    "bad dy shape": (None, lambda layer, x, dy: layer.backward(dy[:, :, 1:]), ValueError),
    "bad dy dtype": (None, lambda layer, x, dy: layer.backward(dy.astype(np.float64)),
                     TypeError),
    "read-only running_var": ("running_var", lambda layer, x, dy: layer(x), ValueError),
    "read-only bias.grad": ("bias.grad", lambda layer, x, dy: layer.backward(dy), ValueError),
    "wrong channel count": (None, lambda layer, x, dy: layer(
        x[:, :-1] if layer.axis == 1 else x[..., :-1]), ValueError),
    "float64 weight.grad": ("weight.grad", lambda layer, x, dy: layer.backward(dy), TypeError),
}


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("bad", sorted(BAD_LAYER_CALLS))
def test_error_in_a_layer_call_changes_no_state_and_keeps_the_cache(cache, bad, axis):
    layer = make_layer("BatchNorm2d", axis)
    shape = SHAPES[axis]
    x, dy, _ = make_data(0, shape=shape)
    layer(x)
    layer.backward(dy)  # grads exist: the backward adds into them
    y = layer(x)
    what, call, error = BAD_LAYER_CALLS[bad]
    if what in ("running_var",):
        layer.running_var.flags.writeable = False
    elif what == "bias.grad":
        layer.bias.grad.flags.writeable = False
    elif what == "weight.grad":
        layer.weight.grad = layer.weight.grad.astype(np.float64)
    del y
    first = _warm(shape)
    before_state, before = snapshot(layer), info()
    with pytest.raises(error):
        call(layer, x, dy)
    assert_same_state(before_state, snapshot(layer), bad)
    gc.collect()
    after = info()
    assert (after["retained"], after["buffers"]) == (before["retained"], before["buffers"])
    if axis == 1:
        assert_cache_intact(first, before)


class _FailingNumPy(types.SimpleNamespace):
    """`_output_cache`'s ``np`` with one function raising MemoryError (as
    an allocation inside it would); the rest is NumPy's."""

    def __init__(self, failing):
        super().__init__(failing=failing, calls=0)

    def __getattr__(self, name):
        value = getattr(np, name)
        if name != self.failing:
            return value

        def fail(*args, **kwargs):
            self.calls += 1
            # the traceback keeps this frame: it must not keep a lease alive
            del args, kwargs
            raise MemoryError(f"injected in np.{name}")
        return fail


# where: "empty" fails the miss path (a new buffer), "asarray" the hit path
# (after the cache handed a free buffer out, before the caller has it)
@pytest.mark.parametrize("where", ["empty", "asarray"])
@pytest.mark.parametrize("op", ["train_forward", "eval_forward", "train_backward",
                                "eval_backward"])
@pytest.mark.parametrize("name", ["BatchNorm2d", "BatchNorm2d-channels-last", "BatchNorm1d",
                                  "SyncBatchNorm"])
def test_memory_error_in_the_cache_changes_no_state_and_keeps_the_cache(cache, monkeypatch,
                                                                        name, op, where):
    layer, shape = layer_case(name)
    x, dy, _ = make_data(0, shape=shape)
    layer(x)
    layer.backward(dy)
    layer.train(op.startswith("train"))
    if "backward" in op:
        layer(x)
    gc.collect()
    fastbn.clear_output_cache()  # "empty": no free buffer, the call allocates
    first = _warm(shape) if where == "asarray" else None
    before_state, before = snapshot(layer), info()
    failing = _FailingNumPy(where)
    monkeypatch.setattr(_output_cache, "np", failing)
    with pytest.raises((MemoryError, ValueError)) as raised:
        layer.backward(dy) if "backward" in op else layer(x)
    monkeypatch.setattr(_output_cache, "np", np)
    if raised.type is ValueError:  # SyncBatchNorm: a rank's local failure, for every rank
        assert isinstance(raised.value.__cause__, MemoryError)
    assert failing.calls == 1
    assert_same_state(before_state, snapshot(layer), f"{name} {op}, np.{where} failed")
    gc.collect()
    after = info()
    assert (after["retained"], after["buffers"]) == (before["retained"], before["buffers"])
    # the layer works afterwards, with the same results as with a fresh cache
    y, dx = layer_step(layer, shape, 4, training=op.startswith("train"))
    if first is not None:
        assert first in {buffer_of(y), buffer_of(dx)}


def test_memory_error_in_functional_call_leaves_running_stats(cache, monkeypatch):
    x, dy, params = make_data(0)
    first = _warm()
    before_stats = snapshot(params)
    before = info()
    monkeypatch.setattr(_output_cache, "np", _FailingNumPy("asarray"))
    with pytest.raises(MemoryError):
        F.batch_norm(x, params["running_mean"], params["running_var"], params["weight"],
                     params["bias"], training=True)
    monkeypatch.setattr(_output_cache, "np", np)
    assert_same_state(before_stats, snapshot(params))
    assert_cache_intact(first, before)


# section: where an output starts in its page, against its inputs (4K aliasing) ------


def _ahead(output_address, input_address):
    return (output_address - input_address) % _output_cache.PAGE


def _is_clear(output_address, input_addresses):
    """At the input's page offset, or ALIAS_AHEAD..PAGE - ALIAS_BEHIND bytes past it."""
    return all(_ahead(output_address, a) == 0
               or _output_cache.ALIAS_AHEAD <= _ahead(output_address, a)
               <= _output_cache.PAGE - _output_cache.ALIAS_BEHIND
               for a in input_addresses)


def test_page_offset_is_on_a_line_and_clear_of_any_one_two_or_three_inputs():
    page = _output_cache.PAGE
    singles = [(a,) for a in range(0, page, 16)]
    rng = np.random.default_rng(0)
    triples = [tuple(int(v) for v in rng.integers(0, page // 16, size=k) * 16)
               for k in (2, 3) for _ in range(3000)]
    # inputs packed around each candidate offset: the first ones cannot be used
    crowded = [(2048 - 16, 3072 - 32, 1024 + 16), (2048, 3072 + 16, 1024 - 64),
               (2048 - 64, 2048 + 16, 3072 - 16)]
    for inputs in singles + triples + crowded:
        offset = _output_cache.page_offset_for(inputs)
        assert offset % 64 == 0 and 0 <= offset < page
        assert _is_clear(offset, inputs), (inputs, offset)
    # NumPy's large arrays (16 bytes past a page): half a page away, as before
    assert _output_cache.page_offset_for((16,)) == 2048
    assert _output_cache.page_offset_for(()) == 2048


def test_clear_of_rules_out_just_past_and_just_before_an_input():
    assert _output_cache.clear_of(4096 * 7 + 100, (100,))           # same offset
    assert not _output_cache.clear_of(116, (100,))                   # 16 past
    assert not _output_cache.clear_of(100 + _output_cache.ALIAS_AHEAD - 16, (100,))
    assert _output_cache.clear_of(100 + _output_cache.ALIAS_AHEAD, (100,))
    assert not _output_cache.clear_of(84, (100,))                    # 16 before
    assert _output_cache.clear_of(100 - _output_cache.ALIAS_BEHIND, (100,))
    assert not _output_cache.clear_of(4096 + 116, (5000, 100))      # one of two


def _placed(shape, dtype, page_offset, values):
    """A C-contiguous copy of `values` starting `page_offset` bytes past a page."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 2 * 4096, np.uint8)
    start = (-address(raw)) % 4096 + page_offset
    array = raw[start:start + nbytes].view(dtype).reshape(shape)
    array[...] = values
    return array


# inputs just before each offset the cache tries first, and a pair of
# inputs 16 bytes apart (the heap puts consecutive arrays of whole pages so)
INPUT_OFFSETS = [(2048 - 16, 2048 - 16), (2048 - 48, 2048 - 32), (16, 2048 - 16),
                 (3072 - 16, 2048 - 16), (944, 976)]


@pytest.mark.parametrize("offsets", INPUT_OFFSETS)
@pytest.mark.parametrize("cache_on", [True, False])
@pytest.mark.parametrize("name", ["batch_norm-train", "batch_norm-eval",
                                  "batch_norm_backward", "batch_norm_relu_backward",
                                  "batch_norm_backward_eval", "batch_norm_apply"])
def test_allocated_outputs_are_clear_of_their_inputs_and_hold_the_same_values(
        cache, name, cache_on, offsets):
    # 1.125 MiB outputs: from the cache, or (cache off) placed_array
    shape = SHAPES[1]
    if not cache_on:
        fastbn.set_output_cache_bytes(0)
    x0, dy0, params = make_data(3, np.float32, shape, 1)
    x = _placed(shape, np.float32, offsets[0], x0)
    dy = _placed(shape, np.float32, offsets[1], dy0)
    y = CALLS[name](x, dy, params, 1, None)
    inputs = [address(x)] + ([address(dy)] if "backward" in name else [])
    assert _is_clear(address(y), inputs), ([a % 4096 for a in inputs], address(y) % 4096)
    assert is_leased(y) == cache_on
    assert y.flags.c_contiguous and y.flags.writeable and y.shape == shape
    # the same values as into a caller's out= (the placement moves no value)
    _, _, fresh = make_data(3, np.float32, shape, 1)
    expected = CALLS[name](x, dy, fresh, 1, np.empty(shape, np.float32))
    assert np.array_equal(y, expected)
