"""bfloat16 parameters and gradients: the fused kernels against the NumPy
reference on every SIMD target and storage layout (with and without master
weights, float32 or bfloat16 state), thread-count independence, checkpoint
resume, accuracy against a float32 run, and what is refused."""
import os

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes")

import fastbn  # noqa: E402
from fastbn import optim  # noqa: E402
from fastbn.optim import _bf16  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
SHAPES = ((1,), (7,), (4097,), (70001,), (300, 31))

CASES = {
    "sgd_nesterov": (optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "sgd_plain": (optim.SGD, dict(lr=0.05)),
    "momentum": (optim.Momentum, dict(lr=0.1, momentum=0.95, weight_decay=0.02)),
    "rmsprop_centered_momentum": (optim.RMSprop, dict(lr=0.01, centered=True, momentum=0.5)),
    "adam_amsgrad": (optim.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.05)),
    "adamw": (optim.AdamW, dict(lr=0.01, maximize=True)),
    "adam_plain": (optim.Adam, dict(lr=0.01)),
    # the other two entry cases of the hand-written Adam loops (gradient
    # sign -1 without decoupled decay, +1 with it)
    "adam_maximize": (optim.Adam, dict(lr=0.01, maximize=True)),
    "adamw_plain": (optim.AdamW, dict(lr=0.01)),
    "lion": (optim.Lion, dict(lr=0.001, weight_decay=0.1)),
}
LAYOUTS = {  # (master_weights, state_dtype, stochastic_rounding)
    "sr_f32state": (False, "float32", True),
    "sr_bf16state": (False, "bfloat16", True),
    "nearest_bf16state": (False, "bfloat16", False),
    "master_f32state": (True, "float32", True),
    "master_bf16state": (True, "bfloat16", True),
}


def bits(array):
    return np.ascontiguousarray(array).view(np.uint16).astype(np.int64)


def make(case, layout, shapes=SHAPES, seed=1234, dtype=BF16):
    cls, kwargs = CASES[case]
    master, state_dtype, stochastic = LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    params = [fastbn.Parameter(rng.standard_normal(shape).astype(np.float32).astype(dtype)) for shape in shapes]
    return params, cls(params, state_dtype=state_dtype, stochastic_rounding=stochastic,
                       master_weights=master, **kwargs)


def run(params, opt, first, last, backend="fast"):
    with fastbn.use_backend(backend):
        for step in range(first, last):
            rng = np.random.default_rng(100 + step)
            for param in params:
                param.grad = rng.standard_normal(param.data.shape).astype(np.float32).astype(param.data.dtype)
            opt.step()


def snapshot(params, opt):
    state = {(index, key): value.copy() for index, param in enumerate(params)
             for key, value in opt.state[param].items() if isinstance(value, np.ndarray)}
    return [param.data.copy() for param in params], state


def close_in_bf16(fast, reference, name):
    """Mostly bit-identical (99%: bfloat16 inputs make exact rounding ties
    common, where a contracted multiply-add decides); the rest within a few
    bfloat16 ulps (float32
    rounding of the update differs, FMA contraction, and a value rounded one
    ulp apart feeds the later steps)."""
    a, b = fast.astype(np.float64), reference.astype(np.float64)
    scale = np.maximum(np.abs(a), np.abs(b))
    assert np.mean(bits(fast) == bits(reference)) >= 0.99, name
    assert np.all(np.abs(a - b) <= 2.0 ** -5 * scale + 2e-3), name


@pytest.mark.parametrize("target", fastbn.available_simd_targets())
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
def test_bf16_param_step_matches_reference_on_every_target(case, layout, target, restore_config):
    fastbn.set_simd_target(target)
    results = []
    for backend in ("fast", "reference"):
        params, opt = make(case, layout)
        run(params, opt, 0, 4, backend)
        results.append(snapshot(params, opt))
    (fast_params, fast_state), (ref_params, ref_state) = results
    assert fast_state.keys() == ref_state.keys()
    for index, (fast, ref) in enumerate(zip(fast_params, ref_params)):
        assert fast.dtype == BF16
        close_in_bf16(fast, ref, f"param {index}")
    for key in fast_state:
        assert fast_state[key].dtype == ref_state[key].dtype
        if fast_state[key].dtype == BF16:
            close_in_bf16(fast_state[key], ref_state[key], key)
        else:
            np.testing.assert_allclose(fast_state[key], ref_state[key], rtol=2e-3, atol=2e-3, err_msg=str(key))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_one_step_is_bit_identical_to_the_reference(layout):
    # One step from bfloat16 inputs: the float32 arithmetic of Adam agrees
    # to the last bit almost everywhere, and the rounding is the reference's.
    results = []
    for backend in ("fast", "reference"):
        params, opt = make("adamw", layout)
        run(params, opt, 0, 1, backend)
        results.append(snapshot(params, opt))
    for fast, ref in zip(results[0][0], results[1][0]):
        assert np.mean(bits(fast) == bits(ref)) >= 0.9999


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", ["adam_amsgrad", "rmsprop_centered_momentum", "sgd_nesterov"])
def test_one_two_and_three_threads_give_identical_bits(case, layout, restore_config):
    results = []
    for threads in (1, 2, 3):
        fastbn.set_num_threads(threads)
        params, opt = make(case, layout)
        run(params, opt, 0, 3)
        results.append(snapshot(params, opt))
    for params, state in results[1:]:
        for mine, first in zip(params, results[0][0]):
            np.testing.assert_array_equal(bits(mine), bits(first))
        for key in state:
            np.testing.assert_array_equal(np.ascontiguousarray(state[key]).view(np.uint8),
                                          np.ascontiguousarray(results[0][1][key]).view(np.uint8))


def test_parameter_rounding_uses_its_own_stream():
    # Slot 3 (the parameter) draws bits independent of the state slots.
    key = _bf16.tensor_key(0, 1, 0)
    streams = [_bf16.random_bits(key, 4096, slot) for slot in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert np.mean(streams[a] == streams[b]) < 0.01
            assert abs(np.corrcoef(streams[a].astype(float), streams[b].astype(float))[0, 1]) < 0.06


@pytest.mark.parametrize("layout", ["sr_f32state", "master_bf16state"])
def test_checkpoint_round_trip_resumes_bit_exact(layout, tmp_path):
    params, opt = make("adam_amsgrad", layout)
    opt.param_groups[0]["rounding_seed"] = 77
    run(params, opt, 0, 2)
    path = os.fspath(tmp_path / "run.fbk")
    fastbn.save(path, {"params": [p.data for p in params], "optimizer": opt})
    run(params, opt, 2, 5)

    resumed_params, resumed = make("adam_amsgrad", layout, seed=99)
    loaded = fastbn.load(path)
    for param, data in zip(resumed_params, loaded["params"]):
        assert data.dtype == BF16
        param.data[...] = data
    fastbn.load_into(path, {"optimizer": resumed}, strict=False)
    if LAYOUTS[layout][0]:
        assert resumed.state[resumed_params[0]]["master_param"].dtype == np.float32
    run(resumed_params, resumed, 2, 5)
    for a, b in zip(params, resumed_params):
        np.testing.assert_array_equal(bits(a.data), bits(b.data))
        for key, value in opt.state[a].items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(value.view(np.uint8), resumed.state[b][key].view(np.uint8))
            else:
                assert resumed.state[b][key] == value


@pytest.mark.parametrize("master", [False, True])
def test_bf16_param_adam_tracks_float32_adam(master):
    rng = np.random.default_rng(7)
    start = rng.standard_normal(20000).astype(np.float32).astype(BF16).astype(np.float32)
    target = rng.standard_normal(20000).astype(np.float32)
    noise = [rng.standard_normal(20000).astype(np.float32) * 0.1 for _ in range(100)]
    finals = {}
    for dtype in (np.float32, BF16):
        param = fastbn.Parameter(start.astype(dtype))
        opt = optim.Adam([param], lr=1e-2, master_weights=master)
        for step in range(100):
            param.grad = ((param.data.astype(np.float32) - target) + noise[step]).astype(dtype)
            opt.step()
        finals[dtype] = param.data.astype(np.float64)
    moved = np.linalg.norm(finals[np.float32] - start)
    error = np.linalg.norm(finals[BF16] - finals[np.float32])
    assert moved > 0.5
    assert error <= 3e-2 * moved  # bfloat16 resolution: 2**-8 relative per element


def test_stochastic_rounding_moves_bf16_params_where_nearest_stalls():
    # lr * 1 = 1e-3 is far below half a bfloat16 step at 1.0 (2**-8)
    results = {}
    for stochastic in (False, True):
        param = fastbn.Parameter(np.ones(8192, BF16))
        opt = optim.SGD([param], lr=1e-3, stochastic_rounding=stochastic)
        for _ in range(100):
            param.grad = np.ones(8192, BF16)
            opt.step()
        results[stochastic] = param.data.astype(np.float64).mean()
    assert results[False] == 1.0
    assert abs(results[True] - 0.9) < 0.005


def test_bad_grad_dtype_in_the_second_param_changes_nothing():
    params, opt = make("adam_amsgrad", "master_bf16state", shapes=((50,), (60,)))
    run(params, opt, 0, 1)
    before_data = [p.data.copy() for p in params]
    before_state = {id(p): {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in opt.state[p].items()}
                    for p in params}
    params[0].grad = np.ones(50, BF16)
    params[1].grad = np.ones(60, np.float32)
    for backend in ("fast", "reference"):
        with fastbn.use_backend(backend):
            with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[1\]\.grad: expected dtype bfloat16"):
                opt.step()
        for param, data in zip(params, before_data):
            np.testing.assert_array_equal(bits(param.data), bits(data))
            for key, value in before_state[id(param)].items():
                if isinstance(value, np.ndarray):
                    np.testing.assert_array_equal(opt.state[param][key].view(np.uint8), value.view(np.uint8))
                else:
                    assert opt.state[param][key] == value


@pytest.mark.parametrize("cls", [optim.Adagrad, optim.NAdam, optim.RAdam, optim.Adadelta, optim.Adamax])
def test_optimizers_without_bf16_params_raise_type_error_naming_param_and_dtype(cls):
    params = [fastbn.Parameter(np.zeros(3, np.float32)), fastbn.Parameter(np.zeros(3, BF16))]
    with pytest.raises(TypeError, match=r"\['params'\]\[1\]\.data: expected dtype float32 or float64.*got bfloat16"):
        cls(params)


def test_bf16_param_added_to_an_optimizer_built_without_rounding_raises():
    opt = optim.Adam([fastbn.Parameter(np.zeros(3, np.float32))])
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[0\]\.data: .*master_weights=True"):
        opt.add_param_group({"params": [fastbn.Parameter(np.zeros(3, BF16))]})
    assert len(opt.param_groups) == 1
    mixed = optim.Adam([fastbn.Parameter(np.zeros(3, np.float32))], master_weights=True)
    mixed.add_param_group({"params": [fastbn.Parameter(np.zeros(3, BF16))]})
    assert mixed.param_groups[1]["master_weights"] is True


def test_master_weights_must_be_a_bool_and_fixed_per_group():
    with pytest.raises(TypeError, match=r"master_weights: expected a bool"):
        optim.Adam([fastbn.Parameter(np.zeros(3, BF16))], master_weights="yes")
    opt = optim.Adam([fastbn.Parameter(np.zeros(3, BF16))], master_weights=True)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['master_weights'\]: expected True"):
        opt.add_param_group({"params": [fastbn.Parameter(np.zeros(3, BF16))], "master_weights": False})


# section: bit for bit: the kernels' rounding inside the update ---------------------

EXACT_CASES = ["sgd_nesterov", "momentum", "rmsprop_centered_momentum", "adam_amsgrad", "adamw", "adam_plain",
               "adam_maximize", "adamw_plain",
               "lion"]


def float32_twin(case, bf16_params, bf16_opt):
    """A float32 optimizer holding `bf16_opt`'s parameters and state widened
    to float32 (the values the bfloat16 kernels compute from)."""
    cls, kwargs = CASES[case]
    params = [fastbn.Parameter(p.data.astype(np.float32)) for p in bf16_params]
    twin = cls(params, **kwargs)
    saved = bf16_opt.state_dict()
    for entry in saved["state"].values():
        for key, value in entry.items():
            if isinstance(value, np.ndarray):
                entry[key] = value.astype(np.float32)
    for group in saved["param_groups"]:
        for key in ("state_dtype", "stochastic_rounding", "rounding_seed", "master_weights"):
            group.pop(key, None)
    if not twin._counts_steps:
        for entry in saved["state"].values():
            entry.pop("step", None)
    twin.load_state_dict(saved)
    return params, twin


@pytest.mark.parametrize("target", fastbn.available_simd_targets())
@pytest.mark.parametrize("layout, param_dtype", [("sr_f32state", "bfloat16"), ("sr_bf16state", "bfloat16"),
                                                  ("nearest_bf16state", "bfloat16"), ("sr_bf16state", "float32"),
                                                  ("nearest_bf16state", "float32")])
@pytest.mark.parametrize("case", EXACT_CASES)
def test_bf16_kernel_equals_float32_kernel_then_reference_rounding_bit_for_bit(case, layout, param_dtype,
                                                                               target, restore_config):
    # On one target the bfloat16 kernel runs the float32 kernel's arithmetic
    # on the widened values, then rounds each output as the NumPy twin does
    # (fastbn.optim._bf16): every bit of every output must agree.  float32
    # parameters with bfloat16 state are the state_dtype="bfloat16" kernels.
    fastbn.set_simd_target(target)
    _, state_dtype, stochastic = LAYOUTS[layout]
    dtype = BF16 if param_dtype == "bfloat16" else np.dtype(np.float32)
    params, opt = make(case, layout, dtype=dtype)
    opt.param_groups[0]["rounding_seed"] = 2024
    run(params, opt, 0, 2)
    twin_params, twin = float32_twin(case, params, opt)
    rng = np.random.default_rng(55)
    for param, twin_param in zip(params, twin_params):
        param.grad = rng.standard_normal(param.data.shape).astype(np.float32).astype(dtype)
        twin_param.grad = param.grad.astype(np.float32)
    opt.step()
    twin.step()
    slots = opt._state_slots(opt.param_groups[0])
    for position, (param, twin_param) in enumerate(zip(params, twin_params)):
        step = opt.state[param]["step"]
        key = _bf16.tensor_key(2024, step, position)
        if dtype == BF16:
            expected = _bf16.round_to_bf16(twin_param.data, key, _bf16.PARAM_SLOT, stochastic)
            np.testing.assert_array_equal(bits(param.data), bits(expected), err_msg=f"param {position}")
        else:
            np.testing.assert_array_equal(param.data.view(np.uint32), twin_param.data.view(np.uint32))
        for slot, name in enumerate(slots):
            if name is None:
                continue
            ours, theirs = opt.state[param][name], twin.state[twin_param][name]
            if state_dtype == "bfloat16":
                theirs = _bf16.round_to_bf16(theirs, key, slot, stochastic)
                np.testing.assert_array_equal(bits(ours), bits(theirs), err_msg=f"{name} {position}")
            else:
                np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32),
                                              err_msg=f"{name} {position}")


@pytest.mark.parametrize("target", fastbn.available_simd_targets())
@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("case", ["adamw", "adam_plain", "adam_maximize", "adamw_plain"])
def test_bf16_state_adam_with_nan_and_inf_in_some_blocks_is_bit_exact(case, stochastic, param_dtype, target,
                                                                      restore_config):
    # The AVX2 and AVX-512 Adam loops for bfloat16 state with float32 params
    # round a block without the per-lane NaN select unless its gradient
    # holds a NaN (the pure bfloat16 loops never take it with finite
    # hyperparameters): NaN (signalling, negative, payloads the rounding
    # could carry into the sign) and infinite gradients in a few blocks, at
    # block edges and in the remainder, must still round as the twin does,
    # and the clean blocks next to them too.
    fastbn.set_simd_target(target)
    cls, kwargs = CASES[case]
    dtype = BF16 if param_dtype == "bfloat16" else np.dtype(np.float32)
    shapes = ((4096 + 77,), (31,), (33,), (1000,))
    rng = np.random.default_rng(7)
    params = [fastbn.Parameter(rng.standard_normal(shape).astype(np.float32).astype(dtype)) for shape in shapes]
    opt = cls(params, state_dtype="bfloat16", stochastic_rounding=stochastic, **kwargs)
    opt.param_groups[0]["rounding_seed"] = 11
    for param in params:
        param.grad = rng.standard_normal(param.data.shape).astype(np.float32).astype(dtype)
    opt.step()
    if dtype == BF16:   # bfloat16 patterns (the top halves) widened
        specials = (np.array([0x7F81, 0xFFC1, 0x7FFF, 0x7F80, 0xFF80, 0x7FC0], np.uint32) << 16).view(np.float32)
    else:
        specials = np.array([0x7F800001, 0xFFC0ABCD, 0x7FBFFFFF, 0x7F800000, 0xFF800000, 0x7FC00000],
                            np.uint32).view(np.float32)
    for param in params:
        grad = rng.standard_normal(param.data.shape).astype(np.float32)
        n = grad.size
        where = [i for i in (0, 15, 16, 47, 100, 1001, n - 1, n - 40) if 0 <= i < n]
        grad[where] = specials[np.arange(len(where)) % len(specials)]
        with np.errstate(invalid="ignore"):   # NaN to bfloat16
            param.grad = grad.astype(dtype) if dtype == BF16 else grad
    twin_params, twin = float32_twin(case, params, opt)
    for param, twin_param in zip(params, twin_params):
        twin_param.grad = param.grad.astype(np.float32)
    opt.step()
    twin.step()
    slots = opt._state_slots(opt.param_groups[0])
    for position, (param, twin_param) in enumerate(zip(params, twin_params)):
        key = _bf16.tensor_key(11, opt.state[param]["step"], position)
        if dtype == BF16:
            expected = _bf16.round_to_bf16(twin_param.data, key, _bf16.PARAM_SLOT, stochastic)
            np.testing.assert_array_equal(bits(param.data), bits(expected), err_msg=f"param {position}")
        else:
            np.testing.assert_array_equal(param.data.view(np.uint32), twin_param.data.view(np.uint32))
        for slot, name in enumerate(slots):
            if name is None:
                continue
            expected = _bf16.round_to_bf16(twin.state[twin_param][name], key, slot, stochastic)
            np.testing.assert_array_equal(bits(opt.state[param][name]), bits(expected),
                                          err_msg=f"{name} {position}")
        assert np.isnan(opt.state[param]["exp_avg"].astype(np.float32)).any()


@pytest.mark.parametrize("target", fastbn.available_simd_targets())
@pytest.mark.parametrize("case", ["adam_amsgrad", "rmsprop_centered_momentum"])
def test_master_weights_kernel_equals_float32_kernel_bit_for_bit(case, target, restore_config):
    # The master copy is exactly the float32 kernel's parameter; the
    # bfloat16 parameter is its nearest-even rounding.
    fastbn.set_simd_target(target)
    params, opt = make(case, "master_f32state")
    run(params, opt, 0, 2)
    cls, kwargs = CASES[case]
    twin_params = [fastbn.Parameter(opt.state[p]["master_param"].copy()) for p in params]
    twin = cls(twin_params, **kwargs)
    saved = opt.state_dict()
    for entry in saved["state"].values():
        entry.pop("master_param")
    for group in saved["param_groups"]:
        for key in ("stochastic_rounding", "rounding_seed", "master_weights"):
            group.pop(key)
    twin.load_state_dict(saved)
    rng = np.random.default_rng(56)
    for param, twin_param in zip(params, twin_params):
        param.grad = rng.standard_normal(param.data.shape).astype(np.float32).astype(BF16)
        twin_param.grad = param.grad.astype(np.float32)
    opt.step()
    twin.step()
    for param, twin_param in zip(params, twin_params):
        master = opt.state[param]["master_param"]
        np.testing.assert_array_equal(master.view(np.uint32), twin_param.data.view(np.uint32))
        expected = _bf16.round_to_bf16(twin_param.data, 0, _bf16.PARAM_SLOT, stochastic=False)
        np.testing.assert_array_equal(bits(param.data), bits(expected))


@pytest.mark.parametrize("target", fastbn.available_simd_targets())
@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("case", ["adamw", "adam_plain", "adam_maximize", "adamw_plain"])
def test_pure_bf16_adam_with_nan_payloads_in_params_and_state_is_bit_exact(case, stochastic, target,
                                                                          restore_config):
    # The pure-bfloat16 AVX2 and AVX-512 Adam loops round NaN lanes with the plain add,
    # argued from bit patterns: every NaN it rounds comes from widened
    # bfloat16 (low 16 bits zero), whatever operand carried it.  NaN of every
    # kind (signalling, negative, payloads) in the parameter and both moments,
    # not only the gradient; a negative second moment (sqrt: the default
    # NaN); infinities, the largest finite values (overflow in g * g and in
    # the rounding) and subnormals: the float32 kernel then the twin's
    # rounding, bit for bit.
    fastbn.set_simd_target(target)
    cls, kwargs = CASES[case]
    rng = np.random.default_rng(9)
    shapes = ((4096 + 77,), (31,), (1000,))
    params = [fastbn.Parameter(rng.standard_normal(shape).astype(np.float32).astype(BF16)) for shape in shapes]
    opt = cls(params, state_dtype="bfloat16", stochastic_rounding=stochastic, **kwargs)
    opt.param_groups[0]["rounding_seed"] = 11
    for param in params:
        param.grad = rng.standard_normal(param.data.shape).astype(np.float32).astype(BF16)
    opt.step()
    specials = np.array([0x7F81, 0xFFC1, 0x7FFF, 0x7F80, 0xFF80, 0x7F7F, 0xFF7F, 0x0001, 0x8000, 0xFFBF],
                        np.uint16).view(BF16)
    for param in params:
        n = param.data.size
        where = np.array([i for i in (0, 3, 15, 16, 17, 40, 63, 100, 1001, n - 20, n - 1) if i < n])
        state = opt.state[param]
        param.data.reshape(-1)[where] = specials[np.arange(len(where)) % len(specials)]
        state["exp_avg"].reshape(-1)[where[::-1]] = specials[np.arange(len(where)) % len(specials)]
        v = state["exp_avg_sq"].reshape(-1)
        v[where[1::2]] = specials[(np.arange(len(where[1::2])) + 2) % len(specials)]
        v[5], v[6], v[8] = -1.0, 3e38, -0.0
        grad = rng.standard_normal(param.data.shape).astype(np.float32)
        grad[[1, 2, 30]] = [3.3e38, -3.3e38, 1e-40]
        grad = grad.astype(BF16)
        grad.reshape(-1)[7] = np.uint16(0x7F85).view(BF16)
        param.grad = grad
    twin_params, twin = float32_twin(case, params, opt)
    for param, twin_param in zip(params, twin_params):
        twin_param.grad = param.grad.astype(np.float32)
    with np.errstate(all="ignore"):
        opt.step()
        twin.step()
    slots = opt._state_slots(opt.param_groups[0])
    for position, (param, twin_param) in enumerate(zip(params, twin_params)):
        key = _bf16.tensor_key(11, opt.state[param]["step"], position)
        with np.errstate(all="ignore"):
            expected = _bf16.round_to_bf16(twin_param.data, key, _bf16.PARAM_SLOT, stochastic)
        np.testing.assert_array_equal(bits(param.data), bits(expected), err_msg=f"param {position}")
        for slot, name in enumerate(slots):
            if name is None:
                continue
            with np.errstate(all="ignore"):
                expected = _bf16.round_to_bf16(twin.state[twin_param][name], key, slot, stochastic)
            np.testing.assert_array_equal(bits(opt.state[param][name]), bits(expected),
                                          err_msg=f"{name} {position}")
        assert np.isnan(param.data.astype(np.float32)).any()
