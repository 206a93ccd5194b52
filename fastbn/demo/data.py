"""Datasets for the demo: scikit-learn's bundled handwritten digits (no
download), or a generated stand-in of the same shape when scikit-learn is not
installed."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Dataset", "load_dataset", "make_blobs_dataset", "DATASETS"]

DATASETS = ("auto", "digits", "generated")


@dataclass
class Dataset:
    """A train/test split of a classification problem.

    Attributes
    ----------
    name : str
        'digits' or 'generated'.
    x_train, x_test : ndarray (n, features)
        Features scaled to [0, 1].
    y_train, y_test : ndarray (n,) of int64
        Class indices.
    num_classes : int
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]

    def astype(self, dtype) -> "Dataset":
        return Dataset(self.name, self.x_train.astype(dtype), self.y_train,
                       self.x_test.astype(dtype), self.y_test, self.num_classes)

    def describe(self) -> str:
        return (f"{self.name}: {len(self.y_train)} training and {len(self.y_test)} test samples, "
                f"{self.num_features} features, {self.num_classes} classes")


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    """Stratified split: the same fraction of every class goes to the test set."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        test[members[:int(round(test_fraction * len(members)))]] = True
    train_order = rng.permutation(np.flatnonzero(~test))
    test_order = np.flatnonzero(test)
    return x[train_order], y[train_order], x[test_order], y[test_order]


def make_blobs_dataset(num_samples: int = 1800, num_features: int = 64, num_classes: int = 10,
                       prototypes_per_class: int = 3, noise: float = 0.35,
                       test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """A digits-sized problem: every class is a mixture of a few random
    prototypes in [0, 1]^features; samples are a prototype plus Gaussian noise,
    clipped to [0, 1]. Classes overlap enough that a linear model is not
    perfect."""
    rng = np.random.default_rng(seed)
    prototypes = rng.random((num_classes, prototypes_per_class, num_features))
    y = np.arange(num_samples) % num_classes
    which = rng.integers(0, prototypes_per_class, size=num_samples)
    x = prototypes[y, which] + noise * rng.standard_normal((num_samples, num_features))
    np.clip(x, 0.0, 1.0, out=x)
    x_train, y_train, x_test, y_test = _split(x, y.astype(np.int64), test_fraction, seed + 1)
    return Dataset("generated", x_train, y_train, x_test, y_test, num_classes)


def _load_digits(test_fraction: float, seed: int) -> Dataset:
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = digits.data.astype(np.float64) / 16.0   # pixel intensities 0..16
    y = digits.target.astype(np.int64)
    x_train, y_train, x_test, y_test = _split(x, y, test_fraction, seed)
    return Dataset("digits", x_train, y_train, x_test, y_test, 10)


def have_sklearn() -> bool:
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError:
        return False
    return True


def load_dataset(name: str = "auto", *, test_fraction: float = 0.2, seed: int = 0,
                 dtype=np.float32) -> Dataset:
    """Load the demo's dataset.

    Parameters
    ----------
    name : {'auto', 'digits', 'generated'}
        'digits' needs scikit-learn (``pip install fastbn[demo]``); 'auto'
        uses it when installed and falls back to 'generated'.
    test_fraction : float
        Share of every class held out for testing.
    seed : int
        Seeds the split (and the generated data).
    dtype : float32 or float64
    """
    if name not in DATASETS:
        raise ValueError(f"dataset: expected one of {DATASETS}, got {name!r}")
    if name == "digits" or (name == "auto" and have_sklearn()):
        try:
            dataset = _load_digits(test_fraction, seed)
        except ImportError:
            raise ImportError("the digits dataset needs scikit-learn: pip install 'fastbn[demo]' "
                              "(or use --dataset generated)") from None
    else:
        dataset = make_blobs_dataset(test_fraction=test_fraction, seed=seed)
    return dataset.astype(dtype)
