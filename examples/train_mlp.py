"""Train an MLP with BatchNorm on handwritten digits (scikit-learn's bundled
copy when installed, otherwise a generated dataset of the same shape), then
save it with fastbn.save.

    python examples/train_mlp.py --epochs 10 --save mlp.ckpt
"""
import argparse

import numpy as np

import fastbn
from fastbn import nn
from fastbn.demo.data import load_dataset

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--dataset", default="auto", choices=["auto", "digits", "generated"])
parser.add_argument("--save", default=None, help="write the trained model's checkpoint here")
args = parser.parse_args()

data = load_dataset(args.dataset, seed=0)
print(data.describe())

# the model: Linear -> BatchNorm -> ReLU, twice, then the logits
rng = np.random.default_rng(0)
model = nn.Sequential(
    nn.Linear(data.num_features, 128, rng=rng), nn.BatchNorm1d(128), nn.ReLU(),
    nn.Linear(128, 64, rng=rng), nn.BatchNorm1d(64), nn.ReLU(),
    nn.Linear(64, data.num_classes, rng=rng),
)
criterion = nn.CrossEntropyLoss()
optimizer = fastbn.optim.Adam(model.parameters(), lr=args.lr)
order = np.random.default_rng(1)

for epoch in range(1, args.epochs + 1):
    model.train()
    losses = []
    for batch in np.array_split(order.permutation(len(data.y_train)),
                                len(data.y_train) // args.batch_size):
        loss = criterion(model(data.x_train[batch]), data.y_train[batch])   # forward
        optimizer.zero_grad()
        model.backward(criterion.backward())                                # backward
        optimizer.step()                                                    # update
        losses.append(float(loss))
    model.eval()
    accuracy = (model(data.x_test).argmax(axis=1) == data.y_test).mean()
    print(f"epoch {epoch:2d}  loss {np.mean(losses):.4f}  test accuracy {100 * accuracy:.1f}%")

if args.save:
    fastbn.save(args.save, {"model": model, "optimizer": optimizer, "epoch": args.epochs})
    print(f"saved to {args.save}")
