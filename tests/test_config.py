"""Runtime configuration: SIMD dispatch, threads, OpenMP, show_config,
the backend switch and the command line."""
import io
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import fastbn
from fastbn import functional as F


# Subprocesses import the same fastbn this process imported (installed or
# built in place), from a neutral working directory.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(fastbn.__file__)))


def run_python_args(args, **env):
    full_env = dict(os.environ, **env)
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env=full_env, timeout=120, cwd=tempfile.gettempdir())


def run_python(code, **env):
    return run_python_args(["-c", code], **env)


def test_best_available_target_is_chosen_by_default():
    if os.environ.get("FASTBN_SIMD"):
        pytest.skip("FASTBN_SIMD is set for this run")
    assert fastbn.get_simd_target() == fastbn.available_simd_targets()[-1]


def test_baseline_is_always_available():
    assert fastbn.available_simd_targets()[0] == "baseline"
    assert set(fastbn.available_simd_targets()) <= set(fastbn.compiled_simd_targets())


def test_fastbn_simd_environment_variable_is_honoured():
    for target in fastbn.available_simd_targets():
        result = run_python("import fastbn; print(fastbn.get_simd_target())", FASTBN_SIMD=target)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == target


def test_environment_target_in_this_process():
    requested = os.environ.get("FASTBN_SIMD")
    if not requested:
        pytest.skip("run with FASTBN_SIMD=<target> to check the variable in-process")
    assert fastbn.get_simd_target() == requested


@pytest.mark.parametrize("value", ["avx9000", "neon"] + [
    t for t in ("avx2", "avx512") if t not in fastbn.available_simd_targets()])
def test_unsupported_simd_request_falls_back_with_a_warning(value):
    result = run_python("import warnings; warnings.simplefilter('always');"
                        "import fastbn; print(fastbn.get_simd_target())", FASTBN_SIMD=value)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == fastbn.available_simd_targets()[-1]
    assert "FASTBN_SIMD" in result.stderr


def test_set_simd_target_rejects_unknown_and_unavailable_targets():
    with pytest.raises(ValueError, match="simd target"):
        fastbn.set_simd_target("sse9")
    for target in set(fastbn.compiled_simd_targets()) - set(fastbn.available_simd_targets()):
        with pytest.raises(ValueError, match="not available"):
            fastbn.set_simd_target(target)


def test_simd_target_switch_changes_the_kernel_that_runs():
    # All targets agree to rounding; what we check here is that switching is
    # visible in the configuration the bridge reads on every call.
    previous = fastbn.get_simd_target()
    try:
        for target in fastbn.available_simd_targets():
            fastbn.set_simd_target(target)
            assert fastbn.config_info()["simd_target"] == target
    finally:
        fastbn.set_simd_target(previous)


def test_set_num_threads_takes_effect_and_is_reported():
    try:
        fastbn.set_num_threads(1)
        assert fastbn.get_num_threads() == 1
        assert fastbn.config_info()["threads"] == 1
        if fastbn.config_info()["openmp"]:
            fastbn.set_num_threads(2)
            assert fastbn.get_num_threads() == 2
    finally:
        fastbn.set_num_threads(None)


@pytest.mark.parametrize("bad", [0, -1])
def test_set_num_threads_rejects_non_positive_counts(bad):
    with pytest.raises(ValueError, match="n: expected an int >= 1"):
        fastbn.set_num_threads(bad)


def test_set_num_threads_rejects_non_integers():
    with pytest.raises(TypeError, match="n: expected an int"):
        fastbn.set_num_threads(1.5)


def test_omp_num_threads_is_honoured():
    result = run_python("import fastbn; print(fastbn.get_num_threads())", OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"


def test_threadpoolctl_sees_and_limits_fastbn_threads():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not fastbn.config_info()["openmp"]:
        pytest.skip("serial build")
    apis = {info["user_api"] for info in threadpoolctl.threadpool_info()}
    assert "openmp" in apis
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert fastbn.get_num_threads() == 1
    assert fastbn.get_num_threads() >= 1


def test_show_config_reports_target_openmp_and_threads():
    buffer = io.StringIO()
    fastbn.show_config(file=buffer)
    text = buffer.getvalue()
    for key in ("fastbn", "numpy", "simd_target", "simd_available", "openmp", "threads"):
        assert key in text
    assert fastbn.get_simd_target() in text


def test_command_line_info_prints_the_configuration():
    result = run_python_args(["-m", "fastbn", "info"])
    assert result.returncode == 0, result.stderr
    assert "simd_target" in result.stdout and "openmp" in result.stdout


def test_backend_switch_runs_the_reference_kernels(monkeypatch):
    from fastbn.reference._kernels import REFERENCE
    calls = []
    original = REFERENCE.eval_forward

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(REFERENCE, "eval_forward", spy)
    x = np.ones((2, 3), np.float32)
    mean, var = np.zeros(3, np.float32), np.ones(3, np.float32)
    F.batch_norm(x, mean, var)
    assert calls == []
    assert fastbn.get_backend() == "fast"
    with fastbn.use_backend("reference") as name:
        assert name == "reference" and fastbn.get_backend() == "reference"
        F.batch_norm(x, mean, var)
    assert len(calls) == 1
    assert fastbn.get_backend() == "fast"


def test_backend_switch_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend"):
        with fastbn.use_backend("cuda"):
            pass


def test_parameter_holds_data_and_grad():
    p = fastbn.Parameter(np.arange(6, dtype=np.float64).reshape(2, 3))
    assert p.grad is None and p.shape == (2, 3) and p.dtype == np.float64
    p.grad = np.ones((2, 3))
    p.zero_grad(set_to_none=False)
    assert np.all(p.grad == 0)
    p.zero_grad()
    assert p.grad is None
    with pytest.raises(ValueError, match="grad"):
        fastbn.Parameter(np.zeros(3), grad=np.zeros(4))
    with pytest.raises(TypeError, match="Parameter data"):
        fastbn.Parameter(np.array(["a"]))
