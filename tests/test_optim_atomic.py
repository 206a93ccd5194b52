"""An optimizer step is all or nothing: a failure injected at any point
(a read-only array, a bad state entry, a resized parameter, a MemoryError at
the k-th state allocation, a KeyboardInterrupt at the k-th line of
fastbn/optim) leaves params, grads and state bitwise unchanged, or, when it
came after the commit point, fully stepped.  Also: parameters sharing memory
are refused, a set of parameters is refused, and the compiled bridge never
calls back into Python.

Every optimizer x both backends, on two param groups that mix float32 and
float64 and hold parameters with and without state.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest

import fastbn
from fastbn import optim
from fastbn.optim import _optim
from fastbn.optim._checks import check_disjoint_params
from fastbn.optim.optimizer import Optimizer
from fastbn.parameter import Parameter
from fastbn.reference import _optim_kernels as reference_optim_kernels

BACKENDS = ["fast", "reference"]

OPTIMIZERS: Dict[str, Tuple[type, dict]] = {
    "sgd": (optim.SGD, dict(lr=0.1)),
    "sgd_momentum": (optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.01)),
    "momentum": (optim.Momentum, dict(lr=0.1, momentum=0.9)),
    "rmsprop_centered_momentum": (optim.RMSprop, dict(lr=0.01, centered=True, momentum=0.5)),
    "adam_amsgrad": (optim.Adam, dict(lr=0.01, amsgrad=True)),
    "adamw": (optim.AdamW, dict(lr=0.01)),
    "adagrad": (optim.Adagrad, dict(lr=0.1, lr_decay=0.01)),
    "lion": (optim.Lion, dict(lr=0.01)),
    "nadam_decoupled": (optim.NAdam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    "radam": (optim.RAdam, dict(lr=0.01, betas=(0.9, 0.9))),
    "adadelta": (optim.Adadelta, dict(lr=1.0, weight_decay=0.01)),
    "adamax": (optim.Adamax, dict(lr=0.01)),
}

# Group 0: p0 (no state before the injected step), p1; group 1: p2 (float64),
# p3 (no state before), p4 (the last parameter, with state).
SHAPES = [(3,), (4, 2), (5,), (6,), (2, 3)]
DTYPES = [np.float32, np.float32, np.float64, np.float32, np.float32]
WARM_UP = (1, 2, 4)

OPTIM_DIR = os.path.dirname(inspect.getfile(optim.Optimizer))
TRACED = (OPTIM_DIR, inspect.getfile(reference_optim_kernels))


# section: setup and snapshots ------------------------------------------------

def build(case: str, backend: str) -> Tuple[List[Parameter], Optimizer]:
    """Params and optimizer after one warm-up step, with fresh gradients on
    every parameter for the step under test."""
    cls, kwargs = OPTIMIZERS[case]
    rng = np.random.default_rng(7)
    params = [Parameter(rng.standard_normal(shape).astype(dtype)) for shape, dtype in zip(SHAPES, DTYPES)]
    opt = cls([{"params": params[:2], "lr": kwargs["lr"] * 0.5}], **kwargs)
    # Added later: Adagrad creates the state of these on first use too.
    opt.add_param_group({"params": params[2:]})
    for index in WARM_UP:
        params[index].grad = rng.standard_normal(params[index].shape).astype(params[index].dtype)
    with fastbn.use_backend(backend):
        opt.step()
    for param in params:
        param.grad = rng.standard_normal(param.shape).astype(param.dtype)
    return params, opt


def _frozen(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, value.flags.writeable, value.tobytes())
    return (type(value).__name__, repr(value))


def snapshot(params: List[Parameter], opt: Optimizer) -> Dict[str, Any]:
    """Every param, grad and state entry (keys, arrays bit for bit, step
    counts), and which parameters have state."""
    values: Dict[str, Any] = {}
    for index, param in enumerate(params):
        values[f"p{index}.data"] = _frozen(param.data)
        values[f"p{index}.grad"] = _frozen(param.grad)
        entry = opt.state.get(param)  # .get: do not let the defaultdict insert
        if isinstance(entry, dict):
            values[f"p{index}.state"] = {key: _frozen(value) for key, value in entry.items()}
        else:
            values[f"p{index}.state"] = _frozen(entry)
    values["state_size"] = len(opt.state)
    values["hyperparameters"] = [repr({k: v for k, v in g.items() if k != "params"})
                                 for g in opt.param_groups]
    return values


def stepped_twin(case: str, backend: str, inject: Optional[Callable] = None) -> Dict[str, Any]:
    """The snapshot after an uninterrupted step of the same setup."""
    params, opt = build(case, backend)
    if inject is not None:
        inject(params, opt)
    with fastbn.use_backend(backend):
        opt.step()
    return snapshot(params, opt)


# section: injections -----------------------------------------------------------

def _last_state(opt, params):
    return opt.state[params[4]]


def _state_arrays(opt, params):
    return [key for key, value in _last_state(opt, params).items() if isinstance(value, np.ndarray)]


def _readonly(array: np.ndarray) -> np.ndarray:
    array = array.copy()
    array.flags.writeable = False
    return array


def _replace_state_arrays(make: Callable[[np.ndarray], np.ndarray]):
    def inject(params, opt):
        entry = _last_state(opt, params)
        keys = _state_arrays(opt, params)
        if not keys:
            pytest.skip("this optimizer keeps no state arrays")
        entry[keys[-1]] = make(entry[keys[-1]])
    return inject


def _set_step(value):
    def inject(params, opt):
        if not opt._counts_steps:
            pytest.skip("this optimizer counts no steps")
        _last_state(opt, params)["step"] = value
    return inject


def _resize_last(params, opt):
    params[4].data = np.ones((3, 4), np.float32)
    params[4].grad = np.ones((3, 4), np.float32)


def _overlap_last_with_p1(params, opt):
    # p4 (2, 3) becomes a view of p1's first 6 elements: same dtype and shape
    # as its state, so only the overlap is wrong.
    params[4].data = params[1].data.reshape(-1)[:6].reshape(2, 3)


def _setitem(obj, key, value):
    obj[key] = value


# name -> (injection, expected exception or None when the step must succeed);
# the message names param_groups[1] unless MESSAGES says otherwise.
INJECTIONS: Dict[str, Tuple[Callable, Optional[type]]] = {
    "readonly_param_first": (lambda p, o: setattr(p[0], "data", _readonly(p[0].data)), ValueError),
    "readonly_param_last": (lambda p, o: setattr(p[4], "data", _readonly(p[4].data)), ValueError),
    "noncontiguous_param_last": (lambda p, o: setattr(p[4], "data", np.asfortranarray(p[4].data)),
                                 ValueError),
    "readonly_grad_last": (lambda p, o: setattr(p[4], "grad", _readonly(p[4].grad)), None),
    "noncontiguous_grad_last": (lambda p, o: setattr(p[4], "grad", np.asfortranarray(p[4].grad)), None),
    "grad_wrong_dtype_last": (lambda p, o: setattr(p[4], "grad", p[4].grad.astype(np.float64)), TypeError),
    "grad_wrong_shape_last": (lambda p, o: setattr(p[4], "grad", p[4].grad.ravel()), ValueError),
    "grad_not_array_last": (lambda p, o: setattr(p[4], "grad", p[4].grad.tolist()), TypeError),
    "readonly_state_last": (_replace_state_arrays(_readonly), ValueError),
    "state_wrong_dtype_last": (_replace_state_arrays(lambda a: a.astype(np.float64)), ValueError),
    "state_wrong_shape_last": (_replace_state_arrays(lambda a: a.ravel().copy()), ValueError),
    "state_noncontiguous_last": (_replace_state_arrays(np.asfortranarray), ValueError),
    "state_not_array_last": (_replace_state_arrays(lambda a: a.tolist()), ValueError),
    "state_entry_not_dict_last": (lambda p, o: _setitem(o.state, p[4], [1, 2]), TypeError),
    "step_float_last": (_set_step(1.5), TypeError),
    "step_string_last": (_set_step("7"), TypeError),
    "step_bool_last": (_set_step(True), TypeError),
    "step_negative_last": (_set_step(-3), ValueError),
    "step_huge_last": (_set_step(2 ** 70), ValueError),
    "step_numpy_int_last": (_set_step(np.int64(4)), None),
    "resized_param_last": (_resize_last, ValueError),
    "overlapping_params": (_overlap_last_with_p1, ValueError),
    "bad_hyperparameter_last_group": (lambda p, o: _setitem(o.param_groups[1], "lr", -1.0), ValueError),
}


MESSAGES = {
    "readonly_param_first": r"param_groups\[0\]\['params'\]\[0\]\.data: expected a writeable",
    "overlapping_params": r"param_groups\[0\]\['params'\]\[1\] and param_groups\[1\]\['params'\]\[2\]",
    "bad_hyperparameter_last_group": r"param_groups\[1\]\['lr'\]",
}


def _no_state_arrays(case: str) -> bool:
    return case == "sgd"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("injection", list(INJECTIONS))
@pytest.mark.parametrize("case", list(OPTIMIZERS))
def test_injected_failure_leaves_everything_unchanged_or_fully_stepped(case, injection, backend):
    inject, error = INJECTIONS[injection]
    if injection == "resized_param_last" and _no_state_arrays(case):
        error = None  # nothing ties plain SGD to the old shape: the step is valid
    params, opt = build(case, backend)
    inject(params, opt)
    before = snapshot(params, opt)
    with fastbn.use_backend(backend):
        if error is None:
            opt.step()
        else:
            with pytest.raises(error, match=MESSAGES.get(injection, r"param_groups\[1\]\['params'\]\[2\]")):
                opt.step()
    after = snapshot(params, opt)
    if error is None:
        assert after == stepped_twin(case, backend, inject)
        assert after != before
    else:
        assert after == before


def test_injection_messages_name_the_argument_and_the_key():
    params, opt = build("adam_amsgrad", "fast")
    opt.state[params[4]]["exp_avg_sq"] = np.zeros(6, np.float32)
    with pytest.raises(ValueError, match=r"state 'exp_avg_sq' of param_groups\[1\]\['params'\]\[2\]: "
                                         r"expected .* shape \(2, 3\) .* got ndarray of dtype float32 "
                                         r"and shape \(6,\)"):
        opt.step()
    opt.state[params[4]]["exp_avg_sq"] = np.zeros((2, 3), np.float32)
    opt.state[params[4]]["step"] = -1
    with pytest.raises(ValueError, match=r"state 'step' of param_groups\[1\]\['params'\]\[2\]: "
                                         r"expected an int in \[0, 2\*\*53\], got -1"):
        opt.step()


# section: MemoryError at the k-th allocation ---------------------------------------

class _FailingAllocator:
    """Wraps the optimizer class's state allocation hook; raises MemoryError
    at call number `fail_at` (1-based), or never when fail_at is None."""

    def __init__(self, original, fail_at: Optional[int]) -> None:
        self.original, self.fail_at, self.calls = original, fail_at, 0

    def __call__(self, optimizer, param, key, group):
        self.calls += 1
        if self.calls == self.fail_at:
            raise MemoryError(f"injected at allocation {self.calls}")
        return self.original(optimizer, param, key, group)

    def as_method(self):
        def _initial_state_array(optimizer, param, key, group):
            return self(optimizer, param, key, group)
        return _initial_state_array


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(OPTIMIZERS))
def test_memory_error_at_any_state_allocation_changes_nothing(case, backend, monkeypatch):
    params, opt = build(case, backend)
    cls = type(opt)
    original = cls._initial_state_array
    counter = _FailingAllocator(original, None)
    monkeypatch.setattr(cls, "_initial_state_array", counter.as_method())
    with fastbn.use_backend(backend):
        opt.step()
    n_allocations = counter.calls
    expected_arrays = {"sgd": 0, "sgd_momentum": 2, "momentum": 2, "rmsprop_centered_momentum": 6,
                       "adam_amsgrad": 6, "adamw": 4, "adagrad": 1, "lion": 2, "nadam_decoupled": 4,
                       "radam": 4, "adadelta": 4, "adamax": 4}[case]
    assert n_allocations == expected_arrays  # p0 and p3 get state (Adagrad: p3 only)
    stepped = snapshot(params, opt)
    for fail_at in range(1, n_allocations + 1):
        params, opt = build(case, backend)
        before = snapshot(params, opt)
        monkeypatch.setattr(cls, "_initial_state_array", _FailingAllocator(original, fail_at).as_method())
        with fastbn.use_backend(backend):
            with pytest.raises(MemoryError, match=f"allocation {fail_at}"):
                opt.step()
        assert snapshot(params, opt) == before, f"MemoryError at allocation {fail_at}"
        monkeypatch.setattr(cls, "_initial_state_array", original)
        with fastbn.use_backend(backend):
            opt.step()  # the retry gives the uninterrupted result
        assert snapshot(params, opt) == stepped, f"retry after MemoryError at allocation {fail_at}"


# section: KeyboardInterrupt at the k-th line ----------------------------------------

class _InterruptAtLine:
    """A sys.settrace hook raising KeyboardInterrupt at the k-th line event
    in fastbn/optim or the reference optimizer kernels; records where it fired."""

    def __init__(self, k: int) -> None:
        self.k, self.count, self.fired_at = k, 0, None

    def __call__(self, frame, event, arg):
        if not frame.f_code.co_filename.startswith(TRACED):
            return None
        return self._local

    def _local(self, frame, event, arg):
        if event == "line":
            self.count += 1
            if self.count == self.k:
                self.fired_at = []  # (function, line) of every fastbn/optim frame, innermost first
                while frame is not None:
                    if frame.f_code.co_filename.startswith(OPTIM_DIR):
                        self.fired_at.append((frame.f_code.co_name, frame.f_lineno))
                    frame = frame.f_back
                raise KeyboardInterrupt
        return self._local


# Functions the reference backend's phase 3 calls (after its first write).
PHASE3_HELPERS = {"_reference_update", "_reference_tensor_update", "_attachments", "fresh"}


def _reference_phase3_first_line() -> int:
    lines, first = inspect.getsourcelines(Optimizer._planned_step)
    for offset, line in enumerate(lines):
        if "# Phase 3" in line:
            return first + offset
    raise AssertionError("Optimizer._planned_step has no '# Phase 3' marker")


def _interrupted_step(case: str, backend: str, k: int):
    params, opt = build(case, backend)
    before = snapshot(params, opt)
    tracer = _InterruptAtLine(k)
    interrupted = False
    with fastbn.use_backend(backend):
        sys.settrace(tracer)
        try:
            opt.step()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            sys.settrace(None)
    return before, snapshot(params, opt), interrupted, tracer.fired_at


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(OPTIMIZERS))
def test_keyboard_interrupt_at_any_line_leaves_the_step_unapplied_or_complete(case, backend):
    stepped = stepped_twin(case, backend)
    phase3 = _reference_phase3_first_line()
    outcomes = {"unchanged": 0, "stepped": 0, "reference_update_loop": 0}
    k = 0
    while True:
        k += 1
        before, after, interrupted, fired_at = _interrupted_step(case, backend, k)
        if not interrupted:
            assert after == stepped
            break
        if after == before:
            outcomes["unchanged"] += 1
        elif after == stepped:
            outcomes["stepped"] += 1
        else:
            # The documented window of the reference backend only: its
            # parameter-by-parameter update loop (after phase 3 began).
            assert backend == "reference", f"partial step after an interrupt at {fired_at}"
            assert any((name == "_planned_step" and line >= phase3) or name in PHASE3_HELPERS
                       for name, line in fired_at), fired_at
            outcomes["reference_update_loop"] += 1
        assert k < 5000
    assert outcomes["unchanged"] > 10  # the injection really reached the validation phases
    if backend == "fast":
        assert outcomes["reference_update_loop"] == 0


# section: regressions of the half-applied step ------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_step_creates_no_momentum_buffer_that_would_halve_the_next_step(backend):
    # dampening 0.5: a buffer's first step is b = g, a zero buffer's later
    # step b = 0.5 g; a buffer left behind by a failed step would halve it.
    def make():
        a, b = Parameter(np.ones(4, np.float32)), Parameter(np.ones(3, np.float32))
        opt = optim.SGD([a, b], lr=0.5, momentum=0.9, dampening=0.5)
        b.grad = np.ones(3, np.float32)
        with fastbn.use_backend(backend):
            opt.step()
        a.grad = np.ones(4, np.float32)
        return a, b, opt

    a, b, opt = make()
    b.data, b.grad = np.ones(5, np.float32), np.ones(5, np.float32)  # resized after it got state
    with fastbn.use_backend(backend):
        with pytest.raises(ValueError, match=r"'momentum_buffer' of param_groups\[0\]\['params'\]\[1\]"):
            opt.step()
    assert a not in opt.state
    b.grad = None
    with fastbn.use_backend(backend):
        opt.step()
    twin_a, _, twin = make()
    twin_a.grad = np.ones(4, np.float32)
    with fastbn.use_backend(backend):
        twin.param_groups[0]["params"][1].grad = None
        twin.step()
    np.testing.assert_array_equal(a.data, twin_a.data)
    np.testing.assert_array_equal(a.data, np.full(4, 0.5, np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_state_in_a_later_group_leaves_earlier_groups_unstepped(backend):
    a, b = Parameter(np.ones(3)), Parameter(np.ones(2))
    opt = optim.Adam([{"params": [a]}, {"params": [b]}], lr=0.1)
    a.grad, b.grad = np.ones(3), np.ones(2)
    with fastbn.use_backend(backend):
        opt.step()
    opt.state[b]["exp_avg"] = np.zeros(2, np.float32)
    a_before, step_before = a.data.copy(), opt.state[a]["step"]
    with fastbn.use_backend(backend):
        with pytest.raises(ValueError, match=r"'exp_avg' of param_groups\[1\]\['params'\]\[0\]"):
            opt.step()
    np.testing.assert_array_equal(a.data, a_before)
    assert opt.state[a]["step"] == step_before


# section: parameters sharing memory -----------------------------------------------

@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_sharing_memory_are_refused_with_any_thread_count(threads, backend):
    initial = fastbn.get_num_threads()
    fastbn.set_num_threads(threads)
    try:
        shared = np.ones(1 << 22, np.float32)
        a, b = Parameter(shared), Parameter(shared)
        a.grad, b.grad = np.ones_like(shared), np.ones_like(shared)
        opt = optim.SGD([a, b], lr=0.25)
        with fastbn.use_backend(backend):
            with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] and "
                                                 r"param_groups\[0\]\['params'\]\[1\]: expected "
                                                 r"parameters on separate memory"):
                opt.step()
        assert np.unique(shared).tolist() == [1.0]
    finally:
        fastbn.set_num_threads(initial)


def test_overlap_is_found_across_groups_and_after_data_is_swapped():
    buffer = np.zeros(10)
    a, b, c = Parameter(buffer[:5]), Parameter(buffer[5:]), Parameter(np.zeros(5))
    for param in (a, b, c):
        param.grad = np.ones(5)
    opt = optim.SGD([{"params": [a]}, {"params": [b, c]}], lr=1.0)
    opt.step()  # disjoint views of one buffer are fine
    np.testing.assert_array_equal(buffer, -np.ones(10))
    c.data = buffer[3:8]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] and param_groups\[1\]"
                                         r"\['params'\]\[1\]"):
        opt.step()
    np.testing.assert_array_equal(buffer, -np.ones(10))
    c.data = np.zeros(5)
    opt.step()
    np.testing.assert_array_equal(buffer, -2 * np.ones(10))


def test_interleaved_views_of_one_buffer_do_not_count_as_overlap():
    buffer = np.zeros(8)
    even, odd, shifted = Parameter(np.zeros(4)), Parameter(np.zeros(4)), Parameter(np.zeros(3))
    even.data, odd.data, shifted.data = buffer[::2], buffer[1::2], buffer[2::2]
    check_disjoint_params([{"params": [even, odd]}])  # byte spans overlap, elements do not
    with pytest.raises(ValueError, match=r"\[0\] and param_groups\[0\]\['params'\]\[1\]"):
        check_disjoint_params([{"params": [even, shifted]}])


# section: API ------------------------------------------------------------------------

@pytest.mark.parametrize("container", [set, frozenset])
def test_a_set_of_parameters_is_refused_because_its_order_is_not_reproducible(container):
    params = container([Parameter(np.zeros(2)), Parameter(np.zeros(3))])
    with pytest.raises(TypeError, match=r"params: expected an ordered collection .* got a "
                                        f"{container.__name__}"):
        optim.SGD(params, lr=0.1)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]: expected an ordered"):
        optim.SGD([{"params": params}], lr=0.1)


# What Optimizer._planned_step itself calls in Python; a call back from the
# compiled bridge would show up as another function called from that frame.
FUSED_STEP_CALLEES = {"_kernel_spec", "_validated_update", "_allocate_missing",
                      "_attachments", "fresh", "<genexpr>", "<listcomp>"}


def test_the_compiled_bridge_calls_no_python_function_during_a_step():
    params, opt = build("adam_amsgrad", "fast")
    # a non-contiguous gradient and parameters without state take the Python checks
    params[4].grad = np.asfortranarray(params[4].grad)
    callees = []

    def profiler(frame, event, arg):
        if event == "call" and frame.f_back is not None and frame.f_back.f_code.co_name == "_planned_step":
            callees.append(frame.f_code.co_name)

    sys.setprofile(profiler)
    try:
        opt.step()
    finally:
        sys.setprofile(None)
    assert "_validated_update" in callees and "_kernel_spec" in callees
    assert set(callees) <= FUSED_STEP_CALLEES
    assert snapshot(params, opt) == stepped_twin("adam_amsgrad", "fast",
                                                 lambda p, o: setattr(p[4], "grad", np.asfortranarray(p[4].grad)))
    assert not any(getattr(value, "__module__", "").startswith("fastbn.optim.")
                   and value.__module__ != _optim.__name__
                   for value in vars(_optim).values() if callable(value))


def test_a_missing_compiled_module_is_a_loud_import_error(tmp_path):
    code = ("import sys; sys.modules['fastbn.optim._optim'] = None\n"
            "try:\n    import fastbn.optim\nexcept ImportError as error:\n    print('ImportError', error)\n"
            "else:\n    print('imported')")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    # from a neutral folder: in a source checkout the working directory would
    # put the uncompiled package first on sys.path
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            timeout=120, cwd=str(tmp_path))
    assert result.stdout.startswith("ImportError"), result.stdout + result.stderr
    assert "compiled optimizer kernels" in result.stdout
