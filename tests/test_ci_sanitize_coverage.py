"""The ASan+UBSan stage of CI (.ci/sanitize.sh) must run every kernel test
file that drives the kernels on each SIMD target: hand-written vector loops
(the AVX2 bfloat16 Adam loops, for one) are only checked for out-of-bounds
reads and writes there."""
import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SANITIZE_SCRIPT = ROOT / ".ci" / "sanitize.sh"


def sanitized_patterns():
    if not SANITIZE_SCRIPT.exists():
        # CI's wheel stage tests a copy of tests/ without the repository's .ci/
        pytest.skip("no .ci/sanitize.sh beside this test tree (a copied test tree)")
    script = SANITIZE_SCRIPT.read_text()
    block = re.search(r"patterns=\((.*?)\)", script, re.S)
    assert block, "no patterns=(...) list in .ci/sanitize.sh"
    return block.group(1).split()


def test_every_per_target_kernel_test_file_runs_under_the_sanitizers():
    patterns = sanitized_patterns()
    per_target = [path for prefix in ("test_bn", "test_optim", "test_clip")
                  for path in sorted((ROOT / "tests").glob(prefix + "*.py"))
                  if "set_simd_target" in path.read_text()]
    assert per_target, "found no per-target kernel tests"
    missing = [path.name for path in per_target
               if not any(fnmatch.fnmatch(f"tests/{path.name}", pattern) for pattern in patterns)]
    assert not missing, f"kernel tests not run by .ci/sanitize.sh: {missing}"
