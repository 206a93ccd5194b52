"""A torch CPU training loop before and after `fastbn.torch` (one line).

Trains, on a learnable synthetic task, a ResNet-18-shaped CNN (defined
below; no torchvision) and an MLP with BatchNorm1d, twice each from the same
initial weights: with torch's modules and optimizer, and after
``fastbn.torch.convert(model, fuse_relu=True)`` with fastbn's optimizer.
Steps of the two alternate, so machine load hits both alike; the script
prints the median and best step time of each (the median of 20 steps by
default: single steps of the same work vary by 20-30% on a 2-core machine)
and how far the two losses drift apart.

The task: each example is its class's fixed random pattern plus twice as
much noise, so the loss falls from ln(10) = 2.3 and both runs follow the
same trajectory up to float32 rounding.  (On random labels the loss of
SGD at lr 0.05, momentum 0.9 diverged to about 5 within 20 steps, and a
diverging run amplifies rounding differences: the two losses differed by
up to 70%.)

    python examples/torch_cpu_training.py              # 1-2 minutes on 2 cores
    python examples/torch_cpu_training.py --steps 20 --mlp-steps 200 --mlp-width 1024
    python examples/torch_cpu_training.py --bn-module  # BatchNorm2d module alone

Set OMP_WAIT_POLICY=passive before starting Python on a shared or loaded
machine: the idle threads of fastbn's and torch's OpenMP pools then sleep
instead of busy-waiting (measured in the README's PyTorch section).
"""
import argparse
import copy
import statistics
import time

import torch
from torch import nn

import fastbn
import fastbn.torch


# section: models -----------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet's basic block; conv-BN-ReLU sits in a Sequential so that
    convert(fuse_relu=True) can fuse its BN and ReLU."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels))
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels))

    def forward(self, x):
        return torch.relu(self.branch(x) + self.shortcut(x))


def resnet18_shaped(width=64, classes=10):
    """ResNet-18's layout: a 7x7 stem, 4 stages of 2 basic blocks."""
    layers = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
              nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    channels = width
    for stage in range(4):
        out_channels = width * 2 ** stage
        for block in range(2):
            layers.append(BasicBlock(channels, out_channels, 2 if stage and not block else 1))
            channels = out_channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]
    return nn.Sequential(*layers)


def mlp(features, width, depth=3, classes=10):
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(features, width, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
        features = width
    return nn.Sequential(*layers, nn.Linear(features, classes))


def learnable_batches(count, batch_shape, example_shape, classes=10):
    """`count` batches whose examples are their class's fixed random pattern
    plus noise twice as strong: a task the models can learn, so the loss
    falls instead of diverging as it does on random labels."""
    patterns = torch.randn(classes, *example_shape)
    labels = torch.randint(0, classes, (count, *batch_shape))
    inputs = patterns[labels] + 2.0 * torch.randn(count, *batch_shape, *example_shape)
    return inputs, labels


# section: timing -----------------------------------------------------------------


def make_optimizer(module, params, args):
    if args.optimizer == "adam":
        options = dict(lr=1e-3)
        if module is torch.optim and args.torch_fused:
            options["fused"] = True
        return module.Adam(params, **options)
    # lr 0.01: at 0.05 the ResNet's loss on the learnable task (4 cycled
    # batches) rose from 2.5 to 5.1 by step 5 and, after falling to 0.12 at
    # step 16, jumped back to 3-5; at 0.01 it falls to about 0.004 in 22 steps
    options = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
    if module is torch.optim and args.torch_fused:
        options["fused"] = True
    return module.SGD(params, **options)


def train_step(model, optimizer, x, target):
    start = time.perf_counter()
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start, loss.item()


def compare(name, model, make_batch, steps, warmup, args):
    """Train `model` (torch) and a converted copy side by side, alternating."""
    fast_model = fastbn.torch.convert(copy.deepcopy(model), fuse_relu=True)
    if args.channels_last and name.startswith("ResNet"):
        model = model.to(memory_format=torch.channels_last)
        fast_model = fast_model.to(memory_format=torch.channels_last)
    runs = {"torch": (model, make_optimizer(torch.optim, model.parameters(), args)),
            "fastbn": (fast_model, make_optimizer(fastbn.torch.optim, fast_model.parameters(),
                                                  args))}
    times = {label: [] for label in runs}
    losses = {label: [] for label in runs}
    for step in range(warmup + steps):
        x, target = make_batch(step)
        order = list(runs) if step % 2 == 0 else list(reversed(runs))
        for label in order:
            elapsed, loss = train_step(*runs[label], x, target)
            losses[label].append(loss)
            if step >= warmup:
                times[label].append(elapsed)
    median = {label: statistics.median(values) for label, values in times.items()}
    best = {label: min(values) for label, values in times.items()}
    first = abs(losses["fastbn"][0] - losses["torch"][0]) / max(abs(losses["torch"][0]), 1e-12)
    drift = max(abs(a - b) for a, b in zip(losses["fastbn"], losses["torch"]))
    print(f"{name}: {steps} steps after {warmup} warm-up, alternating")
    for label in runs:
        print(f"  {label:7s} median {median[label] * 1e3:9.2f} ms   best {best[label] * 1e3:9.2f} ms")
    print(f"  speed-up: median {median['torch'] / median['fastbn']:.2f}x, "
          f"best {best['torch'] / best['fastbn']:.2f}x")
    # same weights and batch: the first losses agree to float32 rounding;
    # afterwards the rounding differences of the updates accumulate
    print(f"  loss: first step {losses['torch'][0]:.4f}, relative difference "
          f"{first:.1e}; final step torch {losses['torch'][-1]:.4f}, fastbn "
          f"{losses['fastbn'][-1]:.4f}; largest difference over the steps {drift:.1e}")


def bn_module(args):
    """BatchNorm2d module forward + backward through autograd, alternating."""
    shape = (64, 128, 56, 56)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(shape).contiguous(memory_format=memory_format).requires_grad_()
        dy = torch.randn(shape).contiguous(memory_format=memory_format)
        modules = {"torch": nn.BatchNorm2d(128), "fastbn": fastbn.torch.BatchNorm2d(128)}
        times = {label: [] for label in modules}
        for step in range(args.warmup + args.steps):
            for label, module in modules.items():
                start = time.perf_counter()
                module(x).backward(dy)
                if step >= args.warmup:
                    times[label].append(time.perf_counter() - start)
                x.grad = None
        layout = "channels_last" if memory_format is torch.channels_last else "contiguous"
        median = {label: statistics.median(v) * 1e3 for label, v in times.items()}
        best = {label: min(v) * 1e3 for label, v in times.items()}
        print(f"BatchNorm2d fwd+bwd {shape} {layout}: torch median {median['torch']:.1f} ms "
              f"(best {best['torch']:.1f}), fastbn median {median['fastbn']:.1f} ms "
              f"(best {best['fastbn']:.1f}): {median['torch'] / median['fastbn']:.2f}x median, "
              f"{best['torch'] / best['fastbn']:.2f}x best")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=112, help="image height and width")
    parser.add_argument("--width", type=int, default=64, help="channels of the first stage")
    parser.add_argument("--steps", type=int, default=20, help="timed ResNet steps per side")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--mlp-batch", type=int, default=256)
    parser.add_argument("--mlp-width", type=int, default=512)
    parser.add_argument("--mlp-steps", type=int, default=30)
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--torch-fused", action="store_true",
                        help="torch's optimizer with fused=True (default: torch's default)")
    parser.add_argument("--channels-last", action="store_true", help="ResNet in channels_last")
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--skip-mlp", action="store_true")
    parser.add_argument("--bn-module", action="store_true",
                        help="only time the BatchNorm2d module on (64, 128, 56, 56)")
    args = parser.parse_args()

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, fastbn "
          f"{fastbn.__version__}; optimizer {args.optimizer}"
          f"{' (torch fused=True)' if args.torch_fused else ''}")
    if args.bn_module:
        bn_module(args)
        return
    if not args.skip_resnet:
        images, labels = learnable_batches(4, (args.batch,), (3, args.size, args.size))
        compare(f"ResNet-18-shaped CNN, batch {args.batch}, {args.size}x{args.size}",
                resnet18_shaped(args.width), lambda step: (images[step % 4], labels[step % 4]),
                args.steps, args.warmup, args)
    if not args.skip_mlp:
        features, classes = learnable_batches(8, (args.mlp_batch,), (256,))
        compare(f"MLP 256-{args.mlp_width}x3 with BatchNorm1d, batch {args.mlp_batch}",
                mlp(256, args.mlp_width), lambda step: (features[step % 8], classes[step % 8]),
                args.mlp_steps, max(args.warmup, 3), args)


if __name__ == "__main__":
    main()
