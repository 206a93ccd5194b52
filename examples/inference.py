"""Eval-mode inference with only NumPy and fastbn: restore a model from a
checkpoint, fold every BatchNorm into the Linear before it, classify a batch.

    python examples/inference.py                          # a stand-in model
    python examples/inference.py --checkpoint mlp.ckpt    # from train_mlp.py --save

Without --checkpoint, the script builds the train_mlp.py architecture with
seeded weights and made-up running statistics, saves it with fastbn.save and
restores it into a fresh model, so every step of a deployment runs.
"""
import argparse
import os
import tempfile
import time

import numpy as np

import fastbn
from fastbn import nn

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--checkpoint", default=None, help="a checkpoint written by train_mlp.py --save")
parser.add_argument("--batch", type=int, default=256, help="samples to classify")
args = parser.parse_args()

FEATURES, CLASSES = 64, 10


def build_model():
    """The train_mlp.py architecture (the checkpoint holds values, not code)."""
    return nn.Sequential(
        nn.Linear(FEATURES, 128, rng=0), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Linear(128, 64, rng=1), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Linear(64, CLASSES, rng=2),
    )


model = build_model()
if args.checkpoint:
    saved = fastbn.load_into(args.checkpoint, {"model": model}, strict=False)
    print(f"restored {args.checkpoint} (trained for {saved.get('epoch', '?')} epochs)")
else:
    # stand-in for a trained model: running statistics as training leaves them
    rng = np.random.default_rng(0)
    state = model.state_dict()
    for name, value in state.items():
        if name.endswith("running_mean"):
            value[...] = rng.normal(0.0, 0.5, value.shape)
        elif name.endswith("running_var"):
            value[...] = rng.uniform(0.5, 2.0, value.shape)
    model.load_state_dict(state)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.ckpt")
        fastbn.save(path, {"model": model})
        model = build_model()                     # fresh weights ...
        fastbn.load_into(path, {"model": model})  # ... replaced by the saved ones
    print("built a stand-in model, saved it and restored it")

model.eval()
folded = nn.fold_batchnorm(model)   # Linear -> BatchNorm1d pairs become one Linear
print(f"original: {model}\nfolded:   {folded}")

x = np.random.default_rng(42).random((args.batch, FEATURES), dtype=np.float32)
timings = {}
for name, net in (("original", model), ("folded", folded)):
    net(x)                                        # warm-up
    start = time.perf_counter()
    for _ in range(20):
        logits = net(x)
    timings[name] = (time.perf_counter() - start) / 20
    if name == "original":
        reference_logits = logits

predictions = logits.argmax(axis=1)
print(f"max |folded - original| logit difference: {np.abs(logits - reference_logits).max():.2e}")
print(f"predicted classes of the first 16 samples: {predictions[:16].tolist()}")
print(f"agreement folded vs original: {100 * (predictions == reference_logits.argmax(axis=1)).mean():.1f}%")
print(f"per batch of {args.batch}: original {1e3 * timings['original']:.3f} ms, "
      f"folded {1e3 * timings['folded']:.3f} ms")
