"""Pure-NumPy reference implementations: the same signatures as the fast
path, written for clarity, used by the tests as the oracle and selectable with
``fastbn.use_backend("reference")``."""
from .batchnorm import batch_norm

__all__ = ["batch_norm"]
