"""torch.compile with the default (inductor) backend and fullgraph=True on a
model of fastbn.torch modules: the custom ops stay in the graph as opaque
kernels (fastbn's functions run) and the results equal eager mode.

Runs in a fresh process with its own inductor cache (a cold compile, as in
a fresh CI job: about 50 s on the project's loaded 2-core machine), so it is
marked slow.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import fastbn  # noqa: E402

WORKER = Path(__file__).resolve().parent / "_torch_inductor_worker.py"
PACKAGE_ROOT = str(Path(fastbn.__file__).resolve().parent.parent)


@pytest.mark.slow
def test_inductor_fullgraph_compile_matches_eager_and_runs_fastbns_kernels(tmp_path):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor_cache"))
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out = tmp_path / "result.json"
    try:
        result = subprocess.run([sys.executable, str(WORKER), str(out)], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail("torch.compile with inductor did not finish within 600 s")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    too_large = {key: error for key, error in report["errors"].items() if error > 1e-5}
    assert not too_large, too_large
    assert len(report["errors"]) >= 3 + 8 + 10 + 1  # outputs, grads, buffers, eval
    counts = report["counts"]["compiled"]  # calls made by the compiled model only
    # 3 training steps through both layers; eval through both; backward of both
    assert counts.get("batch_norm_relu_forward_train", 0) >= 3, counts
    assert counts.get("batch_norm_forward_train", 0) >= 3, counts
    assert counts.get("batch_norm_relu_backward", 0) >= 3, counts
    assert counts.get("batch_norm_backward", 0) >= 3, counts
    assert counts.get("batch_norm_relu", 0) >= 1 and counts.get("batch_norm", 0) >= 1, counts
