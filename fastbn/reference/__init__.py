"""Pure-NumPy reference: `_kernels` holds the reference backend's kernels
object (the fast one's methods, in NumPy, selected with
``fastbn.use_backend("reference")``); the public functions are twins of
`fastbn.functional`'s, with identical signatures, running on those kernels
(the tests' oracle)."""
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
