"""Where the time of examples/torch_cpu_training.py's ResNet step goes: torch's
modules and optimizer against the converted model (``fastbn.torch.convert(...,
fuse_relu=True)``) with fastbn's optimizer, both in this process, steps
alternated.

    python benchmarks/torch_step_profile.py [--steps 8] [--batch 32] [--size 112]

Two tables:

1. phases (no profiler): forward, backward and optimizer.step of every step,
   timed with perf_counter; min and median over the steps.  A third model,
   the same network with its BatchNorm layers removed (nn.Identity; ReLUs
   kept) and fastbn's optimizer, is the ceiling: no BatchNorm implementation
   can make the step faster than that.
2. op kinds (torch.profiler, forward + backward only): the self CPU time of
   the ops of each kind per step, min and median over the steps.  "bn+relu"
   counts torch's batch norm, the ReLUs that convert fuses into it and their
   backward ops against fastbn's fused calls (Python glue included); the
   ReLUs after the residual additions, which convert cannot fuse, stay in
   "relu (residual)".  The ceiling model keeps its ReLU modules (in
   "bn+relu"), so a fused BN+ReLU at zero cost would be a few ms below it.

Minima are the figures to compare on a loaded machine (a step that was
descheduled is slow in every op kind); medians show the typical step.
"""
import argparse
import collections
import copy
import os
import statistics
import sys
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import fastbn.torch  # noqa: E402
from torch_cpu_training import learnable_batches, resnet18_shaped  # noqa: E402


def without_batch_norm(module):
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.Identity())
        else:
            without_batch_norm(child)
    return module


# op name prefix -> kind (the first matching prefix wins)
KINDS = [("aten::mkldnn_convolution", "conv forward"),
         ("aten::convolution_backward", "conv backward"),
         ("ConvolutionBackward", "conv backward"),
         ("aten::native_batch_norm_backward", "bn+relu backward"),
         ("NativeBatchNormBackward", "bn+relu backward"),
         ("EagerFor_fastbn_batch_norm_trainBackward", "bn+relu backward"),
         ("aten::native_batch_norm", "bn+relu forward"),
         ("aten::_batch_norm_impl_index", "bn+relu forward"),
         ("aten::batch_norm", "bn+relu forward"),
         ("EagerFor_fastbn_batch_norm_train", "bn+relu forward"),
         ("aten::max_pool2d", "max pool"),
         ("aten::add", "residual add, grad sums"),
         ("aten::copy_", "copies"),
         ("aten::fill_", "fills"),
         ("aten::empty", "allocation")]


def kind_of(name):
    for prefix, kind in KINDS:
        if name.startswith(prefix):
            return kind
    return "other"


def op_kinds(prof, fused_relu_shapes, relu_modules_fused):
    """Self CPU ms per kind.  The ReLU modules (nn.ReLU(inplace=True): relu_)
    are the ones convert fuses; the residual ReLUs are torch.relu (relu).
    threshold_backward serves both: unless the model's ReLU modules are
    fused, `fused_relu_shapes` (shape -> ReLU modules at that shape) says
    which share of its calls belongs to them."""
    totals = collections.defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        name, ms = event.key, event.self_cpu_time_total / 1e3
        if name in ("aten::relu_", "aten::clamp_min_"):
            totals["bn+relu forward"] += ms
        elif name in ("aten::relu", "aten::clamp_min"):
            totals["relu (residual) forward"] += ms
        elif name == "aten::threshold_backward":
            share = 0.0
            if not relu_modules_fused and event.input_shapes and event.count:
                fused = fused_relu_shapes.get(tuple(event.input_shapes[0]), 0)
                share = min(fused, event.count) / event.count
            totals["bn+relu backward"] += ms * share
            totals["relu (residual) backward"] += ms * (1.0 - share)
        else:
            kind = kind_of(name)
            totals[kind] += ms
            if kind == "other":
                totals["  other: " + name[:22]] += ms
    return totals


def fused_relu_shapes_of(model, example):
    """shape -> how many ReLUs convert(fuse_relu=True) fuses at that shape."""
    counts = collections.Counter()
    hooks = []

    def count(module, inputs, output):
        counts[tuple(output.shape)] += 1

    for sequential in model.modules():
        if isinstance(sequential, nn.Sequential):
            children = list(sequential)
            for layer, following in zip(children, children[1:]):
                if isinstance(layer, nn.BatchNorm2d) and type(following) is nn.ReLU:
                    hooks.append(layer.register_forward_hook(count))
    with torch.no_grad():
        model(example)
    for hook in hooks:
        hook.remove()
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=112)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = resnet18_shaped()
    images, labels = learnable_batches(4, (args.batch,), (3, args.size, args.size))
    fused_shapes = fused_relu_shapes_of(model, images[0])
    fast = fastbn.torch.convert(copy.deepcopy(model), fuse_relu=True)
    bare = without_batch_norm(copy.deepcopy(model))
    options = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
    runs = {"torch": (model, torch.optim.SGD(model.parameters(), **options)),
            "fastbn": (fast, fastbn.torch.optim.SGD(fast.parameters(), **options)),
            "no BN (ceiling)": (bare, fastbn.torch.optim.SGD(bare.parameters(), **options))}
    phases = {label: collections.defaultdict(list) for label in runs}
    kinds = {label: collections.defaultdict(list) for label in runs}
    labels_order = list(runs)
    for step in range(args.warmup + 2 * args.steps):
        x, target = images[step % 4], labels[step % 4]
        shift = step % len(labels_order)
        profiled = step >= args.warmup + args.steps
        for label in labels_order[shift:] + labels_order[:shift]:
            net, optimizer = runs[label]
            optimizer.zero_grad()
            if profiled:
                with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                    nn.functional.cross_entropy(net(x), target).backward()
                optimizer.step()
                for kind, ms in op_kinds(prof, fused_shapes, label == "fastbn").items():
                    kinds[label][kind].append(ms)
                continue
            start = time.perf_counter()
            loss = nn.functional.cross_entropy(net(x), target)
            middle = time.perf_counter()
            loss.backward()
            end = time.perf_counter()
            optimizer.step()
            last = time.perf_counter()
            if step >= args.warmup:
                for phase, seconds in (("forward", middle - start), ("backward", end - middle),
                                       ("optimizer.step", last - end),
                                       ("step", last - start)):
                    phases[label][phase].append(seconds * 1e3)

    def cell(values):
        return f"{min(values):8.1f} {statistics.median(values):8.1f}" if values else " " * 17

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}, "
          f"{args.size}x{args.size}; {args.steps} timed + {args.steps} profiled steps per model; "
          f"load average {os.getloadavg()[0]:.2f}")
    header = "".join(f" {label[:17]:>17s}" for label in runs)
    print(f"\nphase (ms, min median)  {header}")
    for phase in ("forward", "backward", "optimizer.step", "step"):
        print(f"{phase:23s} " + "".join(f" {cell(phases[label][phase])}" for label in runs))
    print(f"\nop kind, fwd+bwd (ms, min median){header}")
    def weight(kind):
        return max(statistics.median(kinds[label].get(kind, [0.0])) for label in runs)

    names = sorted((kind for kind in set().union(*(kinds[label] for label in runs))
                    if not kind.startswith("  ")), key=lambda kind: -weight(kind))
    # the five largest contributors to "other"
    others = sorted((kind for kind in set().union(*(kinds[label] for label in runs))
                     if kind.startswith("  ")), key=lambda kind: -weight(kind))[:5]
    for kind in names + others:
        print(f"{kind:32s}" + "".join(f" {cell(kinds[label].get(kind, []))}" for label in runs))


if __name__ == "__main__":
    main()
