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


def make(case, layout, shapes=SHAPES, seed=1234):
    cls, kwargs = CASES[case]
    master, state_dtype, stochastic = LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    params = [fastbn.Parameter(rng.standard_normal(shape).astype(np.float32).astype(BF16)) for shape in shapes]
    return params, cls(params, state_dtype=state_dtype, stochastic_rounding=stochastic,
                       master_weights=master, **kwargs)


def run(params, opt, first, last, backend="fast"):
    with fastbn.use_backend(backend):
        for step in range(first, last):
            rng = np.random.default_rng(100 + step)
            for param in params:
                param.grad = rng.standard_normal(param.data.shape).astype(np.float32).astype(BF16)
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
