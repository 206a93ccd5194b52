"""BatchNorm1d / BatchNorm2d / BatchNorm3d with torch.nn's names, defaults,
state_dict keys and semantics, plus a NumPy-style backward.

    bn = fastbn.nn.BatchNorm2d(64)             # channels-first (N, C, H, W)
    bn = fastbn.nn.BatchNorm2d(64, axis=-1)    # channels-last  (N, H, W, C)
    y = bn(x)                # training: batch statistics, running stats updated
    dx = bn.backward(dy)     # accumulates into bn.weight.grad / bn.bias.grad
    bn.eval(); y = bn(x)     # running statistics

Conventions of other frameworks: Keras/Flax ``momentum`` is the weight of the
OLD value (their 0.99 is torch's and fastbn's 0.01), Keras' default eps is
1e-3, and Keras/Flax keep a BIASED running variance; fastbn follows torch
(unbiased running variance, momentum = weight of the new batch statistic).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .._backend import current_kernels
from .._bn_validation import (BFLOAT16, batch_norm_layout, channel_dtype, check_activation,
                              check_batch_size, check_counter, check_eps,
                              check_layer_axis, check_like, check_momentum,
                              check_num_features, check_running_stats_apart,
                              check_running_stats_pair, check_updatable)
from .._validation import check_bool, check_channel_vector, check_float_dtype, check_grad_target
from ..parameter import Parameter
from .module import Module, accumulate_grads

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

_TRAIN, _EVAL = 0, 1   # which statistics the saved forward used


def _read_only(name: str, reason: str) -> property:
    """A constructor argument that cannot change afterwards (AttributeError
    naming it on assignment)."""
    slot = "_" + name

    def get(self):
        return self.__dict__[slot]

    def refuse(self, value) -> None:
        raise AttributeError(f"{name}: read-only after construction ({reason}); "
                             f"build a new {type(self).__name__} instead")
    return property(get, refuse, doc=f"Read-only after construction ({reason}).")


class _BatchNorm(Module):
    """Shared implementation; the subclasses only fix the accepted ranks.

    Hyperparameters can be assigned after construction, with the
    constructor's checks (the same ValueError/TypeError and message): `eps`,
    `momentum`, `track_running_stats` (as in torch: False stops the running
    statistics' update in training; eval still uses them while they exist)
    and `axis` (the next call re-derives the layout).  `num_features`,
    `affine` and `dtype` size and type the parameters and buffers, so they
    are read-only (AttributeError).
    """

    _input_ranks: Tuple[int, ...] = ()
    #: True in the fused BatchNormReLU layers (fastbn/nn/batchnorm_relu.py):
    #: the kernels apply a ReLU after the normalization and mask the gradient
    fused_relu = False

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *, axis: int = 1,
                 dtype=np.float32) -> None:
        super().__init__()
        num_features = check_num_features(num_features)
        eps = check_eps(eps, batch_stats=True)
        momentum = check_momentum(momentum)
        affine = check_bool(affine, "affine")
        track_running_stats = check_bool(track_running_stats, "track_running_stats")
        axis = check_layer_axis(axis)
        dtype = check_float_dtype(dtype)
        set_attribute = object.__setattr__
        set_attribute(self, "_num_features", num_features)
        set_attribute(self, "_affine", affine)
        set_attribute(self, "_dtype", dtype)
        set_attribute(self, "_eps", eps)
        set_attribute(self, "_momentum", momentum)
        set_attribute(self, "_track_running_stats", track_running_stats)
        set_attribute(self, "_axis", axis)
        if affine:
            self.weight = Parameter(np.ones(num_features, dtype))
            self.bias = Parameter(np.zeros(num_features, dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", np.zeros(num_features, dtype))
            self.register_buffer("running_var", np.ones(num_features, dtype))
            self.register_buffer("num_batches_tracked", np.array(0, dtype=np.int64))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        set_attribute(self, "_saved", None)
        set_attribute(self, "_known_input", ((), None, None))

    # ---- hyperparameters ----------------------------------------------------
    # The per-call path reads the validated private values (_eps, ...); the
    # public names are properties so that an assignment is checked at once
    # (a bad value would otherwise reach the kernels on the next call).

    num_features = _read_only("num_features", "it sizes the parameters and buffers")
    affine = _read_only("affine", "it decides whether weight and bias exist")
    dtype = _read_only("dtype", "it is the dtype of the parameters and buffers")

    @property
    def eps(self) -> float:
        """Added to the variance; > 0."""
        return self._eps

    @eps.setter
    def eps(self, value) -> None:
        object.__setattr__(self, "_eps", check_eps(value, batch_stats=True))

    @property
    def momentum(self) -> Optional[float]:
        """Weight of the new batch statistic in [0, 1], or None (cumulative average)."""
        return self._momentum

    @momentum.setter
    def momentum(self, value) -> None:
        object.__setattr__(self, "_momentum", check_momentum(value))

    @property
    def track_running_stats(self) -> bool:
        """Whether a training forward updates the running statistics."""
        return self._track_running_stats

    @track_running_stats.setter
    def track_running_stats(self, value) -> None:
        object.__setattr__(self, "_track_running_stats", check_bool(value, "track_running_stats"))

    @property
    def axis(self) -> int:
        """Channel axis: 1 (channels-first) or -1 (channels-last)."""
        return self._axis

    @axis.setter
    def axis(self, value) -> None:
        value = check_layer_axis(value)
        # the cached layout of the last input shape belongs to the old axis
        object.__setattr__(self, "_known_input", ((), None, None))
        object.__setattr__(self, "_axis", value)

    # ---- state ------------------------------------------------------------

    def reset_running_stats(self) -> None:
        """running_mean = 0, running_var = 1, num_batches_tracked = 0 (in place)."""
        if self._track_running_stats:
            buffers = (self.running_mean, self.running_var)
            for name, array in zip(("running_mean", "running_var"), buffers):
                check_updatable(name, array)
            check_counter("num_batches_tracked", self.num_batches_tracked, updating=True)
            for array in buffers:
                if array is not None:
                    array.fill(0 if array is buffers[0] else 1)
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.fill(0)

    def reset_parameters(self) -> None:
        """Running statistics reset; weight = 1, bias = 0 (in place)."""
        self.reset_running_stats()
        if self._affine:
            self.weight.data.fill(1)
            self.bias.data.fill(0)

    def _optional_state_keys(self) -> Tuple[str, ...]:
        # torch loads checkpoints without it, keeping the current count
        return ("num_batches_tracked",) if self.num_batches_tracked is not None else ()

    # ---- forward ------------------------------------------------------------

    def _rank_error(self, ndim: int) -> str:
        ranks = " or ".join(f"{rank}D" for rank in self._input_ranks)
        return f"expected {ranks} input (got {ndim}D input)"

    def _check_input(self, x):
        x = check_activation(x)
        if x.ndim not in self._input_ranks:
            raise ValueError(self._rank_error(x.ndim))
        layout = batch_norm_layout(x, self._axis)
        if layout.channels != self._num_features:
            raise ValueError(
                f"input: expected {self._num_features} channels (num_features) on axis "
                f"{self._axis}, got {layout.channels} (input shape {tuple(x.shape)})")
        if x.dtype is not self._dtype and channel_dtype(x.dtype) != self._dtype \
                and self._has_state():
            # bfloat16 activations go with float32 parameters and buffers
            # (torch's mixed precision: module in float32, activations in bf16)
            also = " (or bfloat16)" if self._dtype == np.float32 and BFLOAT16 is not None else ""
            raise TypeError(f"input: expected dtype {self._dtype}{also} (the dtype of this "
                            f"{type(self).__name__}'s parameters and buffers), got {x.dtype}")
        return x, layout

    def _known_or_checked_input(self, x):
        """`_check_input(x)`, or for an ndarray of the last accepted shape and
        dtype that call's geometry again: a training loop calls the layer on
        the same shape every step (assigning `axis` clears it)."""
        known = self._known_input
        if type(x) is np.ndarray and x.shape == known[0] and x.dtype is known[1]:
            return x, known[2]
        x, layout = self._check_input(x)
        object.__setattr__(self, "_known_input", (x.shape, x.dtype, layout))
        return x, layout

    def _has_state(self) -> bool:
        return (self._affine or self.running_mean is not None
                or self.running_var is not None)

    def _vector(self, name: str, array, dtype):
        return check_channel_vector(name, array, self._num_features, dtype)

    def _state_arrays(self):
        """(weight, bias, running_mean, running_var) as they are (None when absent)."""
        weight, bias = self.weight, self.bias
        return (None if weight is None else weight.data, None if bias is None else bias.data,
                self.running_mean, self.running_var)

    def _checked_state(self, dtype, updating: bool = False, x: Optional[np.ndarray] = None):
        """The state arrays validated against num_features and the input dtype
        (and, when `updating`, writeable running statistics sharing no memory
        with each other, `x`, weight or bias, and a counter a training forward
        can bump), for a kernel that refused them (it checks
        them itself, before writing anything): raises the validators' error,
        or returns the arrays they normalized for a second try."""
        arrays = self._state_arrays()
        arrays = tuple(self._vector(name, array, dtype) for name, array in
                       zip(("weight", "bias", "running_mean", "running_var"), arrays))
        check_running_stats_pair(arrays[2], arrays[3])
        if updating:
            check_updatable("running_mean", arrays[2])
            check_updatable("running_var", arrays[3])
            if arrays[2] is not None:
                check_running_stats_apart(arrays[2], arrays[3], x, arrays[0], arrays[1])
            check_counter("num_batches_tracked", self.num_batches_tracked, updating=True)
            if self._momentum is None and self.num_batches_tracked is None:
                raise ValueError("num_batches_tracked: expected a 0-d int64 array because "
                                 "momentum=None (cumulative average) needs the number of "
                                 "batches seen, got None")
        return arrays

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Normalize `x` (float32/float64, channel axis `axis`).

        A layer with float32 parameters also takes bfloat16 activations
        (``ml_dtypes.bfloat16``, as torch's mixed precision keeps the module
        in float32): y and the gradient of x are then bfloat16, rounded to
        nearest-even from float32 arithmetic, while the statistics, running
        statistics and parameter gradients stay float32.

        Training mode: batch statistics; with track_running_stats the running
        statistics are updated in place and num_batches_tracked += 1
        (momentum None: cumulative average).  Eval mode: running statistics,
        or batch statistics when the layer has none.
        Saves what `backward` needs.

        Everything the call writes is checked first, so an exception leaves
        the running statistics and the counter unchanged; the running
        statistics and num_batches_tracked change together (also when a
        KeyboardInterrupt arrives during the call).
        """
        kernels = current_kernels()
        x, layout = self._known_or_checked_input(x)
        training = self.training
        update = training and self._track_running_stats
        weight, bias, running_mean, running_var = self._state_arrays()
        outer, channels, inner = layout.outer, layout.channels, layout.inner
        if training or running_mean is None:
            if outer * inner < 2:
                check_batch_size(x, layout)
            counter = None
            momentum = 0.0
            if update and running_mean is not None:
                counter = self.num_batches_tracked
                momentum = self._momentum   # None: the kernel's cumulative average
            else:
                running_mean = running_var = None
            # one kernel call: it checks the state arrays, updates the running
            # statistics and bumps the counter (all or nothing), and returns
            # the array it read as x, which the backward reads again
            result = kernels.train_forward(x, None, outer, channels, inner, weight, bias,
                                           self._eps, running_mean, running_var, momentum,
                                           self.fused_relu, counter)
            if result is None:
                weight, bias, running_mean, running_var = self._checked_state(
                    channel_dtype(x.dtype), update and running_mean is not None, x)
                if not (update and running_mean is not None):
                    running_mean = running_var = None
                result = self._retry(kernels.train_forward(
                    x, None, outer, channels, inner, weight, bias, self._eps, running_mean,
                    running_var, momentum, self.fused_relu, counter))
            y, mean, invstd, x = result
            object.__setattr__(self, "_saved", (_TRAIN, x, layout, mean, invstd))
            return y
        if x.size == 0:
            self._checked_state(channel_dtype(x.dtype))
            y = np.empty(x.shape, x.dtype)
        else:
            result = kernels.eval_forward(x, None, outer, channels, inner, running_mean,
                                          running_var, weight, bias, self._eps, self.fused_relu)
            if result is None:
                weight, bias, running_mean, running_var = self._checked_state(
                    channel_dtype(x.dtype))
                result = self._retry(kernels.eval_forward(
                    x, None, outer, channels, inner, running_mean, running_var, weight, bias,
                    self._eps, self.fused_relu))
            y, x = result
        object.__setattr__(self, "_saved", (_EVAL, x, layout, running_mean, running_var))
        return y

    def _retry(self, result):
        if result is None:   # the validators passed what the kernel refused: a bug
            raise RuntimeError(f"{type(self).__name__}: the kernels refused arguments that "
                               "passed validation")
        return result

    # ---- backward -----------------------------------------------------------

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Gradient of the input of the last forward.

        Adds dL/dweight and dL/dbias to ``weight.grad`` and ``bias.grad``
        (allocating them when None), so gradients of several backward calls
        accumulate as in torch; clear them with ``zero_grad()``.  Both grads
        are checked (shape, dtype, writeable) before either is written, and
        they change together or not at all.

        Parameters
        ----------
        dy : ndarray
            IN.  Gradient of the output; same shape and dtype as the forward's
            input.

        Returns
        -------
        ndarray
            dL/dx (a new array).
        """
        saved = self._saved
        if saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward: no forward pass to "
                               "differentiate; call the module on an input first")
        kernels = current_kernels()
        mode, x, layout, stat_a, stat_b = saved
        dy = check_like("dy", dy, x, "the forward's input")
        weight, bias = self.weight, self.bias
        if weight is not None and bias is not None and x.size:
            dweight, dbias = weight.grad, bias.grad
            if dweight is not None and dbias is not None:
                # the warm call: both grads exist and the kernel adds into
                # them; it checks every array before writing and returns None
                # for anything unusual, which the path below sorts out
                dx = self._backward_kernel(kernels, mode, dy, x, layout, stat_a, stat_b,
                                           weight.data, bias.data, dweight, dbias, True)
                if dx is not None:
                    return dx
        weight, bias = self._state_arrays()[:2]
        dweight, dbias, accumulate, finish = self._grad_targets(channel_dtype(x.dtype))
        if x.size == 0:
            self._checked_state(channel_dtype(x.dtype))
            dx = np.empty(x.shape, x.dtype)
            if dweight is not None and not accumulate:
                dweight.fill(0)
                dbias.fill(0)
        else:
            dx = self._backward_kernel(kernels, mode, dy, x, layout, stat_a, stat_b, weight,
                                       bias, dweight, dbias, accumulate)
            if dx is None:
                weight, bias = self._checked_state(channel_dtype(x.dtype))[:2]
                dx = self._retry(self._backward_kernel(kernels, mode, dy, x, layout, stat_a,
                                                       stat_b, weight, bias, dweight, dbias,
                                                       accumulate))
        if finish is not None:
            finish(dweight, dbias)
        return dx

    def _backward_kernel(self, kernels, mode, dy, x, layout, stat_a, stat_b, weight, bias,
                         dweight, dbias, accumulate):
        if mode == _TRAIN:
            return kernels.backward(dy, x, None, layout.outer, layout.channels, layout.inner,
                                    stat_a, stat_b, weight, dweight, dbias, accumulate, bias,
                                    self.fused_relu)
        return kernels.backward_eval(dy, x, None, layout.outer, layout.channels, layout.inner,
                                     stat_a, stat_b, weight, self._eps, dweight, dbias,
                                     accumulate, bias, self.fused_relu)

    def _check_grads(self, dtype) -> None:
        """Every existing parameter gradient: a writeable array of the
        parameter's shape and of the input's dtype."""
        for name, param in (("weight", self.weight), ("bias", self.bias)):
            if param is not None and param.grad is not None:
                self._vector(f"{name}.grad", param.grad, dtype)
                check_grad_target(f"{name}.grad", param.grad, param.data)

    def _grad_targets(self, dtype):
        """(dweight, dbias, accumulate, finish): where the kernel writes the
        parameter gradients.  Usually straight into the existing grads
        (accumulate; one kernel call writes both) or into new arrays that
        become the grads; otherwise into new arrays that `finish` adds to the
        grads, all or nothing.  Every existing grad is checked here, before
        the kernel runs."""
        weight, bias = self.weight, self.bias
        if weight is None and bias is None:
            return None, None, False, None
        if weight is not None and bias is not None:
            if weight.grad is None and bias.grad is None:
                dweight = np.empty(self._num_features, dtype)
                dbias = np.empty(self._num_features, dtype)

                def adopt(dweight, dbias):
                    # one statement: both grads appear together
                    weight.grad, bias.grad = dweight, dbias
                return dweight, dbias, False, adopt
            if (self._accumulable(weight.grad, dtype)
                    and self._accumulable(bias.grad, dtype)):
                return weight.grad, bias.grad, True, None
        # unusual: one parameter absent, one grad None, or a grad that is
        # not a plain contiguous array
        self._check_grads(dtype)

        def combine(dweight, dbias):
            accumulate_grads([(param, fresh) for param, fresh in ((weight, dweight), (bias, dbias))
                              if param is not None])
        return (np.empty(self._num_features, dtype), np.empty(self._num_features, dtype),
                False, combine)

    def _accumulable(self, grad, dtype) -> bool:
        return (type(grad) is np.ndarray and grad.dtype is dtype and grad.ndim == 1
                and grad.shape[0] == self._num_features and grad.flags.c_contiguous
                and grad.flags.writeable and grad.flags.aligned)

    # ---- printing ---------------------------------------------------------------

    def extra_repr(self) -> str:
        text = (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")
        if self.axis != 1:
            text += f", axis={self.axis}"
        if self.dtype != np.float32:
            text += f", dtype={self.dtype}"
        return text


class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, C) or (N, C, L) input (channels-last: (N, C) or
    (N, L, C) with ``axis=-1``).

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps : float
        Added to the variance (> 0).
    momentum : float or None
        Running-average factor (weight of the NEW batch statistic); None
        means a cumulative average (1 / num_batches_tracked).
    affine : bool
        Learnable weight (init 1) and bias (init 0) as `fastbn.Parameter`.
    track_running_stats : bool
        Keep running_mean (init 0), running_var (init 1, unbiased) and
        num_batches_tracked (int64 0-d array); if False, batch statistics are
        used in eval too.
    axis : int, keyword-only
        Channel axis: 1 (channels-first, torch's layout) or -1 (channels-last).
    dtype : float32 or float64, keyword-only
        dtype of parameters and buffers; inputs must match.
    """

    _input_ranks = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, C, H, W) input ((N, H, W, C) with ``axis=-1``).
    Parameters as `BatchNorm1d`."""

    _input_ranks = (4,)


class BatchNorm3d(_BatchNorm):
    """Batch norm over (N, C, D, H, W) input ((N, D, H, W, C) with ``axis=-1``).
    Parameters as `BatchNorm1d`."""

    _input_ranks = (5,)
