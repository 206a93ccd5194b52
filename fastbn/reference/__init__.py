"""Pure-NumPy reference implementations: the same signatures as the fast
path, written for clarity, used by the tests as the oracle and selectable with
``fastbn.use_backend("reference")``."""
from .batchnorm import (batch_norm, batch_norm_backward, batch_norm_backward_eval,
                        batch_norm_forward_train)

__all__ = ["batch_norm", "batch_norm_forward_train", "batch_norm_backward",
           "batch_norm_backward_eval"]
