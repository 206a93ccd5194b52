"""`python -m fastbn demo`: runs end to end in its tiny configuration, writes
its files, and its runs are reproducible."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import fastbn
from fastbn.demo import data as demo_data
from fastbn.demo.experiment import RunConfig, build_configs, make_optimizer, train_run

PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(fastbn.__file__)))


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT)
    return subprocess.run([sys.executable, "-m", "fastbn", *args], capture_output=True,
                          text=True, env=env, timeout=300, cwd=tempfile.gettempdir())


def have_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_demo_quick_prints_the_table_and_writes_results_and_plots(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--quick", "--epochs", "2", "--dataset", "generated",
                     "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "train acc" in result.stdout and "test acc" in result.stdout
    assert "What the numbers show" in result.stdout
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert len(runs) == len(build_configs("quick"))
    assert {(r["config"]["batch_norm"], r["config"]["schedule"]) for r in runs} == {
        (True, "constant"), (True, "cyclical"), (False, "constant"), (False, "cyclical")}
    for run in runs:
        assert len(run["test_accuracy"]) == 2 and 0 <= run["test_accuracy"][-1] <= 1
    assert len((out / "results.csv").read_text().splitlines()) == len(runs) + 1
    pngs = sorted(p.name for p in out.glob("*.png"))
    if have_matplotlib():
        assert pngs == ["accuracy_curves.png", "accuracy_vs_lr.png", "loss_curves.png",
                        "lr_schedules.png"]
        assert all((out / name).stat().st_size > 10_000 for name in pngs)
    else:
        assert pngs == [] and "matplotlib is not installed" in result.stdout


def test_demo_runs_are_reproducible_from_the_seed():
    dataset = demo_data.make_blobs_dataset(num_samples=300, seed=3).astype(np.float32)
    config = RunConfig(True, "Momentum", 0.1, "cyclical", "normal")
    first = train_run(config, dataset, epochs=2, batch_size=32, seed=5)
    second = train_run(config, dataset, epochs=2, batch_size=32, seed=5)
    assert first.train_loss == second.train_loss
    assert first.test_accuracy == second.test_accuracy
    assert first.lrs == second.lrs and len(first.lrs) == 2 * 8
    other_seed = train_run(config, dataset, epochs=2, batch_size=32, seed=6)
    assert other_seed.train_loss != first.train_loss


def test_diverging_run_is_flagged_and_recorded_at_chance_level():
    dataset = demo_data.make_blobs_dataset(num_samples=300, seed=3).astype(np.float32)
    with np.errstate(all="ignore"):
        result = train_run(RunConfig(False, "Momentum", 1e6), dataset, epochs=3, batch_size=32)
    assert result.diverged
    assert np.isnan(result.train_loss[-1])
    assert result.final_test_accuracy < 0.5


def test_demo_configurations_cover_the_requested_grid():
    default, everything = build_configs("default"), build_configs("all")
    for configs in (default, everything):
        assert {c.optimizer for c in configs} - {"Adam-bf16st"} == {"Momentum", "RMSprop", "Adam"}
        assert {c.batch_norm for c in configs} == {True, False}
        assert {c.lr_level for c in configs} >= {"normal", "high"}
    named = [c for c in everything if c.lr_level and c.optimizer != "Adam-bf16st"]
    assert len(named) == 3 * 2 * 2 * 4 and len(set(named)) == len(named)
    assert {c.schedule for c in default if c.lr_level == "normal"} == {
        "constant", "step", "exponential", "cyclical"}
    with pytest.raises(ValueError, match="mode"):
        build_configs("most")


def test_dataset_falls_back_to_generated_data_without_scikit_learn(monkeypatch):
    monkeypatch.setattr(demo_data, "have_sklearn", lambda: False)
    data = demo_data.load_dataset("auto", seed=0)
    assert data.name == "generated"
    assert data.x_train.shape[1] == 64 and data.x_train.dtype == np.float32
    assert set(np.unique(data.y_train)) == set(range(10))
    assert 0 <= data.x_train.min() and data.x_train.max() <= 1
    with pytest.raises(ValueError, match="dataset"):
        demo_data.load_dataset("mnist")


def test_demo_runs_adam_with_bf16_state_next_to_float32_adam():
    pytest.importorskip("ml_dtypes")
    for configs in (build_configs("default"), build_configs("all")):
        variant = [c for c in configs if c.optimizer == "Adam-bf16st"]
        assert {(c.batch_norm, c.lr, c.schedule, c.lr_level) for c in variant} == {
            (True, 1e-3, "constant", "normal"), (False, 1e-3, "constant", "normal")}
        assert RunConfig(True, "Adam", 1e-3, "constant", "normal") in configs
    assert not any(c.optimizer == "Adam-bf16st" for c in build_configs("quick"))
    param = fastbn.Parameter(np.ones(3, np.float32))
    param.grad = np.ones(3, np.float32)
    optimizer = make_optimizer("Adam-bf16st", [param], 1e-3)
    optimizer.step()
    assert optimizer.state[param]["exp_avg"].dtype.name == "bfloat16"


def test_adam_with_bf16_state_reaches_float32_adam_test_accuracy_within_half_a_point():
    # The demo's MLP with BN on its dataset (digits, or the generated blobs
    # without scikit-learn), 20 epochs at lr 1e-3, same seed: bfloat16
    # moments with stochastic rounding end within 0.5 points of float32 ones.
    pytest.importorskip("ml_dtypes")
    dataset = demo_data.load_dataset("auto", seed=0)
    results = {}
    for name in ("Adam", "Adam-bf16st"):
        results[name] = train_run(RunConfig(True, name, 1e-3, "constant", "normal"), dataset, epochs=20, seed=0)
    float32, bf16 = results["Adam"], results["Adam-bf16st"]
    assert not bf16.diverged and len(bf16.test_accuracy) == 20
    assert float32.final_test_accuracy > 0.9
    assert abs(bf16.final_test_accuracy - float32.final_test_accuracy) <= 0.005
