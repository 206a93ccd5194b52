"""pytest-benchmark view of the `fastbn bench` cases: one benchmark per case
and contender ("fastbn", "fastbn_out", "reference", "torch"), built by the
same code as the table (`fastbn.bench.cases`), so the two never disagree on
shapes, data or what is timed.

    pytest benchmarks --benchmark-only --benchmark-group-by=param:case
    pytest benchmarks --benchmark-only -m batchnorm -k fastbn       # by group / contender
    python benchmarks/bench_cases.py --filter batchnorm             # = fastbn bench --filter ...

Threads: FASTBN_BENCH_THREADS (default: all cores) for fastbn and torch;
dtype: FASTBN_BENCH_DTYPE (float32 or float64); FASTBN_BENCH_QUICK=1 uses
the smaller shapes of `fastbn bench --quick`.

GOMP_SPINCOUNT is lowered before the libraries load (unless set): fastbn's
libgomp and the copy torch bundles share the process, and after a parallel
region each one's idle workers spin for milliseconds, stealing a core from
the other on a 2-core machine.  `fastbn bench` sleeps between contenders
instead (fastbn/bench/measure.py); pytest-benchmark runs each benchmark's
rounds back to back, so the spin itself has to be short.
"""
from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import fastbn  # noqa: E402
from fastbn.bench.cases import BenchConfig, all_cases  # noqa: E402
from fastbn.bench.runner import CONTENDERS, load_torch  # noqa: E402

THREADS = int(os.environ.get("FASTBN_BENCH_THREADS", os.cpu_count() or 1))
DTYPE = np.dtype(os.environ.get("FASTBN_BENCH_DTYPE", "float32"))
QUICK = os.environ.get("FASTBN_BENCH_QUICK", "") not in ("", "0")
CASES = {case.name: case for case in all_cases()}


@pytest.fixture(scope="module")
def config() -> BenchConfig:
    fastbn.set_num_threads(THREADS)
    return BenchConfig(dtype=DTYPE, threads=THREADS, quick=QUICK, torch=load_torch(THREADS, True))


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("case", [pytest.param(name, marks=getattr(pytest.mark, case.group))
                                  for name, case in CASES.items()])
def test_case(benchmark, config, case, contender):
    spec = CASES[case]
    contenders, moved = spec.build(config)
    if contender not in contenders:
        pytest.skip(f"{case}: no {contender} contender here (torch not installed, or none exists)")
    benchmark.group = case
    benchmark.extra_info.update(bytes_moved=moved, simd=fastbn.get_simd_target(),
                                threads=THREADS, dtype=DTYPE.name)
    if spec.per_call:
        benchmark(contenders[contender])
    else:
        rounds = 3 if contender == "reference" else 10
        benchmark.pedantic(contenders[contender], rounds=rounds, warmup_rounds=1)


if __name__ == "__main__":
    from fastbn.bench.runner import build_parser, main
    sys.exit(main(build_parser().parse_args(sys.argv[1:])))
