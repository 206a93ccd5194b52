"""Smith's learning-rate range test on an MLP: sweep the lr up exponentially
for a few hundred steps, record the loss, and read off a (base_lr, max_lr)
range for a cyclical schedule.

    python examples/lr_range_test.py --plot lr_range.png
"""
import argparse

import numpy as np

import fastbn
from fastbn import nn
from fastbn.demo.data import load_dataset

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--iters", type=int, default=200)
parser.add_argument("--optimizer", default="Adam", choices=["Adam", "RMSprop", "Momentum"])
parser.add_argument("--no-batchnorm", action="store_true")
parser.add_argument("--plot", default=None, help="save the loss-vs-lr plot here (needs matplotlib)")
args = parser.parse_args()

data = load_dataset("auto", seed=0)
rng = np.random.default_rng(0)
layers = []
for fan_in, fan_out in ((data.num_features, 128), (128, 64)):
    layers.append(nn.Linear(fan_in, fan_out, rng=rng))
    if not args.no_batchnorm:
        layers.append(nn.BatchNorm1d(fan_out))
    layers.append(nn.ReLU())
model = nn.Sequential(*layers, nn.Linear(64, data.num_classes, rng=rng))
criterion = nn.CrossEntropyLoss()
optimizer = getattr(fastbn.optim, args.optimizer)(model.parameters())

batches = np.random.default_rng(1)


def train_step():
    batch = batches.choice(len(data.y_train), size=64, replace=False)
    loss = criterion(model(data.x_train[batch]), data.y_train[batch])
    optimizer.zero_grad()
    model.backward(criterion.backward())
    optimizer.step()
    return loss


with np.errstate(over="ignore", invalid="ignore"):
    result = fastbn.optim.lr_range_test(train_step, optimizer, start_lr=1e-5, end_lr=10.0,
                                        num_iters=args.iters, smooth=0.9, plot=args.plot)
print(f"{args.optimizer}{'' if args.no_batchnorm else ' + BatchNorm'}: "
      f"{len(result.lrs)} steps, stopped: {result.stop_reason}")
if result.suggested_range:
    low, high = result.suggested_range
    print(f"suggested range: base_lr={low:.3g}, max_lr={high:.3g} "
          f"(steepest descent at lr={result.steepest_lr:.3g})")
    print(f"e.g. fastbn.optim.lr_scheduler.CyclicLR(optimizer, base_lr={low:.3g}, "
          f"max_lr={high:.3g}, step_size_up=2 * steps_per_epoch)")
if args.plot:
    print(f"plot written to {args.plot}")
