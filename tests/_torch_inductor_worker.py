"""torch.compile(fullgraph=True) with the default inductor backend on a
Linear/BatchNorm/ReLU model of fastbn.torch modules, against the same model
run eagerly (started by tests/test_torch_compile_inductor.py in a fresh
process with its own inductor cache).

Usage: python _torch_inductor_worker.py OUT_JSON
"""
import copy
import json
import sys
import time

import torch

import fastbn.functional
import fastbn.torch as ft

nn = torch.nn


PHASE = ["eager"]  # whose calls are being counted


def count_calls(module, names, counts):
    """Count calls of module.<name> per phase (the custom ops look the
    functions up at call time, so compiled code calls the wrappers too)."""
    for name in names:
        original = getattr(module, name)

        def counting(*args, _original=original, _name=name, **kwargs):
            phase = counts.setdefault(PHASE[0], {})
            phase[_name] = phase.get(_name, 0) + 1
            return _original(*args, **kwargs)
        setattr(module, name, counting)


def run(phase, function, *args):
    PHASE[0] = phase
    return function(*args)


def main():
    out = sys.argv[1]
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8),
                          nn.BatchNorm1d(8), nn.Linear(8, 3))
    ft.convert(eager, fuse_relu=True)  # BatchNormReLU1d + Identity, then BatchNorm1d
    model = copy.deepcopy(eager)
    counts = {}
    count_calls(fastbn.functional, ["batch_norm_forward_train", "batch_norm_relu_forward_train",
                                    "batch_norm_backward", "batch_norm_relu_backward",
                                    "batch_norm", "batch_norm_relu"], counts)
    compiled = torch.compile(model, fullgraph=True)
    errors = {}
    start = time.perf_counter()
    for step in range(3):
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(step))
        y_eager, y_compiled = run("eager", eager, x), run("compiled", compiled, x)
        errors[f"y_step{step}"] = (y_compiled - y_eager).abs().max().item()
        run("eager", lambda: y_eager.square().sum().backward())
        run("compiled", lambda: y_compiled.square().sum().backward())
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), model.parameters()):
        errors[f"grad_{name}"] = (p_compiled.grad - p_eager.grad).abs().max().item()
    for key, value in eager.state_dict().items():
        errors[f"state_{key}"] = (model.state_dict()[key].double() - value.double()).abs().max().item()
    eager.eval()
    compiled.eval()
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(9))
    errors["y_eval"] = (run("compiled", compiled, x) - run("eager", eager, x)).abs().max().item()
    seconds = time.perf_counter() - start
    with open(out, "w") as handle:
        json.dump({"errors": errors, "counts": counts, "seconds": seconds}, handle)


if __name__ == "__main__":
    main()
