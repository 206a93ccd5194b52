"""The catalogue of public kernel calls shared by the reliability tests
(determinism across thread counts, fork safety, concurrent Python threads,
leaks, sanitizers): one entry per compiled kernel path, each able to build
its inputs from (size, dtype, seed), run, and report every output and every
mutated buffer.

Batch-norm training entries join automatically once the training kernels are
exposed (``functional.batch_norm(training=True)`` stops raising
NotImplementedError; modules with ``backward``).

The checks at the bottom pin the catalogue itself: every entry runs, on the
fast and the reference backend, and agrees with the reference.
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple

import numpy as np
import pytest

import fastbn
from fastbn import functional as F
from fastbn import optim
from fastbn.parameter import Parameter

DTYPES = (np.float32, np.float64)

#: Elements of the large tensor in a "threaded" run: > 3 x FASTBN_SERIAL_ELEMENTS
#: (32768, the optimizers) and, in float32, > 1.5 MiB moved by a batch-norm
#: forward (FASTBN_PARALLEL_BYTES = 1 MiB, at least half of it per thread; both
#: in src_c/common/fb_parallel.h), so 1, 2 and 3 threads all really split it,
#: and not a multiple of any chunk size.
THREADED_SIZE = 6 * 32768 + 4099

#: Outputs of one call: name -> array (copies) or Python float.
Outputs = Dict[str, object]


class Prepared(NamedTuple):
    call: Callable[[], object]        # one kernel call (mutates the prepared buffers)
    outputs: Callable[[], Outputs]    # snapshot of every output and mutated buffer


class KernelCase(NamedTuple):
    name: str
    prepare: Callable[[int, type, int], Prepared]   # (size, dtype, seed)


# section: batch norm -------------------------------------------------------------

CHANNELS = 5


def _bn_inputs(size: int, dtype, seed: int, channels_last: bool):
    rng = np.random.default_rng(seed)
    if channels_last:
        shape = (max(2, -(-size // (CHANNELS * 3))), 3, CHANNELS)
    else:
        shape = (3, CHANNELS, max(2, -(-size // (CHANNELS * 3))))
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    vectors = [rng.standard_normal(CHANNELS).astype(dtype) for _ in range(4)]
    vectors[1] = np.abs(vectors[1]) + dtype(0.5)  # running_var
    return x, vectors, (-1 if channels_last else 1)


def _bn_eval(channels_last: bool, in_place: bool):
    def prepare(size, dtype, seed):
        x, (mean, var, weight, bias), axis = _bn_inputs(size, dtype, seed, channels_last)
        original = x.copy()
        out = x if in_place else np.empty_like(x)
        result = {}

        def call():
            if in_place:
                np.copyto(x, original)
            result["y"] = F.batch_norm(x, mean, var, weight, bias, eps=1e-3, axis=axis, out=out)
            return result["y"]

        return Prepared(call, lambda: {"y": result["y"].copy(), "running_mean": mean.copy(),
                                       "running_var": var.copy()})
    return prepare


def _bn_eval_allocating(size, dtype, seed):
    x, (mean, var, weight, bias), axis = _bn_inputs(size, dtype, seed, False)
    result = {}

    def call():
        result["y"] = F.batch_norm(x, mean, var, weight, bias)
        return result["y"]

    return Prepared(call, lambda: {"y": result["y"].copy(), "x": x.copy()})


def bn_training_available() -> bool:
    x = np.ones((2, 2, 2), np.float32)
    try:
        F.batch_norm(x, np.zeros(2, np.float32), np.ones(2, np.float32), training=True)
    except NotImplementedError:
        return False
    return True


def _bn_train_functional(channels_last: bool):
    def prepare(size, dtype, seed):
        x, (mean, var, weight, bias), axis = _bn_inputs(size, dtype, seed, channels_last)
        result = {}

        def call():
            result["y"] = F.batch_norm(x, mean, var, weight, bias, training=True, momentum=0.1,
                                       axis=axis)
            return result["y"]

        return Prepared(call, lambda: {"y": result["y"].copy(), "running_mean": mean.copy(),
                                       "running_var": var.copy()})
    return prepare


def _bn_forward_train(channels_last: bool):
    def prepare(size, dtype, seed):
        x, (mean, var, weight, bias), axis = _bn_inputs(size, dtype, seed, channels_last)
        out = np.empty_like(x)
        result = {}

        def call():
            result["y"], result["saved_mean"], result["saved_invstd"] = F.batch_norm_forward_train(
                x, weight, bias, 1e-3, axis=axis, out=out, running_mean=mean, running_var=var,
                momentum=0.2)
            return result["y"]

        return Prepared(call, lambda: {**{k: v.copy() for k, v in result.items()},
                                       "running_mean": mean.copy(), "running_var": var.copy()})
    return prepare


def _bn_backward(channels_last: bool, eval_mode: bool):
    def prepare(size, dtype, seed):
        x, (mean, var, weight, bias), axis = _bn_inputs(size, dtype, seed, channels_last)
        dy = np.random.default_rng(seed + 1).standard_normal(x.shape).astype(dtype)
        if not eval_mode:
            with fastbn.use_backend("reference"):
                _, mean, invstd = F.batch_norm_forward_train(x, weight, bias, 1e-3, axis=axis)
        result = {}

        def call():
            if eval_mode:
                grads = F.batch_norm_backward_eval(dy, x, mean, var, weight, 1e-3, axis=axis)
            else:
                grads = F.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis)
            result["dx"], result["dweight"], result["dbias"] = grads
            return grads

        return Prepared(call, lambda: {k: v.copy() for k, v in result.items()})
    return prepare


def bn_training_pieces_available() -> bool:
    return all(hasattr(F, name) for name in ("batch_norm_forward_train", "batch_norm_backward",
                                              "batch_norm_backward_eval"))


def bn_module_class():
    nn = getattr(fastbn, "nn", None)
    cls = getattr(nn, "BatchNorm1d", None)
    return cls if cls is not None and hasattr(cls, "backward") else None


def _bn_module(training: bool, channels_last: bool):
    def prepare(size, dtype, seed):
        x, (mean, var, weight, bias), axis = _bn_inputs(size, dtype, seed, channels_last)
        rng = np.random.default_rng(seed + 1)
        dy = rng.standard_normal(x.shape).astype(dtype)
        module = bn_module_class()(CHANNELS, axis=axis, dtype=dtype)
        module.weight.data[...] = weight
        module.bias.data[...] = bias
        module.running_mean[...] = mean
        module.running_var[...] = var
        module.train(training)
        result = {}

        def call():
            for param in module.parameters():
                param.grad = None
            result["y"] = module(x)
            result["dx"] = module.backward(dy)
            return result["dx"]

        def outputs():
            values = {"y": result["y"].copy(), "dx": result["dx"].copy(),
                      "dweight": module.weight.grad.copy(), "dbias": module.bias.grad.copy()}
            values.update({key: np.array(value, copy=True)
                           for key, value in module.state_dict().items()})
            return values

        return Prepared(call, outputs)
    return prepare


# section: optimizers and clipping ------------------------------------------------

OPTIMIZERS = {
    "sgd": (optim.SGD, dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "momentum": (optim.Momentum, dict(lr=0.01, momentum=0.9, weight_decay=0.01, maximize=True)),
    "rmsprop": (optim.RMSprop, dict(lr=0.01, momentum=0.5, centered=True, weight_decay=0.01)),
    "adam": (optim.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.01)),
    "adamw": (optim.AdamW, dict(lr=0.01, maximize=True)),
    "adagrad": (optim.Adagrad, dict(lr=0.01, lr_decay=0.01, weight_decay=0.01)),
    "lion": (optim.Lion, dict(lr=0.01, weight_decay=0.01)),
}


def _parameters(size: int, dtype, seed: int) -> List[Parameter]:
    rng = np.random.default_rng(seed)
    params = [Parameter(rng.standard_normal(shape).astype(dtype)) for shape in ((size,), (7,), (3, 11))]
    for param in params:
        param.grad = rng.standard_normal(param.shape).astype(dtype)
    return params


def _optimizer(name: str):
    cls, kwargs = OPTIMIZERS[name]

    def prepare(size, dtype, seed):
        params = _parameters(size, dtype, seed)
        opt = cls(params, **kwargs)

        def outputs():
            values = {f"param{i}": p.data.copy() for i, p in enumerate(params)}
            for i, param in enumerate(params):
                for key, value in opt.state.get(param, {}).items():
                    values[f"param{i}.{key}"] = np.array(value, copy=True)
            return values

        return Prepared(opt.step, outputs)
    return prepare


def _clip(norm_type: float):
    def prepare(size, dtype, seed):
        params = _parameters(size, dtype, seed)
        params[1].data = params[1].data.astype(np.float64 if dtype == np.float32 else np.float32)
        params[1].grad = params[1].grad.astype(params[1].data.dtype)  # mixed dtypes across params
        result = {}

        def call():
            result["norm"] = optim.clip_grad_norm_(params, max_norm=0.5, norm_type=norm_type)
            return result["norm"]

        return Prepared(call, lambda: {"norm": result["norm"],
                                       **{f"grad{i}": p.grad.copy() for i, p in enumerate(params)}})
    return prepare


# section: the catalogue ----------------------------------------------------------


def kernel_cases() -> List[KernelCase]:
    """Every public kernel path available in this build."""
    cases = [
        KernelCase("bn_eval_nchw", _bn_eval(channels_last=False, in_place=False)),
        KernelCase("bn_eval_nhwc", _bn_eval(channels_last=True, in_place=False)),
        KernelCase("bn_eval_in_place", _bn_eval(channels_last=False, in_place=True)),
        KernelCase("bn_eval_allocating", _bn_eval_allocating),
    ]
    if bn_training_available():
        cases += [KernelCase("bn_train_nchw", _bn_train_functional(channels_last=False)),
                  KernelCase("bn_train_nhwc", _bn_train_functional(channels_last=True))]
    if bn_training_pieces_available():
        cases += [KernelCase("bn_forward_train_nchw", _bn_forward_train(channels_last=False)),
                  KernelCase("bn_forward_train_nhwc", _bn_forward_train(channels_last=True)),
                  KernelCase("bn_backward_nchw", _bn_backward(channels_last=False, eval_mode=False)),
                  KernelCase("bn_backward_nhwc", _bn_backward(channels_last=True, eval_mode=False)),
                  KernelCase("bn_backward_eval_nchw", _bn_backward(channels_last=False, eval_mode=True)),
                  KernelCase("bn_backward_eval_nhwc", _bn_backward(channels_last=True, eval_mode=True))]
    if bn_module_class() is not None:
        cases += [KernelCase("bn_module_train_backward_nchw", _bn_module(True, False)),
                  KernelCase("bn_module_train_backward_nhwc", _bn_module(True, True)),
                  KernelCase("bn_module_eval_backward", _bn_module(False, False))]
    cases += [KernelCase(f"optim_{name}", _optimizer(name)) for name in OPTIMIZERS]
    cases += [KernelCase("clip_grad_norm_l2", _clip(2.0)), KernelCase("clip_grad_norm_inf", _clip(np.inf))]
    return cases


KERNEL_CASES = kernel_cases()
CASE_IDS = [case.name for case in KERNEL_CASES]


def run_case(case: KernelCase, size: int, dtype, seed: int = 0, calls: int = 2) -> Outputs:
    """Prepare, call `calls` times (state carries over), return the outputs."""
    prepared = case.prepare(size, dtype, seed)
    for _ in range(calls):
        prepared.call()
    return prepared.outputs()


def assert_identical(actual: Outputs, expected: Outputs, context: str = "") -> None:
    """Same names, dtypes, shapes and bits (NaN payloads included)."""
    assert actual.keys() == expected.keys(), context
    for name, value in expected.items():
        got = actual[name]
        if isinstance(value, np.ndarray):
            assert isinstance(got, np.ndarray) and got.dtype == value.dtype and got.shape == value.shape, \
                f"{context}: {name}"
            assert got.tobytes() == value.tobytes(), f"{context}: {name} differs in bits"
        else:
            assert np.float64(got).tobytes() == np.float64(value).tobytes(), f"{context}: {name}"


def assert_close_to_reference(actual: Outputs, expected: Outputs, dtype, context: str = "") -> None:
    tolerance = dict(rtol=1e-4, atol=1e-5) if np.dtype(dtype) == np.float32 else dict(rtol=1e-10, atol=1e-12)
    assert actual.keys() == expected.keys(), context
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, err_msg=f"{context}: {name}", **tolerance)


# section: the catalogue itself ---------------------------------------------------


def test_catalogue_covers_eval_batch_norm_every_optimizer_and_clipping():
    names = set(CASE_IDS)
    assert {"bn_eval_nchw", "bn_eval_nhwc", "clip_grad_norm_l2", "clip_grad_norm_inf"} <= names
    assert {f"optim_{name}" for name in ("sgd", "momentum", "rmsprop", "adam", "adamw", "adagrad",
                                         "lion")} <= names
    assert bn_training_available() == any(name.startswith("bn_train") for name in names)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=CASE_IDS)
def test_every_catalogue_entry_matches_the_reference(case, dtype):
    fast = run_case(case, 1000, dtype)
    with fastbn.use_backend("reference"):
        reference = run_case(case, 1000, dtype)
    assert_close_to_reference(fast, reference, dtype, case.name)
