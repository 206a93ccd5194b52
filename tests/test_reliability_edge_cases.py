"""Edge cases that once crashed the process or disagreed with the reference:
zero-size dimensions (no batch, no channels, no spatial extent) for every
batch-norm entry point and layout, run in a subprocess so that a crash
(SIGFPE, SIGSEGV) fails one test instead of killing the suite; extreme
geometries (one channel, many channels, two values per channel); eps = 0 with
a zero running variance in eval mode."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest

import fastbn
from fastbn import functional as F

from test_reliability_kernels import bn_training_available, bn_training_pieces_available

ZERO_SIZE_SHAPES = [(0, 3), (3, 0), (0, 0), (0, 3, 4), (2, 0, 4), (2, 3, 0), (2, 3, 0, 5), (2, 3, 5, 0),
                    (0, 3, 0, 2), (2, 0, 0)]
FUNCTIONS = ["eval"]
if bn_training_available():
    FUNCTIONS.append("train")
if bn_training_pieces_available():
    FUNCTIONS += ["forward_train", "backward", "backward_eval"]

CASES = [(function, shape, axis) for function in FUNCTIONS for shape in ZERO_SIZE_SHAPES for axis in (1, -1)]

CHILD = textwrap.dedent(r"""
    import json, sys
    import numpy as np
    import fastbn
    from fastbn import functional as F

    def run(function, shape, axis):
        x = np.ones(shape, np.float32)
        channels = shape[axis]
        mean, var = np.zeros(channels, np.float32), np.ones(channels, np.float32)
        weight, bias = np.full(channels, 2.0, np.float32), np.ones(channels, np.float32)
        dy = np.ones(shape, np.float32)
        if function == "eval":
            return [F.batch_norm(x, mean, var, weight, bias, axis=axis)]
        if function == "train":
            return [F.batch_norm(x, mean, var, weight, bias, training=True, axis=axis), mean, var]
        if function == "forward_train":
            return list(F.batch_norm_forward_train(x, weight, bias, axis=axis, running_mean=mean,
                                                   running_var=var)) + [mean, var]
        if function == "backward":
            return list(F.batch_norm_backward(dy, x, mean, var, weight, axis=axis))
        return list(F.batch_norm_backward_eval(dy, x, mean, var, weight, axis=axis))

    def outcome(function, shape, axis, backend):
        try:
            with fastbn.use_backend(backend), np.errstate(all="ignore"):
                arrays = run(function, shape, axis)
        except Exception as error:
            return ["error", type(error).__name__, str(error)]
        return ["ok", [[list(a.shape), a.dtype.str, a.tolist()] for a in arrays]]

    cases = json.loads(sys.argv[1])
    for index in range(int(sys.argv[2]), len(cases)):
        function, shape, axis = cases[index]
        print("START", index, flush=True)
        result = {b: outcome(function, tuple(shape), axis, b) for b in ("fast", "reference")}
        print("RESULT", index, json.dumps(result), flush=True)
""")


def _run_isolated(cases):
    """Run every case in child processes; a crash is recorded for its case
    and the next child resumes after it."""
    results, start = {}, 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(fastbn.__file__))] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    payload = json.dumps([[f, list(s), a] for f, s, a in cases])
    while start < len(cases):
        # a neutral cwd: from the repository root `python -c` would import the
        # uncompiled source folder instead of the fastbn under test
        child = subprocess.run([sys.executable, "-c", CHILD, payload, str(start)], capture_output=True,
                               text=True, timeout=300, env=env, cwd=tempfile.gettempdir())
        last_started = None
        for line in child.stdout.splitlines():
            kind, index, *rest = line.split(" ", 2)
            if kind == "START":
                last_started = int(index)
            elif kind == "RESULT":
                results[int(index)] = json.loads(rest[0])
        if child.returncode == 0:
            break
        if last_started is None or last_started in results:
            raise RuntimeError(f"child failed outside a case: {child.stderr[-2000:]}")
        results[last_started] = {"crash": f"returncode {child.returncode}: {child.stderr[-500:]}"}
        start = last_started + 1
    return results


@pytest.fixture(scope="module")
def zero_size_results():
    return _run_isolated(CASES)


@pytest.mark.parametrize("index", range(len(CASES)),
                         ids=[f"{f}-{'x'.join(map(str, s))}-axis{a}" for f, s, a in CASES])
def test_zero_size_inputs_behave_like_the_reference_without_crashing(zero_size_results, index):
    result = zero_size_results[index]
    assert "crash" not in result, f"{CASES[index]} crashed the process: {result.get('crash')}"
    fast, reference = result["fast"], result["reference"]
    assert fast[0] == reference[0], (fast, reference)
    if fast[0] == "error":
        assert fast[1] == reference[1], (fast, reference)
        assert fast[1] in ("ValueError",), fast
        return
    assert len(fast[1]) == len(reference[1])
    for (shape, dtype, values), (ref_shape, ref_dtype, ref_values) in zip(fast[1], reference[1]):
        assert (shape, dtype) == (ref_shape, ref_dtype)
        np.testing.assert_allclose(np.array(values, dtype), np.array(ref_values, dtype), rtol=1e-6)


def test_the_isolation_reports_a_crash_instead_of_dying():
    """The runner itself: a child killed by a signal is reported for its case."""
    crashing = textwrap.dedent("""
        import os, signal, sys
        print("START", sys.argv[2], flush=True)
        os.kill(os.getpid(), signal.SIGFPE)
    """)
    child = subprocess.run([sys.executable, "-c", crashing, "[]", "0"], capture_output=True, text=True,
                           timeout=60, cwd=tempfile.gettempdir())
    # -8 (SIGFPE) normally; a sanitizer runtime turns the signal into its own exit code
    assert child.returncode != 0 and child.stdout.startswith("START 0")


# section: extreme geometries and eval eps = 0 ----------------------------------------------

GEOMETRIES = [(2, 1), (1, 1, 2), (4096, 1), (2, 70000), (2, 3, 1), (1, 2, 1, 1, 1), (3, 1, 50000)]


@pytest.mark.parametrize("shape", GEOMETRIES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("training", [False, True] if bn_training_available() else [False])
def test_extreme_geometries_match_the_reference(shape, axis, training):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float64)
    channels = shape[axis]
    if training and x.size // channels < 2:
        pytest.skip("needs two values per channel")
    outputs = {}
    for backend in ("fast", "reference"):
        mean, var = np.zeros(channels), np.ones(channels)
        with fastbn.use_backend(backend):
            y = F.batch_norm(x, mean, var, rng.standard_normal(channels), None, training=training, axis=axis)
        outputs[backend] = (y, mean, var)
        rng = np.random.default_rng(0)
        rng.standard_normal(shape)
    for fast, reference in zip(outputs["fast"], outputs["reference"]):
        np.testing.assert_allclose(fast, reference, rtol=1e-10, atol=1e-10)


def test_eval_with_zero_eps_and_zero_running_variance_is_non_finite_on_both_backends():
    """eps >= 0 is allowed with running statistics; var + eps == 0 divides by
    zero.  Both backends compute (x - mean) * inf: +-inf, NaN where x == mean
    (PyTorch's CPU kernel folds the map into x * inf + (-mean * inf), NaN
    almost everywhere).  Neither crashes; tests/test_bn_numerics.py covers
    the values in detail."""
    x = np.array([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0], [-1.0, -2.0]], np.float32)
    mean, var = np.zeros(2, np.float32), np.zeros(2, np.float32)
    with np.errstate(all="ignore"):
        fast = F.batch_norm(x, mean, var, eps=0.0)
        with fastbn.use_backend("reference"):
            reference = F.batch_norm(x, mean, var, eps=0.0)
    assert not np.any(np.isfinite(reference)) and not np.any(np.isfinite(fast))
    np.testing.assert_array_equal(fast, reference)
