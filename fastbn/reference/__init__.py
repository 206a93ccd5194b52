"""Pure-NumPy reference implementations: the same signatures as the fast
path, written for clarity, used by the tests as the oracle and selectable with
``fastbn.use_backend("reference")``."""
from .batchnorm import (batch_norm, batch_norm_backward, batch_norm_backward_eval,
                        batch_norm_forward_train)
from .batchnorm_phases import (batch_norm_apply, batch_norm_backward_apply,
                               batch_norm_backward_reduce, batch_norm_merge_stats,
                               batch_norm_stats)
from .batchnorm_relu import (batch_norm_relu, batch_norm_relu_backward,
                             batch_norm_relu_backward_eval, batch_norm_relu_forward_train)

__all__ = ["batch_norm", "batch_norm_forward_train", "batch_norm_backward",
           "batch_norm_backward_eval", "batch_norm_relu", "batch_norm_relu_forward_train",
           "batch_norm_relu_backward", "batch_norm_relu_backward_eval",
           "batch_norm_stats", "batch_norm_merge_stats", "batch_norm_apply",
           "batch_norm_backward_reduce", "batch_norm_backward_apply"]
