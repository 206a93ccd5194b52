"""`python -m fastbn bench`: runs from an install, writes JSON with every
figure, and its building blocks measure what they claim."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import fastbn
from fastbn.bench import (all_cases, stream_bandwidth, resnet50_shapes, time_callable,
                          time_interleaved, time_per_call)

PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(fastbn.__file__)))


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT)
    return subprocess.run([sys.executable, "-m", "fastbn", *args], capture_output=True,
                          text=True, env=env, timeout=300, cwd=tempfile.gettempdir())


def test_bench_writes_json_with_times_ratios_and_bandwidth(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli("bench", "--filter", "overhead_eval_2x4", "--no-torch", "--no-progress",
                     "--threads", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "bandwidth probe" in result.stdout
    assert "overhead_eval_2x4" in result.stdout
    report = json.loads(out.read_text())
    assert report["machine"]["simd_target"] == fastbn.get_simd_target()
    assert report["machine"]["threads"] == 1
    assert report["stream_bandwidth_gbps"] > 0
    (case,) = report["cases"]
    assert case["name"] == "overhead_eval_2x4"
    assert case["fastbn"]["median_s"] > 0 and case["reference"]["median_s"] > 0
    assert case["speedup_vs_reference"] == pytest.approx(
        case["reference"]["median_s"] / case["fastbn"]["median_s"])
    assert report["round_order"] == "shuffled (seed 0)"


def test_bench_fixed_order_is_reported(tmp_path):
    """--fixed-order keeps the contenders' order in every round, and says so
    in the table's legend and the JSON."""
    out = tmp_path / "bench.json"
    result = run_cli("bench", "--quick", "--filter", "bn_train_fwd_small", "--no-torch",
                     "--no-progress", "--threads", "1", "--fixed-order", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "(fixed order)" in result.stdout
    report = json.loads(out.read_text())
    assert report["round_order"] == "fixed"
    (case,) = report["cases"]
    assert case["fastbn"]["runs"] >= 5 and case["reference"]["runs"] >= 1


@pytest.mark.parametrize("flags,seed", [([], 0), (["--fixed-order"], None)])
def test_bench_passes_its_round_order_to_the_timer(flags, seed, monkeypatch, capsys):
    """The order the legend names is the one the interleaved timer gets:
    seed 0 by default, None (fixed) with --fixed-order."""
    from fastbn.bench import measure, runner
    seeds = []

    def recording_timer(contenders, **kwargs):
        seeds.append(kwargs["order_seed"])
        return {name: measure.Timing(runs=[1e-3]) for name in contenders}

    monkeypatch.setattr(runner, "time_interleaved", recording_timer)
    monkeypatch.setattr(runner, "stream_bandwidth", lambda threads: 1.0)
    previous = fastbn.get_num_threads()
    try:
        args = runner.build_parser().parse_args(["--quick", "--filter", "bn_train_fwd_small", "--no-torch",
                                                 "--no-progress", "--threads", "1", *flags])
        assert runner.main(args) == 0
    finally:
        fastbn.set_num_threads(previous)
    assert seeds == [seed]
    assert ("(fixed order)" if seed is None else "(shuffled (seed 0) order)") in capsys.readouterr().out


def test_bench_rejects_a_filter_matching_nothing():
    result = run_cli("bench", "--filter", "no_such_case", "--no-progress")
    assert result.returncode == 2
    assert "no case matches" in result.stderr


def test_bench_lists_every_case():
    result = run_cli("bench", "--list")
    assert result.returncode == 0
    for case in all_cases():
        assert case.name in result.stdout


def test_resnet50_parameter_list_has_the_real_sizes():
    shapes = resnet50_shapes()
    assert len(shapes) == 161
    assert sum(int(np.prod(s)) for s in shapes) == 25_557_032


def test_time_callable_respects_run_bounds():
    calls = []
    timing = time_callable(lambda: calls.append(1), min_time=0.0, min_runs=4, max_runs=4, warmup=2)
    assert len(timing.runs) == 4 and len(calls) == 6
    assert timing.best <= timing.median


def _logging_clock(monkeypatch, log):
    """Replace the timer's clock by a counter that logs each read as "T"."""
    from fastbn.bench import measure
    clock = iter(range(10**6))

    def perf_counter():
        log.append("T")
        return float(next(clock))

    monkeypatch.setattr(measure.time, "perf_counter", perf_counter)


def test_time_interleaved_gives_each_contender_its_untimed_calls_before_the_timed_one(monkeypatch):
    """Two untimed calls per round by default, `warmup_for` per contender,
    then the timed call (the one between two clock reads, "T"), every
    contender's calls of a round back to back (fixed order here)."""
    log = []
    _logging_clock(monkeypatch, log)
    contenders = {name: (lambda name=name: log.append(name)) for name in ("fast", "slow")}
    timings = time_interleaved(contenders, min_time=0.0, min_rounds=3, max_rounds=3,
                               settle=0.0, warmup_for={"slow": 1}, order_seed=None)
    assert [len(t.runs) for t in timings.values()] == [3, 3]
    assert log == (["fast", "fast", "T", "fast", "T", "slow", "T", "slow", "T"]) * 3
    log.clear()
    time_interleaved(contenders, min_time=0.0, min_rounds=2, max_rounds=2, settle=0.0, warmup=0,
                     order_seed=None)
    assert log == ["T", "fast", "T", "T", "slow", "T"] * 2


def _rounds_of(log, names, warmup=1):
    """Split a log of calls and clock reads into rounds: each contender's
    block is `warmup` untimed calls, "T", the timed call, "T"."""
    block = warmup + 3
    blocks = [log[i:i + block] for i in range(0, len(log), block)]
    for b in blocks:
        assert b == [b[0]] * warmup + ["T", b[0], "T"]
    order = [b[0] for b in blocks]
    return [order[i:i + len(names)] for i in range(0, len(order), len(names))]


def test_time_interleaved_shuffles_the_order_of_each_round_reproducibly(monkeypatch):
    """By default every round is a permutation of the contenders drawn from a
    seeded generator: each contender follows several others over the rounds
    (no contender always timed after the same one), and the same seed gives
    the same orders."""
    names = ("a", "b", "c", "d")
    log = []
    _logging_clock(monkeypatch, log)
    contenders = {name: (lambda name=name: log.append(name)) for name in names}
    timings = time_interleaved(contenders, min_time=0.0, min_rounds=40, max_rounds=40,
                               settle=0.0, warmup=1)
    assert all(len(t.runs) == 40 for t in timings.values())
    rounds = _rounds_of(log, names)
    assert len(rounds) == 40 and all(sorted(r) == sorted(names) for r in rounds)
    assert len({tuple(r) for r in rounds}) > 5
    followed = {name: set() for name in names}
    for r in rounds:
        for before, after in zip(r, r[1:]):
            followed[after].add(before)
    assert all(len(f) == len(names) - 1 for f in followed.values())
    first = list(log)
    log.clear()
    time_interleaved(contenders, min_time=0.0, min_rounds=40, max_rounds=40, settle=0.0, warmup=1)
    assert log == first
    log.clear()
    time_interleaved(contenders, min_time=0.0, min_rounds=40, max_rounds=40, settle=0.0, warmup=1,
                     order_seed=1)
    assert log != first


def test_time_interleaved_caps_a_contender_in_shuffled_rounds(monkeypatch):
    """`max_rounds_for` still caps a contender's timed calls when the order
    is shuffled."""
    log = []
    _logging_clock(monkeypatch, log)
    contenders = {name: (lambda name=name: log.append(name)) for name in ("fast", "ref", "peer")}
    timings = time_interleaved(contenders, min_time=0.0, min_rounds=12, max_rounds=12, settle=0.0,
                               warmup=0, max_rounds_for={"ref": 3})
    assert [len(timings[n].runs) for n in ("fast", "ref", "peer")] == [12, 3, 12]
    assert log.count("ref") == 3


def test_time_per_call_reports_per_call_seconds():
    timing = time_per_call(lambda: None, calls=100, repeats=3)
    assert len(timing.runs) == 3 and 0 < timing.median < 1e-3


def test_stream_bandwidth_probe_is_positive():
    assert stream_bandwidth(1, nbytes=8 << 20, repeats=2) > 0


def test_bench_float64_skips_the_bfloat16_state_case(tmp_path):
    # bfloat16 optimizer state is for float32 parameters only: the float64
    # run reports the case as skipped instead of failing
    out = tmp_path / "bench.json"
    result = run_cli("bench", "--dtype", "float64", "--filter", "optim_adam-bf16state_resnet50",
                     "--no-torch", "--no-progress", "--threads", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr
    (case,) = json.loads(out.read_text())["cases"]
    assert case["name"] == "optim_adam-bf16state_resnet50"
    assert "bfloat16" in case["skipped"] and "float64" in case["skipped"]
    assert "fastbn" not in case


@pytest.mark.parametrize("name, bytes_per_element", [("Adam", 28), ("Adam-bf16state", 20), ("Adam-bf16", 14)])
def test_adam_bench_rows_count_the_bytes_of_their_storage(name, bytes_per_element):
    # float32 Adam moves param (r+w), grad (r), two states (r+w) of 4 bytes;
    # bfloat16 state halves the state bytes, pure bfloat16 halves everything
    pytest.importorskip("ml_dtypes")
    from fastbn.bench import cases
    shapes = [(10,), (7, 3)]
    build = cases._optimizer_case(name, lambda quick: shapes)
    contenders, moved = build(cases.BenchConfig(dtype=np.dtype(np.float32), threads=1, quick=True, torch=None))
    assert moved == 31 * bytes_per_element
    # a bfloat16 row also times fastbn's float32 Adam on the same values
    twin = {"fastbn_fp32"} if name != "Adam" else set()
    assert set(contenders) == {"fastbn", "reference"} | twin
    for contender in contenders.values():
        contender()


@pytest.mark.parametrize("name", ["Adam-bf16state", "Adam-bf16"])
def test_bfloat16_adam_rows_float32_twin_steps_the_same_values_in_float32(name, monkeypatch):
    # the twin is a float32-state Adam with the row's other settings (a
    # non-default lr here, so a twin that dropped them would step differently)
    # on float32 copies of the row's params and grads: after one step its
    # params are those of such an Adam run here, its state is float32, and
    # the row's own params are untouched
    pytest.importorskip("ml_dtypes")
    from fastbn.bench import cases
    kwargs, *rest = cases.OPTIMIZERS[name]
    monkeypatch.setitem(cases.OPTIMIZERS, name, (dict(kwargs, lr=3e-2), *rest))
    shapes = [(40,), (6, 5)]
    build = cases._optimizer_case(name, lambda quick: shapes)
    contenders, _ = build(cases.BenchConfig(dtype=np.dtype(np.float32), threads=1, quick=True,
                                            torch=None))
    twin_opt = contenders["fastbn_fp32"].__self__
    row_opt = contenders["fastbn"].__self__
    twin_params = twin_opt.param_groups[0]["params"]
    row_params = row_opt.param_groups[0]["params"]
    start = [p.data.copy() for p in twin_params]
    row_start = [p.data.copy() for p in row_params]
    for p, q in zip(twin_params, row_params):
        assert p.data.dtype == np.float32 and p.grad.dtype == np.float32
        np.testing.assert_array_equal(p.data, q.data.astype(np.float32))
        np.testing.assert_array_equal(p.grad, q.grad.astype(np.float32))
    contenders["fastbn_fp32"]()
    expected = [fastbn.Parameter(d.copy(), grad=p.grad.copy()) for d, p in zip(start, twin_params)]
    fastbn.optim.Adam(expected, lr=3e-2).step()
    for p, e, s in zip(twin_params, expected, start):
        np.testing.assert_array_equal(p.data, e.data)
        assert not np.array_equal(p.data, s)  # the step moved every tensor
        assert twin_opt.state[p]["exp_avg"].dtype == np.float32
        assert twin_opt.state[p]["exp_avg_sq"].dtype == np.float32
    for p, b in zip(row_params, row_start):
        np.testing.assert_array_equal(p.data.view(np.uint8), b.view(np.uint8))


def test_bench_bfloat16_row_reports_its_float32_twin(tmp_path):
    # a bfloat16 row also times fastbn's float32 call on the same values in
    # the same rounds: 'speedup_vs_fastbn_fp32' in the JSON and the 'x fp32'
    # column; a float32 row has neither (--quick: the small shapes)
    pytest.importorskip("ml_dtypes")
    out = tmp_path / "bench.json"
    result = run_cli("bench", "--quick", "--filter", "bn_bf16_eval_fwd_nchw", "--filter",
                     "overhead_eval_2x4", "--no-torch", "--no-progress", "--threads", "1",
                     "--json", str(out))
    assert result.returncode == 0, result.stderr
    cases = {case["name"]: case for case in json.loads(out.read_text())["cases"]}
    assert set(cases) == {"bn_bf16_eval_fwd_nchw", "overhead_eval_2x4"}
    bf16 = cases["bn_bf16_eval_fwd_nchw"]
    assert bf16["fastbn_fp32"]["median_s"] > 0
    assert bf16["speedup_vs_fastbn_fp32"] == pytest.approx(
        bf16["fastbn_fp32"]["median_s"] / bf16["fastbn"]["median_s"])
    assert "fastbn_fp32" not in cases["overhead_eval_2x4"]
    assert "speedup_vs_fastbn_fp32" not in cases["overhead_eval_2x4"]
    lines = result.stdout.splitlines()
    (header,) = [line for line in lines if line.startswith("case ")]
    assert header.split()[-2:] == ["x", "fp32"]
    (row,) = [line for line in lines if line.startswith("bn_bf16_eval_fwd_nchw ")]
    assert row.split()[-1] == f"{bf16['speedup_vs_fastbn_fp32']:.2f}"
    (other,) = [line for line in lines if line.startswith("overhead_eval_2x4 ")]
    assert len(other.rstrip()) < header.index("x fp32")  # the column is empty
