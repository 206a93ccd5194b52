"""fastbn.torch.optim and fastbn.torch.clip_grad_norm_ against torch itself:
100-step trajectories with a scheduler and several param groups, zero-copy
updates, torch-layout state dicts in both directions, errors."""
import contextlib
import copy
import math

import pytest

torch = pytest.importorskip("torch")

import fastbn.torch as ft  # noqa: E402
from fastbn.torch import optim as fto  # noqa: E402

TOLERANCE = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.float64: dict(rtol=1e-9, atol=1e-11)}
SHAPES = [(7, 5), (5,), (4, 3, 3, 2), (1,)]


def make_params(dtype, seed=0, channels_last=False):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_()
              for shape in SHAPES]
    if channels_last:
        params[2] = (params[2].detach().contiguous(memory_format=torch.channels_last)
                     .requires_grad_())
    return params


def groups_of(params, **second_group_options):
    """Three groups; the second overrides some hyperparameters."""
    return [{"params": params[:2]}, {"params": params[2:3], **second_group_options},
            {"params": params[3:]}]


def set_grads(params, step):
    """The same deterministic gradients for both optimizers: a smooth
    function of the parameter plus seeded noise; the last parameter gets no
    gradient on every third step (skipped, as torch skips it)."""
    generator = torch.Generator().manual_seed(1000 + step)
    for index, param in enumerate(params):
        noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
        if index == len(params) - 1 and step % 3 == 0:
            param.grad = None
            continue
        with torch.no_grad():
            grad = torch.sin(2 * param) + 0.5 * noise
        param.grad = grad.contiguous(memory_format=torch.channels_last) \
            if param.dim() == 4 and not param.is_contiguous() else grad


def run(optimizer_factory, params, steps=100, scheduler=True):
    optimizer = optimizer_factory(params)
    schedule = (torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: 0.97 ** epoch * (1 + 0.5 * math.cos(epoch / 5)))
        if scheduler else None)
    for step in range(steps):
        set_grads(params, step)
        optimizer.step()
        if schedule is not None:
            schedule.step()
    return optimizer


def assert_params_close(ours, theirs, dtype):
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine.detach(), reference.detach(), **TOLERANCE[dtype])


def lion_reference(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
    """Lion in a few torch lines (Chen et al. 2023), as a torch.optim.Optimizer."""

    class Lion(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

        @torch.no_grad()
        def step(self):
            for group in self.param_groups:
                beta1, beta2 = group["betas"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                    update = (beta1 * m + (1 - beta1) * p.grad).sign()
                    p.add_(update + group["weight_decay"] * p, alpha=-group["lr"])
                    m.mul_(beta2).add_(p.grad, alpha=1 - beta2)

    return Lion(params)


# name -> (fastbn factory, torch factory); each takes a params list
CASES = {
    "sgd": (lambda p: fto.SGD(groups_of(p, lr=0.02), lr=0.05),
            lambda p: torch.optim.SGD(groups_of(p, lr=0.02), lr=0.05)),
    "sgd_momentum_wd_maximize": (
        lambda p: fto.SGD(groups_of(p, momentum=0.5), lr=0.01, momentum=0.9, dampening=0.1,
                          weight_decay=1e-2, maximize=True),
        lambda p: torch.optim.SGD(groups_of(p, momentum=0.5), lr=0.01, momentum=0.9,
                                  dampening=0.1, weight_decay=1e-2, maximize=True)),
    "sgd_nesterov": (lambda p: fto.SGD(groups_of(p, lr=0.003), lr=0.01, momentum=0.9,
                                       nesterov=True, weight_decay=1e-3),
                     lambda p: torch.optim.SGD(groups_of(p, lr=0.003), lr=0.01, momentum=0.9,
                                               nesterov=True, weight_decay=1e-3)),
    "rmsprop_centered_momentum": (
        lambda p: fto.RMSprop(groups_of(p, centered=False), lr=1e-3, momentum=0.8,
                              centered=True, weight_decay=1e-2),
        lambda p: torch.optim.RMSprop(groups_of(p, centered=False), lr=1e-3, momentum=0.8,
                                      centered=True, weight_decay=1e-2)),
    "adam_amsgrad": (lambda p: fto.Adam(groups_of(p, amsgrad=False), lr=1e-2, amsgrad=True,
                                        weight_decay=1e-2),
                     lambda p: torch.optim.Adam(groups_of(p, amsgrad=False), lr=1e-2,
                                                amsgrad=True, weight_decay=1e-2)),
    "adamw": (lambda p: fto.AdamW(groups_of(p, weight_decay=0.1), lr=1e-2, betas=(0.8, 0.99)),
              lambda p: torch.optim.AdamW(groups_of(p, weight_decay=0.1), lr=1e-2,
                                          betas=(0.8, 0.99))),
    "adagrad": (lambda p: fto.Adagrad(groups_of(p, lr=0.05), lr=0.1, lr_decay=1e-2,
                                      initial_accumulator_value=0.1, weight_decay=1e-3),
                lambda p: torch.optim.Adagrad(groups_of(p, lr=0.05), lr=0.1, lr_decay=1e-2,
                                              initial_accumulator_value=0.1,
                                              weight_decay=1e-3)),
    # Momentum(lr=g, momentum=b) is torch SGD(lr=g*(1-b), momentum=b, dampening=0)
    "momentum": (lambda p: fto.Momentum(groups_of(p, lr=0.1), lr=0.3, momentum=0.9,
                                        weight_decay=1e-2),
                 lambda p: torch.optim.SGD(groups_of(p, lr=0.1 * 0.1), lr=0.3 * 0.1,
                                           momentum=0.9, weight_decay=1e-2)),
    "lion": (lambda p: fto.Lion(groups_of(p), lr=1e-3, weight_decay=0.1),
             lambda p: lion_reference(groups_of(p), lr=1e-3, weight_decay=0.1)),
    "nadam_weight_decay": (
        lambda p: fto.NAdam(groups_of(p, momentum_decay=8e-3), lr=1e-2, weight_decay=1e-2),
        lambda p: torch.optim.NAdam(groups_of(p, momentum_decay=8e-3), lr=1e-2,
                                    weight_decay=1e-2)),
    "nadam_decoupled_maximize": (
        lambda p: fto.NAdam(groups_of(p, lr=3e-3), lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1,
                            decoupled_weight_decay=True, maximize=True),
        lambda p: torch.optim.NAdam(groups_of(p, lr=3e-3), lr=1e-2, betas=(0.8, 0.99),
                                    weight_decay=0.1, decoupled_weight_decay=True,
                                    maximize=True)),
    "radam_weight_decay": (
        lambda p: fto.RAdam(groups_of(p, betas=(0.5, 0.9)), lr=1e-2, weight_decay=1e-2),
        lambda p: torch.optim.RAdam(groups_of(p, betas=(0.5, 0.9)), lr=1e-2,
                                    weight_decay=1e-2)),
    "radam_decoupled_maximize": (
        lambda p: fto.RAdam(groups_of(p, lr=3e-3), lr=1e-2, weight_decay=0.1,
                            decoupled_weight_decay=True, maximize=True),
        lambda p: torch.optim.RAdam(groups_of(p, lr=3e-3), lr=1e-2, weight_decay=0.1,
                                    decoupled_weight_decay=True, maximize=True)),
    "adadelta": (lambda p: fto.Adadelta(groups_of(p, rho=0.5), lr=0.5, weight_decay=1e-2),
                 lambda p: torch.optim.Adadelta(groups_of(p, rho=0.5), lr=0.5,
                                                weight_decay=1e-2)),
    "adadelta_maximize": (
        lambda p: fto.Adadelta(groups_of(p, eps=1e-4), rho=0.95, maximize=True),
        lambda p: torch.optim.Adadelta(groups_of(p, eps=1e-4), rho=0.95, maximize=True)),
    "adamax_weight_decay_maximize": (
        lambda p: fto.Adamax(groups_of(p, betas=(0.5, 0.9)), lr=1e-2, weight_decay=1e-2,
                             maximize=True),
        lambda p: torch.optim.Adamax(groups_of(p, betas=(0.5, 0.9)), lr=1e-2, weight_decay=1e-2,
                                     maximize=True)),
}


@contextlib.contextmanager
def torch_scalars_in_float64(case):
    """torch keeps NAdam's mu_product in its default dtype (float32 unless
    changed); float64 makes it the float fastbn keeps, so that float64
    trajectories can be compared tightly.  Other cases run unchanged."""
    if "nadam" not in case:
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", sorted(CASES))
def test_100_step_trajectory_with_scheduler_and_groups_matches_torch(case, dtype):
    ours_factory, theirs_factory = CASES[case]
    ours, theirs = make_params(dtype), make_params(dtype)
    storage = [p.data_ptr() for p in ours]
    objects = list(ours)
    optimizer = run(ours_factory, ours)
    with torch_scalars_in_float64(case):
        run(theirs_factory, theirs)
    assert_params_close(ours, theirs, dtype)
    # updated in place: the same tensor objects over the same memory
    assert [p.data_ptr() for p in ours] == storage
    assert all(a is b for a, b in zip(optimizer.param_groups[0]["params"], objects[:2]))


def test_channels_last_parameter_keeps_its_layout_and_state_matches_torch():
    ours, theirs = make_params(torch.float32, channels_last=True), \
        make_params(torch.float32, channels_last=True)
    optimizer = run(lambda p: fto.Adam(p, lr=1e-2), ours, steps=30)
    reference = run(lambda p: torch.optim.Adam(p, lr=1e-2), theirs, steps=30)
    assert_params_close(ours, theirs, torch.float32)
    assert ours[2].is_contiguous(memory_format=torch.channels_last)
    state = optimizer.state[ours[2]]["exp_avg"]
    assert state.stride() == ours[2].stride()
    torch.testing.assert_close(state, reference.state[theirs[2]]["exp_avg"],
                               **TOLERANCE[torch.float32])


def test_layout_change_after_construction_carries_the_state_along():
    ours, theirs = make_params(torch.float64), make_params(torch.float64)
    optimizer = fto.RMSprop(ours, lr=1e-2, momentum=0.5)
    reference = torch.optim.RMSprop(theirs, lr=1e-2, momentum=0.5)
    for step in range(10):
        if step == 5:  # what model.to(memory_format=torch.channels_last) does
            for params in (ours, theirs):
                params[2].data = params[2].data.contiguous(memory_format=torch.channels_last)
        for params, opt in ((ours, optimizer), (theirs, reference)):
            set_grads(params, step)
            opt.step()
    assert_params_close(ours, theirs, torch.float64)


def test_is_a_torch_optimizer_and_schedulers_drive_its_lr():
    params = make_params(torch.float32)
    for cls in (fto.SGD, fto.Momentum, fto.RMSprop, fto.Adam, fto.AdamW, fto.Adagrad, fto.NAdam,
                fto.RAdam, fto.Adadelta, fto.Adamax, fto.Lion):
        assert isinstance(cls(params), torch.optim.Optimizer)
    optimizer = fto.SGD(params, lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    before = params[0].detach().clone()
    set_grads(params, 1)
    optimizer.step()
    scheduler.step()
    optimizer.step()  # same gradient, half the rate
    torch.testing.assert_close(params[0].detach(), before - 1.5 * params[0].grad)


def test_parameters_without_grad_are_untouched_and_get_no_state():
    params = make_params(torch.float64)
    optimizer = fto.Adam(params, lr=0.1)
    before = params[1].detach().clone()
    set_grads(params, 1)
    params[1].grad = None
    optimizer.step()
    assert torch.equal(params[1].detach(), before)
    assert params[1] not in optimizer.state and params[0] in optimizer.state


def test_state_tensors_share_memory_with_the_optimizer_state():
    params = make_params(torch.float32)
    optimizer = fto.Adam(params, lr=0.1)
    set_grads(params, 1)
    optimizer.step()
    exp_avg = optimizer.state_dict()["state"][0]["exp_avg"]
    pointer = exp_avg.data_ptr()
    snapshot = exp_avg.clone()
    set_grads(params, 2)
    optimizer.step()
    assert optimizer.state[params[0]]["exp_avg"].data_ptr() == pointer
    assert not torch.equal(exp_avg, snapshot)  # live, as torch's state_dict is
    step = optimizer.state[params[0]]["step"]
    assert step.dtype == torch.float32 and step.dim() == 0 and step.item() == 2


def test_step_bumps_the_version_so_stale_graphs_fail_like_torch():
    param = torch.randn(5, requires_grad=True)
    optimizer = fto.SGD([param], lr=0.1)
    param.grad = torch.ones(5)
    loss = (param * param).sum()  # saves param for backward
    optimizer.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


STATE_CASES = {
    "adam": (lambda p: fto.Adam(groups_of(p, lr=3e-3), lr=1e-2, amsgrad=True),
             lambda p: torch.optim.Adam(groups_of(p, lr=3e-3), lr=1e-2, amsgrad=True)),
    "adamw": (lambda p: fto.AdamW(p, lr=1e-2), lambda p: torch.optim.AdamW(p, lr=1e-2)),
    "sgd": (lambda p: fto.SGD(p, lr=1e-2, momentum=0.9), lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9)),
    "rmsprop": (lambda p: fto.RMSprop(p, momentum=0.5, centered=True),
                lambda p: torch.optim.RMSprop(p, momentum=0.5, centered=True)),
    "adagrad": (lambda p: fto.Adagrad(p), lambda p: torch.optim.Adagrad(p)),
    "nadam": (lambda p: fto.NAdam(groups_of(p, lr=3e-3), lr=1e-2, weight_decay=1e-2),
              lambda p: torch.optim.NAdam(groups_of(p, lr=3e-3), lr=1e-2, weight_decay=1e-2)),
    "radam": (lambda p: fto.RAdam(p, lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True),
              lambda p: torch.optim.RAdam(p, lr=1e-2, weight_decay=1e-2,
                                          decoupled_weight_decay=True)),
    "adadelta": (lambda p: fto.Adadelta(p, weight_decay=1e-2),
                 lambda p: torch.optim.Adadelta(p, weight_decay=1e-2)),
    "adamax": (lambda p: fto.Adamax(p, lr=1e-2), lambda p: torch.optim.Adamax(p, lr=1e-2)),
}


def train(optimizer, params, steps, first=0):
    for step in range(first, first + steps):
        set_grads(params, step)
        optimizer.step()


@pytest.mark.parametrize("case", sorted(STATE_CASES))
@pytest.mark.parametrize("direction", ["torch_to_fastbn", "fastbn_to_torch"])
def test_checkpoint_moves_between_torch_and_fastbn_and_training_continues_identically(case,
                                                                                       direction):
    ours_factory, theirs_factory = STATE_CASES[case]
    first, second = ((theirs_factory, ours_factory) if direction == "torch_to_fastbn"
                     else (ours_factory, theirs_factory))
    with torch_scalars_in_float64(case):
        params = make_params(torch.float64, channels_last=True)
        optimizer = first(params)
        train(optimizer, params, 10)
        saved = copy.deepcopy(optimizer.state_dict())
        resumed_params = [p.detach().clone(memory_format=torch.preserve_format).requires_grad_()
                          for p in params]
        resumed = second(resumed_params)
        resumed.load_state_dict(saved)
        torch_optimizer = optimizer if direction == "torch_to_fastbn" else resumed
        for ours, theirs in zip(resumed.state_dict()["param_groups"],
                                optimizer.state_dict()["param_groups"]):
            # every torch entry carried over (fastbn adds bias_correction to Adam's)
            for key in torch_optimizer.state_dict()["param_groups"][0]:
                assert ours[key] == theirs[key], key
        for index, entry in optimizer.state_dict()["state"].items():
            for key, value in entry.items():
                torch.testing.assert_close(resumed.state_dict()["state"][index][key], value,
                                           check_dtype=key not in ("step", "mu_product"))
        train(optimizer, params, 10, first=10)
        train(resumed, resumed_params, 10, first=10)
        assert_params_close(resumed_params, params, torch.float64)


def test_nadam_mu_product_is_a_0d_tensor_and_torchs_float32_one_loads():
    params = make_params(torch.float64)
    source = torch.optim.NAdam(params, lr=1e-2)  # default dtype float32: float32 mu_product
    train(source, params, 3)
    saved = source.state_dict()["state"][0]["mu_product"]
    assert saved.dtype == torch.float32
    optimizer = fto.NAdam([p.detach().clone().requires_grad_() for p in params], lr=1e-2)
    optimizer.load_state_dict(source.state_dict())
    mu_product = optimizer.state_dict()["state"][0]["mu_product"]
    assert mu_product.dim() == 0 and mu_product.dtype == torch.float64
    assert mu_product.item() == saved.item()
    # and back: torch takes it (cast to the parameter's dtype, as its own)
    back = torch.optim.NAdam([p.detach().clone().requires_grad_() for p in params], lr=1e-2)
    back.load_state_dict(optimizer.state_dict())
    assert back.state_dict()["state"][0]["mu_product"].item() == saved.item()


def test_nadam_checkpoint_resumes_bit_exactly_in_fastbn():
    params = make_params(torch.float64)
    optimizer = fto.NAdam(groups_of(params), lr=1e-2)
    train(optimizer, params, 7)
    saved = copy.deepcopy(optimizer.state_dict())
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = fto.NAdam(groups_of(resumed_params), lr=1e-2)
    resumed.load_state_dict(saved)
    train(optimizer, params, 5, first=7)
    train(resumed, resumed_params, 5, first=7)
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(params, resumed_params))


def test_loading_a_bad_state_dict_changes_nothing():
    params = make_params(torch.float32)
    optimizer = fto.Adam(groups_of(params), lr=0.1)
    train(optimizer, params, 2)
    before = copy.deepcopy(optimizer.state_dict())
    bad = copy.deepcopy(before)
    bad["param_groups"][2]["lr"] = 0.5
    bad["state"][3]["exp_avg"] = torch.zeros(2)  # parameter 3 has shape (1,)
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\[3\]\['exp_avg'\].*shape"):
        optimizer.load_state_dict(bad)
    after = optimizer.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for index, entry in before["state"].items():
        for key, value in entry.items():
            assert torch.equal(after["state"][index][key], value)


def test_float32_state_from_a_float64_checkpoint_is_cast_like_torch():
    params64 = make_params(torch.float64)
    source = torch.optim.Adam(params64, lr=0.1)
    train(source, params64, 3)
    params32 = make_params(torch.float32)
    optimizer = fto.Adam(params32, lr=0.1)
    optimizer.load_state_dict(source.state_dict())
    assert optimizer.state[params32[0]]["exp_avg"].dtype == torch.float32


def test_a_sparse_gradient_raises_before_any_parameter_changes():
    params = make_params(torch.float32)
    optimizer = fto.Adam(groups_of(params), lr=0.1)
    train(optimizer, params, 2)
    set_grads(params, 4)
    params[3].grad = params[3].grad.to_sparse()  # the last group's: checked before group 0 steps
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(TypeError, match=r"param_groups\[2\]\['params'\]\[0\]\.grad.*sparse"):
        optimizer.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    for index, entry in state_before["state"].items():
        for key, value in entry.items():
            assert torch.equal(optimizer.state_dict()["state"][index][key], value)


def test_unsupported_parameters_and_options_raise_clear_errors():
    with pytest.raises(TypeError, match=r"params'\]\[0\].*float16"):
        fto.Adam([torch.zeros(3, dtype=torch.float16, requires_grad=True)])
    with pytest.raises(ValueError, match=r"params'\]\[0\].*CPU tensor.*meta"):
        fto.Adam([torch.zeros(3, device="meta", requires_grad=True)])
    with pytest.raises(ValueError, match=r"params'\]\[0\].*dense"):
        fto.Adam([torch.zeros(4, 6)[:, ::2].detach().requires_grad_()])
    with pytest.raises(ValueError, match="differentiable"):
        fto.Adam(make_params(torch.float32), differentiable=True)
    with pytest.raises(ValueError, match="lr"):
        fto.Adam(make_params(torch.float32), lr=-1.0)
    optimizer = fto.SGD(make_params(torch.float32)[:1])
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[0\]"):
        optimizer.add_param_group({"params": [torch.zeros(2, dtype=torch.int64)]})
    assert len(optimizer.param_groups) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch(dtype, norm_type, max_norm):
    ours, theirs = make_params(dtype, channels_last=True), make_params(dtype, channels_last=True)
    for params in (ours, theirs):
        set_grads(params, 3)  # the last parameter has no gradient at step 3
    pointers = [p.grad.data_ptr() for p in ours[:-1]]
    norm = ft.clip_grad_norm_(ours, max_norm, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    torch.testing.assert_close(norm, expected, **TOLERANCE[dtype])
    for mine, reference in zip(ours[:-1], theirs[:-1]):
        torch.testing.assert_close(mine.grad, reference.grad, **TOLERANCE[dtype])
    assert [p.grad.data_ptr() for p in ours[:-1]] == pointers


def test_clip_grad_norm_of_nonfinite_gradients_raises_when_asked():
    param = torch.zeros(3, requires_grad=True)
    param.grad = torch.tensor([1.0, math.inf, 0.0])
    with pytest.raises(RuntimeError, match="non-finite"):
        ft.clip_grad_norm_(param, 1.0, error_if_nonfinite=True)
    assert param.grad[0].item() == 1.0


def test_named_parameters_are_accepted_and_their_names_saved():
    model = torch.nn.Linear(3, 2)
    optimizer = fto.Adam(model.named_parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    assert optimizer.state_dict()["param_groups"][0]["param_names"] == ["weight", "bias"]


def test_pickling_is_refused_with_a_pointer_to_state_dict():
    optimizer = fto.SGD(make_params(torch.float32), lr=0.1)
    with pytest.raises(TypeError, match="state_dict"):
        copy.deepcopy(optimizer)


def test_load_state_dict_rejects_a_non_dict():
    optimizer = fto.SGD(make_params(torch.float32), lr=0.1)
    with pytest.raises(TypeError, match="state_dict: expected a dict"):
        optimizer.load_state_dict([1, 2])
