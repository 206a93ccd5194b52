"""fastbn.torch and the output-buffer cache (fastbn/_output_cache.py): a
buffer is reused only once nothing can see it (views, NumPy arrays,
storages, DLPack capsules, autograd's saved tensors, .grad), the byte cap
holds, 0 turns it off, results are the same bits with it on and off and
match the NumPy reference, threads and fork are safe."""
from __future__ import annotations

import gc
import multiprocessing
import sys
import threading
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastbn.torch as ft  # noqa: E402
import fastbn  # noqa: E402
from fastbn import reference  # noqa: E402
from fastbn import _output_cache  # noqa: E402
from fastbn.torch import batchnorm  # noqa: E402

SHAPE = (4, 6, 5, 7)
CHANNELS = SHAPE[1]
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}



def buffer_of(tensor):
    """The first page of a tensor's memory: a cache buffer is handed out at
    one of a few offsets within that page (where its inputs allow)."""
    return tensor.data_ptr() // 4096

@pytest.fixture
def cache(monkeypatch):
    """The cache on, empty, with a 4 MiB cap, and taking every output (not
    only those of 1 MiB and more) so that small tensors exercise it."""
    previous = ft.get_output_cache_bytes()
    _output_cache.clear_output_cache()
    ft.set_output_cache_bytes(4 * 2**20)
    monkeypatch.setattr(_output_cache, "MIN_CACHED_BYTES", 1)
    yield _output_cache
    gc.collect()
    ft.set_output_cache_bytes(previous)
    _output_cache.clear_output_cache()


@pytest.fixture(params=["eager", "custom_op"])
def path(request, monkeypatch):
    monkeypatch.setattr(batchnorm, "_EAGER_FAST_PATH", request.param == "eager")
    return request.param


def make_input(seed, layout="contiguous", dtype=torch.float32, requires_grad=False,
               shape=SHAPE):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=dtype) * 1.5 + 0.25
    if layout == "channels_last":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    return x.requires_grad_(requires_grad)


def make_module(dtype=torch.float32, relu=False):
    module = (ft.BatchNormReLU2d if relu else ft.BatchNorm2d)(CHANNELS, dtype=dtype)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        module.weight.copy_(torch.rand(CHANNELS, generator=generator, dtype=dtype) + 0.5)
        module.bias.copy_(torch.randn(CHANNELS, generator=generator, dtype=dtype))
    return module


def reference_forward(x, module):
    """NumPy reference of a training forward (channel axis 1)."""
    return reference.batch_norm_forward_train(
        x.detach().contiguous().numpy().copy(), module.weight.detach().numpy(),
        module.bias.detach().numpy(), module.eps)


# section: reuse only when dead -------------------------------------------------------


def test_output_buffer_is_reused_once_the_output_is_gone(cache):
    module = make_module()
    y = module(make_input(0))
    address = buffer_of(y)
    hits = cache.output_cache_info()["hits"]
    del y
    y = module(make_input(1))
    assert buffer_of(y) == address
    assert cache.output_cache_info()["hits"] == hits + 1


def _holders(y):
    """Ways to keep an output's memory visible after `del y`, each as
    (object kept, function reading the memory as a NumPy array)."""
    array = y.detach().numpy()
    storage = y.untyped_storage()
    capsule_tensor = torch.utils.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(y.detach()))
    return {
        "view": (y[1:, 2], lambda held: held.detach().numpy()),
        "flatten": (y.flatten(2), lambda held: held.detach().numpy()),  # a view in both layouts
        "numpy": (array, lambda held: held),
        "numpy_view": (array[1:, ::2], lambda held: held),
        "numpy_of_numpy": (np.asarray(array)[0], lambda held: held),
        "storage": (storage, lambda held: torch.tensor([], dtype=y.dtype).set_(held).numpy()),
        "dlpack": (capsule_tensor, lambda held: held.numpy()),
        "from_numpy": (torch.from_numpy(array[2]), lambda held: held.numpy()),
        "detach": (y.detach(), lambda held: held.numpy()),
    }


HOLDERS = ["view", "flatten", "numpy", "numpy_view", "numpy_of_numpy", "storage", "dlpack",
           "from_numpy", "detach"]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("holder", HOLDERS)
def test_forward_output_kept_alive_by_any_alias_is_never_overwritten(cache, path, holder,
                                                                    layout):
    module = make_module()
    y = module(make_input(0, layout))
    held, read = _holders(y)[holder]
    before = read(held).copy()
    address = buffer_of(y)
    del y
    gc.collect()
    for seed in range(1, 5):  # same shape and layout: would take a dead buffer
        other = module(make_input(seed, layout))
        assert buffer_of(other) != address
        del other
    np.testing.assert_array_equal(read(held), before)
    del held, read
    gc.collect()
    again = module(make_input(9, layout))
    assert buffer_of(again) == address  # the buffer came back once the alias was gone


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_output_saved_by_autograd_is_not_reused_before_backward(cache, path, layout):
    def run(cache_bytes):
        ft.set_output_cache_bytes(cache_bytes)
        module = make_module()
        x = make_input(0, layout, requires_grad=True)
        loss = (module(x) ** 2).sum()  # pow saves the output
        for seed in range(1, 4):
            module(make_input(seed, layout, requires_grad=True)).sum().backward()
        loss.backward()
        return x.grad.clone(), module.weight.grad.clone()

    on, off = run(4 * 2**20), run(0)
    assert torch.equal(on[0], off[0]) and torch.equal(on[1], off[1])
    # and against the NumPy reference: d(sum(y^2))/dx = backward(dy = 2y)
    module = make_module()
    x = make_input(0, layout)
    y, mean, invstd = reference_forward(x, module)
    dx, dweight, _ = reference.batch_norm_backward(2 * y, x.contiguous().numpy(), mean, invstd,
                                                   module.weight.detach().numpy())
    np.testing.assert_allclose(on[0].contiguous().numpy(), dx, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(on[1].numpy(), dweight, rtol=2e-4, atol=2e-3)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradient_kept_in_grad_is_not_overwritten(cache, path, layout):
    module = make_module()
    x = make_input(0, layout, requires_grad=True)
    generator = torch.Generator().manual_seed(5)
    dy = torch.randn(SHAPE, generator=generator)
    module(x).backward(dy)
    grad = x.grad
    kept = grad.clone()
    for seed in range(1, 5):
        xi = make_input(seed, layout, requires_grad=True)
        module(xi).backward(torch.randn(SHAPE, generator=generator))
        assert xi.grad.data_ptr() != grad.data_ptr()
    assert torch.equal(x.grad, kept)
    y, mean, invstd = reference_forward(x, module)
    dx, _, _ = reference.batch_norm_backward(dy.numpy(), x.detach().contiguous().numpy(), mean,
                                             invstd, module.weight.detach().numpy())
    np.testing.assert_allclose(kept.contiguous().numpy(), dx, rtol=2e-4, atol=2e-4)


def test_eval_output_kept_alive_is_not_overwritten(cache, path):
    module = make_module().eval()
    y = module(make_input(0))
    view = y[0]
    before = view.clone()
    del y
    for seed in range(1, 4):
        module(make_input(seed))
    assert torch.equal(view, before)


def test_buffer_given_back_while_the_lock_is_held_is_filed_afterwards(cache):
    # A lease can die inside the garbage collector while this thread holds
    # the lock: its give-back must not block (that would deadlock).
    module = make_module()
    y = module(make_input(0))
    retained = cache.output_cache_info()["retained"]
    with cache._cache.lock:
        del y
        assert len(cache._cache.pending) == 1
    cache._cache.file_pending()
    assert cache.output_cache_info()["retained"] == retained + y_nbytes()


def y_nbytes(dtype=torch.float32):
    return int(np.prod(SHAPE)) * torch.empty(0, dtype=dtype).element_size()


# section: same bits, NumPy reference ---------------------------------------------------


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_results_are_the_same_bits_with_the_cache_on_and_off(cache, path, layout, dtype, relu):
    torch_dtype = TORCH_DTYPES[dtype]

    def run(cache_bytes):
        ft.set_output_cache_bytes(cache_bytes)
        if cache_bytes:
            # fill the cache with poisoned buffers of every size this run asks for
            junk = [module_output_like(layout, torch_dtype) for _ in range(3)]
            for tensor in junk:
                tensor.fill_(float("nan"))
            del junk
            assert cache.output_cache_info()["retained"] > 0
        module = make_module(torch_dtype, relu)
        results = []
        for seed in range(3):
            x = make_input(seed, layout, torch_dtype, requires_grad=True)
            y = module(x)
            y.backward(make_input(50 + seed, layout, torch_dtype))
            results += [y.detach().clone(), x.grad.clone(), module.weight.grad.clone(),
                        module.bias.grad.clone(), module.running_mean.clone(),
                        module.running_var.clone()]
            module.zero_grad()
        module.eval()
        results.append(module(make_input(9, layout, torch_dtype)).clone())
        return results

    on, off = run(4 * 2**20), run(0)
    for a, b in zip(on, off):
        assert a.stride() == b.stride()
        assert torch.equal(a, b)
    # first step against the NumPy reference (outputs and running buffers)
    module = make_module(torch_dtype, relu)
    x = make_input(0, layout, torch_dtype)
    running_mean = module.running_mean.numpy().copy()
    running_var = module.running_var.numpy().copy()
    forward = reference.batch_norm_relu_forward_train if relu else \
        reference.batch_norm_forward_train
    y, _, _ = forward(x.contiguous().numpy().copy(), module.weight.detach().numpy(),
                      module.bias.detach().numpy(), module.eps, running_mean=running_mean,
                      running_var=running_var, momentum=module.momentum)
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else dict(rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(on[0].contiguous().numpy(), y, **tolerance)
    np.testing.assert_allclose(on[4].numpy(), running_mean, **tolerance)
    np.testing.assert_allclose(on[5].numpy(), running_var, **tolerance)


def module_output_like(layout, dtype):
    """An output of the size the runs above ask for, through the cache."""
    module = make_module(dtype)
    with torch.no_grad():
        return module(make_input(0, layout, dtype))


# section: the cap ----------------------------------------------------------------------


def test_cache_keeps_no_more_than_the_cap_and_frees_the_rest(cache, handed_out):
    nbytes = y_nbytes()
    ft.set_output_cache_bytes(2 * nbytes)
    module = make_module()
    outputs = [module(make_input(seed)) for seed in range(3)]
    assert len(handed_out) == 3
    arrays = [weakref.ref(entry[0]) for entry in handed_out]
    handed_out.clear()
    del outputs
    info = cache.output_cache_info()
    assert (info["retained"], info["buffers"]) == (2 * nbytes, 2)
    gc.collect()
    assert sum(ref() is not None for ref in arrays) == 2  # the third was released
    ft.set_output_cache_bytes(nbytes + 1)
    assert cache.output_cache_info()["retained"] == nbytes
    assert sum(ref() is not None for ref in arrays) == 1
    ft.set_output_cache_bytes(nbytes - 1)  # smaller than a buffer: nothing kept
    assert cache.output_cache_info()["retained"] == 0
    assert all(ref() is None for ref in arrays)
    y = module(make_input(7))
    del y
    assert cache.output_cache_info()["retained"] == 0


@pytest.fixture
def handed_out(monkeypatch):
    """The cache entries handed out from now on, in order (an entry is a
    list holding the buffer; keeping it does not keep a lease alive)."""
    entries = []
    original = _output_cache.new_array

    def recording(shape, dtype, inputs=()):
        array = original(shape, dtype, inputs)
        if isinstance(array.base, _output_cache._Lease):
            entries.append(array.base.entry)
        return array

    monkeypatch.setattr(_output_cache, "new_array", recording)
    return entries


def test_least_recently_given_back_sizes_are_released_first(cache):
    module = make_module()
    small, middle = (2, CHANNELS, 5, 7), (3, CHANNELS, 5, 7)
    small_bytes, middle_bytes = int(np.prod(small)) * 4, int(np.prod(middle)) * 4
    ft.set_output_cache_bytes(y_nbytes() + middle_bytes)
    a = module(make_input(0, shape=small))
    b = module(make_input(1))
    del a
    del b  # both kept
    assert cache.output_cache_info()["buffers"] == 2
    c = module(make_input(2, shape=middle))
    del c  # over the cap: the small one (given back first) goes, exactly the cap is left
    assert list(cache._cache.free) == [(y_nbytes(), "f"), (middle_bytes, "f")]
    assert cache.output_cache_info()["retained"] == y_nbytes() + middle_bytes
    assert small_bytes < middle_bytes


def test_zero_turns_the_cache_off_and_releases_everything(cache, handed_out):
    module = make_module()
    y = module(make_input(0))
    del y
    assert cache.output_cache_info()["retained"] > 0
    ft.set_output_cache_bytes(0)
    info = cache.output_cache_info()
    assert info["retained"] == 0 and info["buffers"] == 0
    y = module(make_input(1))
    assert handed_out == [handed_out[0]]  # only the first output came from the cache
    del y
    after = cache.output_cache_info()
    assert (after["hits"], after["misses"], after["retained"]) == (info["hits"], info["misses"], 0)
    assert ft.get_output_cache_bytes() == 0


def test_outputs_under_the_minimum_size_bypass_the_cache(handed_out):
    previous = ft.get_output_cache_bytes()
    ft.set_output_cache_bytes(64 * 2**20)
    try:
        module = make_module()
        info = _output_cache.output_cache_info()
        y = module(make_input(0))  # a few hundred bytes
        assert handed_out == []
        assert _output_cache.output_cache_info()["misses"] == info["misses"]
        big = module(make_input(1, shape=(8, CHANNELS, 128, 64)))  # 1.5 MiB
        assert _output_cache.output_cache_info()["misses"] == info["misses"] + 1
        assert len(handed_out) == 1 and buffer_of(big) * 4096 == handed_out[0][1]
        del big
    finally:
        ft.set_output_cache_bytes(previous)


@pytest.mark.parametrize("value, error", [(-1, ValueError), (1.5, TypeError), ("8", TypeError),
                                          (True, TypeError), (None, TypeError)])
def test_bad_cap_raises_naming_n_and_changes_nothing(cache, value, error):
    before = ft.get_output_cache_bytes()
    with pytest.raises(error, match=r"\bn\b"):
        ft.set_output_cache_bytes(value)
    assert ft.get_output_cache_bytes() == before


def test_torch_functions_are_the_core_cache_functions():
    # one cache: its environment variables and caps are tested with the
    # NumPy API (tests/test_output_cache.py)
    assert ft.set_output_cache_bytes is fastbn.set_output_cache_bytes
    assert ft.get_output_cache_bytes is fastbn.get_output_cache_bytes
    assert ft.output_cache_info is fastbn.output_cache_info


# section: threads and fork ---------------------------------------------------------------


def _step(module, seed, layout):
    x = make_input(seed, layout, requires_grad=True)
    y = module(x)
    y.backward(make_input(seed + 1000, layout))
    return y.detach().clone(), x.grad.clone()


def test_threads_sharing_the_cache_get_the_results_of_a_single_thread(cache):
    layouts = ["contiguous", "channels_last"]
    expected = {}
    ft.set_output_cache_bytes(0)
    for seed in range(16):
        expected[seed] = _step(make_module(), seed, layouts[seed % 2])
    ft.set_output_cache_bytes(3 * y_nbytes())  # small: buffers are evicted and refilled
    errors, kept = [], []

    def worker(first):
        try:
            module = make_module()
            for round_ in range(6):
                for seed in range(first, 16, 4):
                    y, grad = _step(module, seed, layouts[seed % 2])
                    assert torch.equal(y, expected[seed][0]) and torch.equal(grad, expected[seed][1])
                    if round_ == 0:
                        kept.append((seed, y))
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(first,)) for first in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads)
    assert not errors, errors
    for seed, y in kept:
        assert torch.equal(y, expected[seed][0])
    info = cache.output_cache_info()
    assert info["retained"] <= 3 * y_nbytes()
    assert info["retained"] == sum(key[0] * len(entries)
                                   for key, entries in cache._cache.free.items())


def _fork_child(queue, expected):
    try:
        info = ft.output_cache_info()
        module = make_module()
        results = [_step(module, seed, "contiguous") for seed in range(3)]
        same = all(torch.equal(a, b) for got, want in zip(results, expected)
                   for a, b in zip(got, want))
        queue.put(("ok", info["retained"], info["buffers"], same,
                   ft.output_cache_info()["hits"] > 0))
    except BaseException as error:  # report, do not hang the parent
        queue.put(("error", repr(error)))


@pytest.mark.skipif(sys.platform == "win32" or "fork" not in multiprocessing.get_all_start_methods(),
                    reason="needs the 'fork' start method")
def test_forked_child_starts_with_its_own_empty_cache_even_if_the_lock_was_held(cache):
    module = make_module()
    expected = [_step(module, seed, "contiguous") for seed in range(3)]
    kept = module(make_input(0))  # a live output in the parent
    before = kept.clone()
    y = module(make_input(1))
    del y  # a free buffer in the parent
    assert cache.output_cache_info()["retained"] > 0
    held, release = threading.Event(), threading.Event()

    def hold_lock():
        with cache._cache.lock:
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    held.wait(60)
    try:
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_fork_child, args=(queue, expected))
        child.start()
    finally:
        release.set()
        holder.join()
    try:
        report = queue.get(timeout=120)
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    assert report[0] == "ok", report
    _, retained, buffers, same, reused = report
    assert (retained, buffers) == (0, 0)
    assert same and reused
    assert torch.equal(kept, before)
    assert cache.output_cache_info()["retained"] > 0  # the parent's cache is untouched
