"""fastbn.optim.swa_utils against torch.optim.swa_utils: AveragedModel (SWA
and EMA, with and without buffers), SWALR's lr sequence, update_bn; the
fused averaging kernel against the NumPy reference on every target and
thread count."""
from __future__ import annotations

import numpy as np
import pytest

import fastbn
from fastbn import nn, optim
from fastbn.optim import swa_utils
from fastbn.parameter import Parameter

torch = pytest.importorskip("torch")

BACKENDS = ["fast", "reference"]
DTYPES = [np.float32, np.float64]
TORCH_DTYPES = {np.float32: torch.float32, np.float64: torch.float64}


def tolerances(dtype) -> dict:
    return dict(rtol=1e-6, atol=1e-7) if dtype == np.float32 else dict(rtol=1e-13, atol=1e-14)


def twin_models(dtype, seed=0):
    """A fastbn Linear -> BatchNorm1d model and a torch twin with the same weights."""
    ours = nn.Sequential(nn.Linear(5, 4, dtype=dtype, rng=np.random.default_rng(seed)),
                         nn.BatchNorm1d(4, dtype=dtype))
    theirs = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4)).to(TORCH_DTYPES[dtype])
    load_into_torch(ours, theirs)
    return ours, theirs


def load_into_torch(ours, theirs):
    with torch.no_grad():
        for name, value in ours.state_dict().items():
            theirs.state_dict()[name].copy_(torch.from_numpy(np.array(value)))


def perturb(ours, theirs, rng):
    """A training step's worth of change, the same in both models: new
    weights and (from a forward pass on the same batch) new running stats."""
    for param in ours.parameters():
        param.data[...] = rng.standard_normal(param.data.shape)
    batch = rng.standard_normal((6, 5)).astype(next(ours.parameters()).data.dtype)
    ours.train()
    ours(batch)
    load_into_torch(ours, theirs)


def assert_models_close(ours, theirs, dtype):
    theirs_state = theirs.state_dict()
    for name, value in ours.state_dict().items():
        expected = theirs_state[name].detach().numpy()
        np.testing.assert_allclose(np.array(value), expected, err_msg=name, **tolerances(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_buffers", [False, True])
@pytest.mark.parametrize("averaging", ["swa", "ema"])
def test_averaged_model_matches_torch_over_several_updates(averaging, use_buffers, dtype, backend):
    rng = np.random.default_rng(3)
    ours, theirs = twin_models(dtype)
    if averaging == "ema":
        mine = swa_utils.AveragedModel(ours, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.8),
                                       use_buffers=use_buffers)
        twin = torch.optim.swa_utils.AveragedModel(
            theirs, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.8),
            use_buffers=use_buffers)
    else:
        mine = swa_utils.AveragedModel(ours, use_buffers=use_buffers)
        twin = torch.optim.swa_utils.AveragedModel(theirs, use_buffers=use_buffers)
    with fastbn.use_backend(backend):
        for _ in range(6):
            perturb(ours, theirs, rng)
            mine.update_parameters(ours)
            twin.update_parameters(theirs)
    assert int(mine.n_averaged) == int(twin.n_averaged) == 6
    # torch's handling of integer buffers is its own (see AveragedModel's notes)
    skip = {"module.1.num_batches_tracked"}
    theirs_state = twin.state_dict()
    for name, value in mine.state_dict().items():
        if name in skip:
            continue
        np.testing.assert_allclose(np.array(value), theirs_state[name].detach().numpy(),
                                   err_msg=name, **tolerances(dtype))
    # the averaged copy is a separate model: the source keeps its own weights
    assert all(not np.shares_memory(a.data, b.data)
               for a, b in zip(mine.module.parameters(), ours.parameters()))


def test_swa_average_is_the_mean_of_the_snapshots():
    rng = np.random.default_rng(0)
    model = nn.Linear(3, 2, dtype=np.float64)
    averaged = swa_utils.AveragedModel(model)
    snapshots = []
    for _ in range(5):
        for param in model.parameters():
            param.data[...] = rng.standard_normal(param.data.shape)
        snapshots.append([p.data.copy() for p in model.parameters()])
        averaged.update_parameters(model)
    for index, param in enumerate(averaged.module.parameters()):
        np.testing.assert_allclose(param.data, np.mean([s[index] for s in snapshots], axis=0),
                                   rtol=1e-14, atol=1e-15)


def test_update_parameters_with_another_architecture_changes_nothing():
    model = nn.Linear(3, 2, dtype=np.float32)
    averaged = swa_utils.AveragedModel(model)
    averaged.update_parameters(model)
    before = {k: np.array(v, copy=True) for k, v in averaged.state_dict().items()}
    with pytest.raises(ValueError, match="model: expected 2 parameters"):
        averaged.update_parameters(nn.Linear(3, 2, bias=False, dtype=np.float32))
    with pytest.raises(ValueError, match="expected an array of dtype float32 and shape"):
        averaged.update_parameters(nn.Linear(3, 2, dtype=np.float64))
    with pytest.raises(TypeError, match="model: expected a fastbn.nn.Module"):
        averaged.update_parameters(object())
    for name, value in averaged.state_dict().items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


def test_ema_decay_outside_the_unit_interval_is_refused():
    with pytest.raises(ValueError, match="decay"):
        swa_utils.get_ema_multi_avg_fn(1.5)


# section: the averaging kernel -------------------------------------------------

SHAPES = [(1,), (7,), (4096,), (4097,), (70001,), (300, 301)]


def lerp_case(dtype, weight, backend):
    rng = np.random.default_rng(5)
    averages = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    currents = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    saved = [c.copy() for c in currents]
    with fastbn.use_backend(backend):
        swa_utils._lerp(averages, currents, weight)
    for current, copy in zip(currents, saved):
        np.testing.assert_array_equal(current, copy)  # read only
    return averages


@pytest.mark.parametrize("target", fastbn.available_simd_targets())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight", [0.001, 1 / 3, 0.5, 0.9, 1.0])
def test_lerp_kernel_matches_reference_on_every_target(weight, dtype, target, restore_config):
    fastbn.set_simd_target(target)
    fast = lerp_case(dtype, weight, "fast")
    expected = lerp_case(dtype, weight, "reference")
    for got, want in zip(fast, expected):
        np.testing.assert_allclose(got, want, rtol=2e-7 if dtype == np.float32 else 1e-15,
                                   atol=1e-7 if dtype == np.float32 else 1e-16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lerp_weight_one_gives_the_current_values_exactly(dtype):
    rng = np.random.default_rng(1)
    averages = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    currents = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    swa_utils._lerp(averages, currents, 1.0)
    for average, current in zip(averages, currents):
        np.testing.assert_array_equal(average, current)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lerp_kernel_gives_identical_bits_for_one_and_two_threads(dtype, restore_config):
    if restore_config < 2:
        pytest.skip("needs 2 threads")
    fastbn.set_num_threads(1)
    single = lerp_case(dtype, 0.3, "fast")
    fastbn.set_num_threads(2)
    double = lerp_case(dtype, 0.3, "fast")
    for a, b in zip(single, double):
        np.testing.assert_array_equal(a, b)


def test_lerp_mixing_dtypes_updates_each_in_its_own_precision():
    averages = [np.zeros(5, np.float32), np.zeros(3, np.float64)]
    currents = [np.full(5, 1 / 3, np.float32), np.full(3, 1 / 3)]
    swa_utils._lerp(averages, currents, 0.25)
    np.testing.assert_array_equal(averages[0], np.float32(0.25) * np.float32(1 / 3))
    np.testing.assert_array_equal(averages[1], 0.25 * (1 / 3))


def test_lerp_refuses_mismatched_pairs_before_writing():
    averages = [np.zeros(3), np.zeros(4)]
    with pytest.raises(ValueError, match=r"current_param_list\[1\]: expected dtype float64 and shape \(4,\)"):
        swa_utils._lerp(averages, [np.ones(3), np.ones(5)], 0.5)
    with pytest.raises(TypeError, match=r"averaged_param_list\[0\]: expected dtype float32 or float64"):
        swa_utils._lerp([np.zeros(3, np.int64)], [np.ones(3, np.int64)], 0.5)
    assert all(not a.any() for a in averages)


# section: SWALR ----------------------------------------------------------------

@pytest.mark.parametrize("anneal_strategy", ["cos", "linear"])
@pytest.mark.parametrize("anneal_epochs", [0, 1, 4])
def test_swalr_lr_sequence_matches_torch(anneal_epochs, anneal_strategy):
    params = [Parameter(np.zeros(2)), Parameter(np.zeros(3))]
    ours = optim.SGD([{"params": params[:1], "lr": 0.5}, {"params": params[1:], "lr": 0.1}], lr=0.1)
    tensors = [torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)]
    theirs = torch.optim.SGD([{"params": tensors[:1], "lr": 0.5}, {"params": tensors[1:], "lr": 0.1}],
                             lr=0.1)
    mine = swa_utils.SWALR(ours, swa_lr=[0.05, 0.2], anneal_epochs=anneal_epochs,
                           anneal_strategy=anneal_strategy)
    twin = torch.optim.swa_utils.SWALR(theirs, swa_lr=[0.05, 0.2], anneal_epochs=anneal_epochs,
                                       anneal_strategy=anneal_strategy)
    sequence, expected = [mine.get_last_lr()], [twin.get_last_lr()]
    for _ in range(8):
        ours.step()
        theirs.step()
        mine.step()
        twin.step()
        sequence.append(mine.get_last_lr())
        expected.append(twin.get_last_lr())
    np.testing.assert_allclose(sequence, expected, rtol=1e-14, atol=1e-16)
    assert sequence[-1] == pytest.approx([0.05, 0.2])
    assert [g["swa_lr"] for g in ours.param_groups] == [0.05, 0.2]


def test_swalr_state_dict_round_trip_continues_the_sequence():
    ours = optim.SGD([Parameter(np.zeros(2))], lr=1.0)
    scheduler = swa_utils.SWALR(ours, swa_lr=0.1, anneal_epochs=5)
    for _ in range(2):
        ours.step()
        scheduler.step()
    saved = scheduler.state_dict()
    expected = []
    for _ in range(3):
        ours.step()
        scheduler.step()
        expected.append(scheduler.get_last_lr())
    resumed_opt = optim.SGD([Parameter(np.zeros(2))], lr=1.0)
    resumed = swa_utils.SWALR(resumed_opt, swa_lr=0.1, anneal_epochs=5)
    resumed.load_state_dict(saved)
    resumed_opt.param_groups[0]["lr"] = saved["_last_lr"][0]
    got = []
    for _ in range(3):
        resumed_opt.step()
        resumed.step()
        got.append(resumed.get_last_lr())
    assert got == expected


def test_swalr_refuses_bad_arguments_and_leaves_the_optimizer_alone():
    ours = optim.SGD([Parameter(np.zeros(2))], lr=0.3)
    before = [dict(group) for group in ours.param_groups]
    with pytest.raises(ValueError, match="anneal_strategy: expected 'cos' or 'linear', got 'step'"):
        swa_utils.SWALR(ours, swa_lr=0.1, anneal_strategy="step")
    with pytest.raises(ValueError, match="anneal_epochs"):
        swa_utils.SWALR(ours, swa_lr=0.1, anneal_epochs=-1)
    with pytest.raises(ValueError, match="swa_lr: expected one value per param group"):
        swa_utils.SWALR(ours, swa_lr=[0.1, 0.2])
    with pytest.raises(ValueError, match="last_epoch"):
        swa_utils.SWALR(ours, swa_lr=0.1, last_epoch=-2)
    assert ours.param_groups == before


# section: update_bn ------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_update_bn_recomputes_running_stats_as_torch_and_as_a_cumulative_average(dtype):
    rng = np.random.default_rng(2)
    ours, theirs = twin_models(dtype)
    bn = ours[1]
    bn.momentum = 0.3
    ours(rng.standard_normal((8, 5)).astype(dtype))  # stale statistics to be replaced
    ours.eval()
    load_into_torch(ours, theirs)
    theirs.eval()
    batches = [rng.standard_normal((10, 5)).astype(dtype) for _ in range(3)]
    loader = [(batch, np.zeros(10)) for batch in batches]  # (input, target) pairs
    swa_utils.update_bn(loader, ours)
    torch.optim.swa_utils.update_bn([(torch.from_numpy(b), None) for b in batches], theirs)
    assert_models_close(ours, theirs, dtype)
    # momentum None = the cumulative average: the mean over the batches of
    # each batch's mean and unbiased variance (equal batch sizes)
    hidden = [ours[0](batch) for batch in batches]
    np.testing.assert_allclose(bn.running_mean, np.mean([h.mean(axis=0) for h in hidden], axis=0),
                               **tolerances(dtype))
    np.testing.assert_allclose(bn.running_var,
                               np.mean([h.var(axis=0, ddof=1) for h in hidden], axis=0),
                               **tolerances(dtype))
    # ... whose mean is that of a BatchNorm fed the concatenated data at once
    fresh = nn.BatchNorm1d(4, momentum=1.0, dtype=dtype)
    fresh(np.concatenate(hidden))
    np.testing.assert_allclose(bn.running_mean, fresh.running_mean, **tolerances(dtype))
    assert int(bn.num_batches_tracked) == 3
    assert bn.momentum == 0.3 and not ours.training and not bn.training


def test_update_bn_restores_momentum_and_mode_when_the_loader_fails():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2, momentum=0.2))

    def loader():
        yield np.ones((4, 3), np.float32)
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        swa_utils.update_bn(loader(), model)
    assert model[1].momentum == 0.2 and model.training


def test_update_bn_on_a_model_without_batchnorm_does_nothing():
    model = nn.Linear(3, 2)
    model.eval()
    swa_utils.update_bn([np.ones((2, 3), np.float32)], model)
    assert not model.training


def test_update_bn_on_the_averaged_model():
    rng = np.random.default_rng(4)
    ours, _ = twin_models(np.float64)
    averaged = swa_utils.AveragedModel(ours)
    averaged.update_parameters(ours)
    batches = [rng.standard_normal((6, 5)) for _ in range(2)]
    swa_utils.update_bn(batches, averaged)
    hidden = [averaged.module[0](batch) for batch in batches]
    np.testing.assert_allclose(averaged.module[1].running_mean,
                               np.mean([h.mean(axis=0) for h in hidden], axis=0), rtol=1e-13)
