"""Optimizer step benchmark: fastbn's fused kernels vs the NumPy reference vs
PyTorch (fused=True where torch has it, foreach=True otherwise), same
process, same thread count, float32.

Parameter sets: ResNet-50's parameter shapes (torchvision's 161 tensors,
25.6M parameters) and 1000 tensors x 1000 parameters (per-tensor overhead).

    python benchmarks/bench_optim.py             # table
    python benchmarks/bench_optim.py --quick     # fewer rounds
    pytest benchmarks/bench_optim.py --benchmark-only    # pytest-benchmark

fastbn and torch are timed in alternating rounds (one step each per round),
so a change of machine load hits both; the median of the rounds is reported.
GB/s counts the bytes one step must move: read+write of the parameter and
of each state buffer, read of the gradient (28 B/parameter for Adam in
float32).  Ratios are torch / fastbn and reference / fastbn (higher is
better for fastbn).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np

import fastbn
from fastbn import optim

try:
    import torch
except ImportError:  # torch is optional: its column stays empty
    torch = None

DTYPE = np.float32


# section: cases ----------------------------------------------------------------

@dataclass(frozen=True)
class OptimizerCase:
    name: str
    fastbn_class: str
    kwargs: dict
    state_buffers: int                 # arrays read and written besides the parameter
    torch_class: Optional[str] = None
    torch_kwargs: dict = field(default_factory=dict)
    targets: str = ""                  # the issue's goals, printed beside the numbers


CASES = [
    OptimizerCase("Adam", "Adam", dict(lr=1e-3), 2, "Adam", dict(fused=True),
                  ">= 1.0x torch fused, >= 10x reference"),
    OptimizerCase("AdamW", "AdamW", dict(lr=1e-3), 2, "AdamW", dict(fused=True), ">= 10x reference"),
    OptimizerCase("SGD-momentum", "SGD", dict(lr=1e-2, momentum=0.9), 1, "SGD", dict(fused=True),
                  ">= 1.0x torch fused, >= 10x reference"),
    # The textbook form; torch's equivalent is SGD(lr * (1 - beta), momentum=beta).
    OptimizerCase("Momentum", "Momentum", dict(lr=1e-2, momentum=0.9), 1, "SGD",
                  dict(fused=True, lr=1e-3, momentum=0.9), ">= 10x reference"),
    OptimizerCase("RMSprop", "RMSprop", dict(lr=1e-3), 1, "RMSprop", dict(foreach=True),
                  ">= 3x torch foreach, >= 10x reference"),
    OptimizerCase("Adagrad", "Adagrad", dict(lr=1e-2), 1, "Adagrad", dict(fused=True), ">= 10x reference"),
    OptimizerCase("Lion", "Lion", dict(lr=1e-4), 1, None, {}, ">= 10x reference"),
]
CASES_BY_NAME = {case.name: case for case in CASES}


def resnet50_shapes() -> List[tuple]:
    from fastbn.bench import resnet50_shapes as shapes  # the CLI's definition, one source
    return shapes()


PARAMETER_SETS: Dict[str, Callable[[], List[tuple]]] = {
    "resnet50": resnet50_shapes,
    "1000x1000": lambda: [(1000,)] * 1000,
}


def bytes_per_step(case: OptimizerCase, shapes: List[tuple], dtype=DTYPE) -> int:
    elements = sum(int(np.prod(shape)) for shape in shapes)
    return elements * np.dtype(dtype).itemsize * (2 + 1 + 2 * case.state_buffers)


def build_contenders(case: OptimizerCase, shapes: List[tuple], dtype=DTYPE,
                     include_reference: bool = True) -> Dict[str, Callable[[], object]]:
    """One step callable per contender, over the same seeded data (each with
    its own copy of the parameters and state)."""
    rng = np.random.default_rng(0)
    datas = [(rng.standard_normal(shape, dtype=np.float32) * 0.05).astype(dtype) for shape in shapes]
    grads = [(rng.standard_normal(shape, dtype=np.float32) * 0.01).astype(dtype) for shape in shapes]

    def make_fastbn():
        params = [fastbn.Parameter(data.copy(), grad=grad) for data, grad in zip(datas, grads)]
        return getattr(optim, case.fastbn_class)(params, **case.kwargs)

    contenders: Dict[str, Callable[[], object]] = {"fastbn": make_fastbn().step}
    if torch is not None and case.torch_class is not None:
        tensors = [torch.from_numpy(data.copy()).requires_grad_(True) for data in datas]
        for tensor, grad in zip(tensors, grads):
            tensor.grad = torch.from_numpy(grad)
        kwargs = {**case.kwargs, **case.torch_kwargs}
        contenders["torch"] = getattr(torch.optim, case.torch_class)(tensors, **kwargs).step
    if include_reference:
        reference_step = make_fastbn().step

        def reference():
            with fastbn.use_backend("reference"):
                reference_step()
        contenders["reference"] = reference
    return contenders


# section: timing ---------------------------------------------------------------

def time_interleaved(contenders: Dict[str, Callable[[], object]], rounds: int,
                     warmup: int = 3) -> Dict[str, List[float]]:
    """Seconds per call of each contender, one call each per round."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def run_optimizer_benchmark(case_names: Optional[List[str]] = None,
                            parameter_sets: Optional[List[str]] = None, rounds: int = 25,
                            reference_rounds: int = 3, threads: Optional[int] = None) -> List[dict]:
    """Benchmark rows (one per case x parameter set): median/min seconds per
    step for fastbn, torch (None when unavailable) and the reference, the
    ratios torch/fastbn and reference/fastbn, and fastbn's GB/s.

    fastbn and torch alternate `rounds` times; the reference (slow) runs
    `reference_rounds` times.  torch gets fastbn's thread count.
    """
    if threads is not None:
        fastbn.set_num_threads(threads)
    if torch is not None:
        torch.set_num_threads(fastbn.get_num_threads())
    rows = []
    for set_name in parameter_sets or list(PARAMETER_SETS):
        shapes = PARAMETER_SETS[set_name]()
        for case_name in case_names or [case.name for case in CASES]:
            case = CASES_BY_NAME[case_name]
            contenders = build_contenders(case, shapes)
            reference = contenders.pop("reference")
            times = time_interleaved(contenders, rounds)
            times["reference"] = time_interleaved({"reference": reference}, reference_rounds, warmup=1)["reference"]
            median = {name: statistics.median(values) for name, values in times.items()}
            moved = bytes_per_step(case, shapes)
            rows.append({
                "case": case.name, "parameters": set_name, "tensors": len(shapes),
                "elements": sum(int(np.prod(s)) for s in shapes), "bytes": moved,
                "fastbn_s": median["fastbn"], "fastbn_min_s": min(times["fastbn"]),
                "torch_s": median.get("torch"), "reference_s": median["reference"],
                "vs_torch": median["torch"] / median["fastbn"] if "torch" in median else None,
                "vs_reference": median["reference"] / median["fastbn"],
                "gb_per_s": moved / median["fastbn"] / 1e9,
                "torch_variant": (f"{case.torch_class}({', '.join(f'{k}={v}' for k, v in case.torch_kwargs.items())})"
                                  if "torch" in median else "-"),
                "targets": case.targets,
            })
    return rows


def format_table(rows: List[dict]) -> str:
    header = (f"{'case':<13} {'params':<10} {'fastbn ms':>10} {'torch ms':>9} {'ref ms':>9} "
              f"{'x torch':>8} {'x ref':>7} {'GB/s':>6}  torch variant / targets")
    lines = [header, "-" * len(header)]
    for row in rows:
        torch_ms = f"{row['torch_s'] * 1e3:9.2f}" if row["torch_s"] is not None else f"{'-':>9}"
        vs_torch = f"{row['vs_torch']:7.2f}x" if row["vs_torch"] is not None else f"{'-':>8}"
        lines.append(f"{row['case']:<13} {row['parameters']:<10} {row['fastbn_s'] * 1e3:10.2f} {torch_ms} "
                     f"{row['reference_s'] * 1e3:9.1f} {vs_torch} {row['vs_reference']:6.1f}x "
                     f"{row['gb_per_s']:6.1f}  {row['torch_variant']}; {row['targets']}")
    return "\n".join(lines)


def describe_setup() -> str:
    torch_text = f"torch {torch.__version__} ({torch.get_num_threads()} threads)" if torch else "torch not installed"
    return (f"fastbn {fastbn.__version__}, SIMD target {fastbn.get_simd_target()}, "
            f"{fastbn.get_num_threads()} threads; numpy {np.__version__}; {torch_text}; float32")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--cases", nargs="*", choices=list(CASES_BY_NAME), help="optimizers to run")
    parser.add_argument("--parameters", nargs="*", choices=list(PARAMETER_SETS), help="parameter sets")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    rows = run_optimizer_benchmark(args.cases, args.parameters, rounds=7 if args.quick else 25,
                                   reference_rounds=1 if args.quick else 3, threads=args.threads)
    print(describe_setup())
    print(format_table(rows))
    return 0


# section: pytest-benchmark ---------------------------------------------------------

try:
    import pytest
except ImportError:  # running as a script without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="module", params=list(PARAMETER_SETS))
    def shapes(request):
        return PARAMETER_SETS[request.param]()

    @pytest.mark.parametrize("contender", ["fastbn", "torch", "reference"])
    @pytest.mark.parametrize("case_name", [case.name for case in CASES])
    def test_optimizer_step(benchmark, shapes, case_name, contender):
        case = CASES_BY_NAME[case_name]
        contenders = build_contenders(case, shapes, include_reference=contender == "reference")
        if contender not in contenders:
            pytest.skip(f"no {contender} counterpart for {case_name}")
        if torch is not None:
            torch.set_num_threads(fastbn.get_num_threads())
        benchmark.extra_info.update(bytes=bytes_per_step(case, shapes), simd=fastbn.get_simd_target(),
                                    threads=fastbn.get_num_threads())
        rounds = 2 if contender == "reference" else 15
        benchmark.pedantic(contenders[contender], rounds=rounds, warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
