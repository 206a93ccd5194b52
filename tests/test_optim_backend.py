"""The optimizers, clip_grad_norm_ and the weight averaging follow the
backend switch through the kernels object (fastbn._backend), as the layers
do: under use_backend("reference") every kernel call goes to the NumPy
kernels object and none to the compiled one, and the other way round."""
from __future__ import annotations

import numpy as np
import pytest

import fastbn
from fastbn import optim
from fastbn._backend import FAST
from fastbn.optim.swa_utils import get_ema_multi_avg_fn
from fastbn.parameter import Parameter
from fastbn.reference import _kernels, _optim_kernels

OPTIM_METHODS = ("optim_plan", "grad_norm", "scale_grads", "lerp_")

OPTIMIZERS = {
    "sgd_momentum": lambda params: optim.SGD(params, lr=0.1, momentum=0.9),
    "adam": lambda params: optim.Adam(params, lr=0.01),
    "nadam": lambda params: optim.NAdam(params, lr=0.01),       # per-parameter scalar state
    "adagrad": lambda params: optim.Adagrad(params, lr=0.1),     # state made at construction
}


def _params(seed=0):
    rng = np.random.default_rng(seed)
    params = [Parameter(rng.standard_normal(shape).astype(np.float32)) for shape in ((5,), (3, 4), (7,))]
    for param in params[:2]:   # the last one has no gradient
        param.grad = rng.standard_normal(param.data.shape).astype(np.float32)
    return params


def _spy_on(monkeypatch, kernels, calls):
    """Record every optimizer-family call made on `kernels`."""
    for name in OPTIM_METHODS:
        original = getattr(kernels, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)
        monkeypatch.setattr(kernels, name, spy)


def _forbid(monkeypatch, kernels):
    for name in OPTIM_METHODS:
        def refuse(*args, _name=name, **kwargs):
            raise AssertionError(f"{kernels.name} kernels called: {_name}")
        monkeypatch.setattr(kernels, name, refuse)


@pytest.mark.parametrize("case", list(OPTIMIZERS))
def test_reference_step_and_clip_go_through_the_reference_kernels_object(case, monkeypatch):
    expected_params = _params()
    expected = OPTIMIZERS[case](expected_params)
    for _ in range(2):
        expected.step()      # the fast backend, before any patching
    calls, commits = [], []
    _spy_on(monkeypatch, _kernels.REFERENCE, calls)
    _forbid(monkeypatch, FAST)
    original_commit = _optim_kernels.ReferenceStepPlan.commit_and_run

    def counted_commit(plan):
        commits.append(type(plan))
        return original_commit(plan)
    monkeypatch.setattr(_optim_kernels.ReferenceStepPlan, "commit_and_run", counted_commit)
    params = _params()
    opt = OPTIMIZERS[case](params)
    with fastbn.use_backend("reference"):
        for _ in range(2):
            opt.step()
        assert calls == ["optim_plan", "optim_plan"]
        assert commits == [_optim_kernels.ReferenceStepPlan] * 2
        calls[:] = []
        before = float(np.sqrt(sum(np.sum(p.grad.astype(np.float64) ** 2) for p in params[:2])))
        norm = optim.clip_grad_norm_(params, max_norm=1e-3)
    assert calls == ["grad_norm", "scale_grads"]
    # the reference step is the same update as the fast one (to rounding)
    for param, twin in zip(params[:2], expected_params[:2]):
        np.testing.assert_allclose(param.data, twin.data, rtol=2e-6, atol=1e-7)
    np.testing.assert_array_equal(params[2].data, _params()[2].data)  # no gradient: not stepped
    assert norm == pytest.approx(before, rel=1e-12)
    assert float(np.sqrt(sum(np.sum(p.grad.astype(np.float64) ** 2) for p in params[:2]))) \
        == pytest.approx(1e-3, rel=1e-5)


def test_fast_step_and_clip_go_through_the_fast_kernels_object(monkeypatch):
    calls = []
    _forbid(monkeypatch, _kernels.REFERENCE)
    _spy_on(monkeypatch, FAST, calls)
    params = _params()
    opt = optim.Adam(params, lr=0.01)
    opt.step()
    optim.clip_grad_norm_(params, max_norm=1e-3)
    assert calls == ["optim_plan", "grad_norm", "scale_grads"]
    assert params[2] not in opt.state and all(p in opt.state for p in params[:2])


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_weight_averaging_goes_through_the_active_kernels_object(backend, monkeypatch):
    active, other = ((FAST, _kernels.REFERENCE) if backend == "fast" else (_kernels.REFERENCE, FAST))
    calls = []
    _spy_on(monkeypatch, active, calls)
    _forbid(monkeypatch, other)
    average = np.zeros(4)
    current = np.arange(4.0)
    with fastbn.use_backend(backend):
        get_ema_multi_avg_fn(0.75)([average], [current], 1)
    assert calls == ["lerp_"]
    np.testing.assert_allclose(average, 0.25 * current, rtol=1e-15)


def test_reference_plan_hands_every_parameter_with_a_gradient_to_the_python_checks():
    params = _params()
    opt = optim.Adam(params, lr=0.01)
    opt.step()   # every parameter with a gradient now has complete state
    plan = _kernels.REFERENCE.optim_plan(opt)
    assert plan.scan_group("adam", params, ("exp_avg", "exp_avg_sq"), (), 0) == [0, 1]
    assert plan.coefficient_keys(0) == []
