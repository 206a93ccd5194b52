"""fastbn.optim.lr_range_test: Smith's learning-rate range test."""
import math
import sys
import warnings

import numpy as np
import pytest

from fastbn.optim.lr_range_test import LRRangeTestResult, lr_range_test, plot_lr_range_test


class FakeOptimizer:
    def __init__(self, lrs=(0.1,)):
        self.param_groups = [{"params": [], "lr": lr, "momentum": 0.9} for lr in lrs]


def loss_of_lr(lr):
    """A noiseless range-test curve: flat at 2 for small lrs, falling to 1
    around lr = 1e-3 (a logistic in log10 lr), exploding above lr = 0.1."""
    falling = 1.0 / (1.0 + math.exp(-3.0 * (math.log10(lr) + 3.0)))
    exploding = (lr / 0.1) ** 4 if lr > 0.1 else 0.0
    return 2.0 - falling + exploding


def curve_step_fn(optimizer, record=None):
    def step_fn():
        lrs = [group["lr"] for group in optimizer.param_groups]
        if record is not None:
            record.append(lrs)
        return loss_of_lr(lrs[0])
    return step_fn


def test_exp_sweep_is_geometric_from_start_to_end():
    optimizer = FakeOptimizer()
    result = lr_range_test(curve_step_fn(optimizer), optimizer, 1e-6, 1e-2, 50, diverge_threshold=None)
    expected = 1e-6 * (1e-2 / 1e-6) ** (np.arange(50) / 49)
    np.testing.assert_allclose(result.lrs, expected, rtol=1e-13)
    assert result.lrs[0] == pytest.approx(1e-6) and result.lrs[-1] == pytest.approx(1e-2, rel=1e-13)
    assert result.stop_reason == "completed" and not result.diverged


def test_linear_sweep_is_evenly_spaced():
    optimizer = FakeOptimizer()
    result = lr_range_test(curve_step_fn(optimizer), optimizer, 1e-4, 1e-2, 34, mode="linear",
                           diverge_threshold=None)
    np.testing.assert_allclose(result.lrs, np.linspace(1e-4, 1e-2, 34), rtol=1e-12)


def test_every_param_group_gets_the_sweep_lr_and_lrs_are_restored():
    optimizer = FakeOptimizer([0.3, 0.03])
    seen = []
    result = lr_range_test(curve_step_fn(optimizer, seen), optimizer, 1e-5, 1e-1, 20)
    assert [a for a, b in seen] == [b for a, b in seen] == list(result.lrs)
    assert [group["lr"] for group in optimizer.param_groups] == [0.3, 0.03]
    assert [group["momentum"] for group in optimizer.param_groups] == [0.9, 0.9]


def test_lrs_are_restored_when_step_fn_raises():
    optimizer = FakeOptimizer([0.3])
    calls = []

    def failing_step():
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("out of memory")
        return 1.0

    with pytest.raises(RuntimeError, match="out of memory"):
        lr_range_test(failing_step, optimizer, 1e-5, 1e-1, 20)
    assert optimizer.param_groups[0]["lr"] == 0.3


def test_smoothed_losses_are_the_bias_corrected_moving_average():
    optimizer = FakeOptimizer()
    rng = np.random.default_rng(3)
    losses = iter(1.0 + rng.random(40))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # noise: possibly no range to suggest
        result = lr_range_test(lambda: next(losses), optimizer, 1e-4, 1e-1, 40, smooth=0.9,
                               diverge_threshold=None)
    average, expected = 0.0, []
    for i, loss in enumerate(result.losses):
        average = 0.9 * average + 0.1 * loss
        expected.append(average / (1 - 0.9 ** (i + 1)))
    np.testing.assert_allclose(result.smoothed_losses, expected, rtol=1e-14)
    assert result.smoothed_losses[0] == result.losses[0]


def test_suggested_range_brackets_the_steep_part_of_the_curve():
    optimizer = FakeOptimizer()
    result = lr_range_test(curve_step_fn(optimizer), optimizer, 1e-7, 10.0, 300, smooth=0.0)
    np.testing.assert_array_equal(result.smoothed_losses, result.losses)
    low, high = result.suggested_range
    # Without smoothing: the plateau is ~2 and the bottom ~1 (just before the
    # explosion), so the 10 % / 90 % drop points are where the logistic
    # reaches 0.1 / 0.9: log10 lr = -3 -/+ ln(9) / 3.
    plateau = np.median(result.losses[:np.argmin(result.losses) // 4 + 1])
    drop = plateau - result.losses.min()
    assert result.losses[np.searchsorted(result.lrs, low)] <= plateau - 0.1 * drop
    assert math.log10(low) == pytest.approx(-3 - math.log(9) / 3, abs=0.05)
    assert math.log10(high) == pytest.approx(-3 + math.log(9) / 3, abs=0.1)
    assert low < result.steepest_lr < high
    assert math.log10(result.steepest_lr) == pytest.approx(-3, abs=0.05)
    assert 0.01 < result.min_loss_lr < 0.2


def test_stops_early_when_the_smoothed_loss_exceeds_the_threshold():
    optimizer = FakeOptimizer()
    result = lr_range_test(curve_step_fn(optimizer), optimizer, 1e-7, 100.0, 400, smooth=0.5,
                           diverge_threshold=3.0)
    assert result.diverged and result.stop_reason == "diverged"
    assert len(result.lrs) < 400
    assert result.smoothed_losses[-1] > 3.0 * result.smoothed_losses.min()
    assert np.all(result.smoothed_losses[:-1] <= 3.0 * np.minimum.accumulate(result.smoothed_losses)[:-1])
    assert len(result.lrs) == len(result.losses) == len(result.smoothed_losses)


def test_without_threshold_the_sweep_runs_to_the_end():
    optimizer = FakeOptimizer()
    result = lr_range_test(curve_step_fn(optimizer), optimizer, 1e-7, 100.0, 100, diverge_threshold=None)
    assert len(result.lrs) == 100 and result.stop_reason == "completed"


def test_non_finite_loss_stops_the_test_and_is_not_recorded():
    optimizer = FakeOptimizer()
    losses = iter([1.0, 0.9, 0.8, float("nan"), 0.5])
    result = lr_range_test(lambda: next(losses), optimizer, 1e-3, 1.0, 5)
    assert result.stop_reason == "non-finite loss" and result.diverged
    np.testing.assert_array_equal(result.losses, [1.0, 0.9, 0.8])


def test_loss_may_be_a_numpy_scalar_or_0d_array():
    optimizer = FakeOptimizer()
    values = iter([np.float32(2.0), np.array(1.5), np.float64(1.0)])
    result = lr_range_test(lambda: next(values), optimizer, 1e-3, 1e-1, 3)
    np.testing.assert_array_equal(result.losses, [2.0, 1.5, 1.0])


def test_loss_may_be_a_torch_tensor():
    torch = pytest.importorskip("torch")
    optimizer = FakeOptimizer()
    values = iter([torch.tensor(1.25), torch.tensor(1.0), torch.tensor(0.5)])
    result = lr_range_test(lambda: next(values), optimizer, 1e-3, 1e-1, 3)
    np.testing.assert_array_equal(result.losses, [1.25, 1.0, 0.5])


def test_flat_loss_gives_no_suggestion_and_warns():
    optimizer = FakeOptimizer()
    with pytest.warns(RuntimeWarning, match="did not decrease"):
        result = lr_range_test(lambda: 1.0, optimizer, 1e-5, 1e-1, 30)
    assert result.suggested_range is None and result.steepest_lr is None


def test_result_reads_like_a_dict():
    optimizer = FakeOptimizer()
    result = lr_range_test(curve_step_fn(optimizer), optimizer, 1e-6, 1.0, 60)
    assert isinstance(result, LRRangeTestResult)
    assert result["suggested_range"] == result.suggested_range
    np.testing.assert_array_equal(result["lrs"], result.lrs)
    assert set(result.as_dict()) == {"lrs", "losses", "smoothed_losses", "suggested_range", "steepest_lr",
                                     "min_loss_lr", "diverged", "stop_reason", "mode"}
    with pytest.raises(KeyError):
        result["figure"]


def test_range_test_on_real_training_stays_below_the_stability_limit():
    """SGD on least squares diverges above lr = 2 / lambda_max: the suggested
    max_lr must be below that, and the test must stop past it."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(256, 8))
    targets = features @ rng.normal(size=8) + 0.05 * rng.normal(size=256)
    stability_limit = 2.0 / np.linalg.eigvalsh(features.T @ features / 256).max()
    try:
        import fastbn
        from fastbn.optim import SGD
        weights = fastbn.Parameter(np.zeros(8))
        optimizer = SGD([weights], lr=0.01)
    except Exception:  # fastbn optimizers not available: a hand-written SGD step
        weights, optimizer = None, FakeOptimizer([0.01])
    state = {"w": np.zeros(8)}

    def step_fn():
        batch = rng.integers(0, 256, 32)
        w = weights.data if weights is not None else state["w"]
        residual = features[batch] @ w - targets[batch]
        gradient = features[batch].T @ residual / 32
        if weights is not None:
            weights.grad = gradient
            optimizer.step()
        else:
            state["w"] = w - optimizer.param_groups[0]["lr"] * gradient
        return 0.5 * float(np.mean(residual ** 2))

    result = lr_range_test(step_fn, optimizer, 1e-5, 100.0, 300)
    low, high = result.suggested_range
    assert result.diverged
    assert 1e-4 < low < high < stability_limit
    assert result.lrs[-1] > stability_limit
    assert optimizer.param_groups[0]["lr"] == 0.01


# ---- plotting ------------------------------------------------------------------------------------

def test_plot_to_a_path_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    optimizer = FakeOptimizer()
    path = tmp_path / "range.png"
    result = lr_range_test(curve_step_fn(optimizer), optimizer, 1e-7, 10.0, 100, plot=path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.figure is not None


def test_plot_on_given_axes():
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    axes = Figure().subplots()
    optimizer = FakeOptimizer()
    result = lr_range_test(curve_step_fn(optimizer), optimizer, 1e-7, 10.0, 100, plot=axes)
    assert result.figure is axes.figure
    assert axes.get_xscale() == "log" and len(axes.lines) >= 2


def test_plot_without_matplotlib_raises_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    optimizer = FakeOptimizer()
    result = lr_range_test(curve_step_fn(optimizer), optimizer, 1e-7, 10.0, 30)
    with pytest.raises(ImportError, match="needs matplotlib"):
        plot_lr_range_test(result, "unused.png")


def test_no_plot_means_matplotlib_is_not_imported(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    optimizer = FakeOptimizer()
    lr_range_test(curve_step_fn(optimizer), optimizer, 1e-7, 10.0, 30)


# ---- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    (dict(step_fn=None), TypeError, r"step_fn: expected a callable that runs one training step"),
    (dict(optimizer=object()), TypeError, r"lr_range_test: optimizer: expected an optimizer whose `param_groups`"),
    (dict(start_lr=0.0), ValueError, r"start_lr: expected a value > 0, got 0.0"),
    (dict(start_lr=-1e-3), ValueError, r"start_lr: expected a value > 0"),
    (dict(end_lr=1e-8), ValueError, r"end_lr: expected a value > start_lr \(1e-07\), got 1e-08"),
    (dict(num_iters=1), ValueError, r"num_iters: expected an int >= 2, got 1"),
    (dict(num_iters=10.0), TypeError, r"num_iters: expected an int"),
    (dict(mode="log"), ValueError, r"mode: expected one of \('exp', 'linear'\), got 'log'"),
    (dict(smooth=1.0), ValueError, r"smooth: expected a value in \[0.0, 1.0\), got 1.0"),
    (dict(diverge_threshold=1.0), ValueError, r"diverge_threshold: expected a value > 1 \(or None\), got 1.0"),
    (dict(plot=3), TypeError, r"plot: expected None, a file path or a matplotlib Axes"),
])
def test_bad_arguments_raise_naming_the_argument(kwargs, error, message):
    optimizer = FakeOptimizer()
    arguments = dict(step_fn=lambda: 1.0, optimizer=optimizer, start_lr=1e-7, end_lr=10.0, num_iters=10)
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        lr_range_test(**arguments)
    assert optimizer.param_groups[0]["lr"] == 0.1


def test_step_fn_must_return_a_number():
    optimizer = FakeOptimizer()
    with pytest.raises(TypeError, match=r"step_fn: expected it to return the loss \(a number\), got NoneType at iteration 0"):
        lr_range_test(lambda: None, optimizer, 1e-5, 1.0, 10)
    assert optimizer.param_groups[0]["lr"] == 0.1
