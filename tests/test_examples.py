"""The scripts in examples/ run (small settings, in a subprocess)."""
import os
import re
import subprocess
import sys
import tempfile

import pytest

import fastbn

PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(fastbn.__file__)))
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def run_example(name, *args):
    env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT)
    result = subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args],
                            capture_output=True, text=True, env=env, timeout=300,
                            cwd=tempfile.gettempdir())
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_train_mlp_then_inference_from_its_checkpoint(tmp_path):
    checkpoint = str(tmp_path / "mlp.ckpt")
    out = run_example("train_mlp.py", "--epochs", "2", "--dataset", "generated", "--save", checkpoint)
    assert "epoch  2" in out and "saved to" in out
    out = run_example("inference.py", "--checkpoint", checkpoint, "--batch", "32")
    assert "trained for 2 epochs" in out
    assert "agreement folded vs original: 100.0%" in out


def test_inference_runs_without_a_checkpoint():
    out = run_example("inference.py", "--batch", "16")
    assert "saved it and restored it" in out
    assert "max |folded - original| logit difference" in out


def test_lr_range_test_suggests_a_range(tmp_path):
    plot = tmp_path / "range.png"
    args = ["--iters", "60"]
    try:
        import matplotlib  # noqa: F401
        args += ["--plot", str(plot)]
    except ImportError:
        pass
    out = run_example("lr_range_test.py", *args)
    assert "suggested range" in out
    if "--plot" in args:
        assert plot.stat().st_size > 0


def test_torch_cpu_training_compares_torch_and_fastbn_steps():
    pytest.importorskip("torch")
    out = run_example("torch_cpu_training.py", "--batch", "2", "--size", "32", "--width", "4",
                      "--steps", "2", "--mlp-batch", "8", "--mlp-width", "16", "--mlp-steps", "2",
                      "--optimizer", "adam")
    assert "ResNet-18-shaped CNN" in out and "MLP" in out
    assert out.count("speed-up") == 2
    loss_lines = [line for line in out.splitlines() if line.strip().startswith("loss: first step")]
    assert len(loss_lines) == 2
    first_step_differences = [float(line.split("relative difference ")[1].split(";")[0])
                              for line in loss_lines]
    # same initial weights and batch: the first losses agree to float32 rounding
    assert max(first_step_differences) < 1e-4
    # the synthetic task starts at chance level: about ln(10) = 2.30
    first_losses = [float(line.split("first step ")[1].split(",")[0]) for line in loss_lines]
    assert all(1.5 < loss < 3.5 for loss in first_losses), first_losses


def test_torch_cpu_training_loss_falls_on_its_synthetic_task():
    pytest.importorskip("torch")
    # default optimizer (SGD, momentum 0.9) on a small ResNet and MLP: the
    # learnable task must not diverge as random labels did (final loss 5.2)
    out = run_example("torch_cpu_training.py", "--batch", "8", "--size", "32", "--width", "8",
                      "--steps", "8", "--mlp-batch", "32", "--mlp-width", "32",
                      "--mlp-steps", "20")
    loss_lines = [line for line in out.splitlines() if line.strip().startswith("loss: first step")]
    assert len(loss_lines) == 2
    for line in loss_lines:
        match = re.search(r"first step ([0-9.]+),.*final step torch ([0-9.]+), fastbn ([0-9.]+);",
                          line)
        assert match, line
        first, final_torch, final_fastbn = map(float, match.groups())
        assert max(final_torch, final_fastbn) < first, line
