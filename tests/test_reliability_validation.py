"""One validation layer: every public function raises the same exception type
(and the same message) on the fast and the reference backend for the same
bad input, and the type follows the documented rule:

- not an array / not a number / non-float dtype (ints, complex, bool, float16,
  object, byte-swapped) / mixed float32-float64 -> TypeError (never a silent
  cast, see fastbn/_validation.py);
- wrong rank, shape, channel count, layout, or an out-of-range value (eps,
  momentum, lr, betas, ...) -> ValueError;
- messages name the argument.

BAD_INPUTS below is the list of bad inputs tried (one test per entry and
backend); the mixed-dtype rule is then checked across the API.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Tuple, Type

import numpy as np
import pytest

import fastbn
from fastbn import functional as F
from fastbn import optim
from fastbn.optim import lr_scheduler
from fastbn.parameter import Parameter

from test_reliability_kernels import bn_module_class, bn_training_available, bn_training_pieces_available

BACKENDS = ("fast", "reference")


class BadInput(NamedTuple):
    name: str
    call: Callable[[], object]
    error: Type[BaseException]
    mentions: str   # the message must contain this (the argument's name)


# section: batch norm -----------------------------------------------------------------

def _bn(x=None, mean=None, var=None, **kwargs):
    x = np.ones((2, 3, 4), np.float32) if x is None else x
    mean = np.zeros(3, np.float32) if mean is None else mean
    var = np.ones(3, np.float32) if var is None else var
    return F.batch_norm(x, mean, var, **kwargs)


def _x(dtype=np.float32, shape=(2, 3, 4)):
    return np.ones(shape, dtype)


def _overlapping_out():
    x = np.ones((2, 3, 4), np.float32)
    return _bn(x, out=x[::-1])


def _non_contiguous_out():
    return _bn(out=np.ones((2, 3, 8), np.float32)[..., ::2])


def _read_only_out():
    out = np.empty((2, 3, 4), np.float32)
    out.flags.writeable = False
    return _bn(out=out)


BN_BAD = [
    BadInput("bn_x_int32", lambda: _bn(_x(np.int32)), TypeError, "input"),
    BadInput("bn_x_int64_list", lambda: _bn([[1, 2, 3], [4, 5, 6]]), TypeError, "running_mean"),
    BadInput("bn_x_complex64", lambda: _bn(_x(np.complex64)), TypeError, "input"),
    BadInput("bn_x_bool", lambda: _bn(_x(np.bool_)), TypeError, "input"),
    BadInput("bn_x_float16", lambda: _bn(_x(np.float16)), TypeError, "input"),
    BadInput("bn_x_object", lambda: _bn(_x(object)), TypeError, "input"),
    BadInput("bn_x_big_endian", lambda: _bn(_x(">f4")), TypeError, "input"),
    BadInput("bn_x_string", lambda: _bn("x"), TypeError, "input"),
    BadInput("bn_x_none", lambda: F.batch_norm(None, np.zeros(3), np.ones(3)), TypeError, "input"),
    BadInput("bn_x_float64_stats_float32", lambda: _bn(_x(np.float64)), TypeError, "running_mean"),
    BadInput("bn_x_1d", lambda: _bn(np.ones(3, np.float32)), ValueError, "input"),
    BadInput("bn_x_0d", lambda: _bn(np.float32(1.0)), ValueError, "input"),
    BadInput("bn_mean_short", lambda: _bn(mean=np.zeros(2, np.float32)), ValueError, "running_mean"),
    BadInput("bn_mean_2d", lambda: _bn(mean=np.zeros((3, 1), np.float32)), ValueError, "running_mean"),
    BadInput("bn_mean_int", lambda: _bn(mean=np.zeros(3, np.int32)), TypeError, "running_mean"),
    BadInput("bn_mean_list_of_floats", lambda: _bn(mean=[0.0, 0.0, 0.0]), TypeError, "running_mean"),
    BadInput("bn_var_float64", lambda: _bn(var=np.ones(3)), TypeError, "running_var"),
    BadInput("bn_var_complex", lambda: _bn(var=np.ones(3, np.complex64)), TypeError, "running_var"),
    BadInput("bn_weight_long", lambda: _bn(weight=np.ones(4, np.float32)), ValueError, "weight"),
    BadInput("bn_weight_float64", lambda: _bn(weight=np.ones(3)), TypeError, "weight"),
    BadInput("bn_weight_string", lambda: _bn(weight="abc"), TypeError, "weight"),
    BadInput("bn_bias_float16", lambda: _bn(bias=np.ones(3, np.float16)), TypeError, "bias"),
    BadInput("bn_bias_scalar", lambda: _bn(bias=np.float32(1.0)), ValueError, "bias"),
    BadInput("bn_eps_negative", lambda: _bn(eps=-1e-5), ValueError, "eps"),
    BadInput("bn_eps_nan", lambda: _bn(eps=float("nan")), ValueError, "eps"),
    BadInput("bn_eps_string", lambda: _bn(eps="1e-5"), TypeError, "eps"),
    BadInput("bn_eps_bool", lambda: _bn(eps=True), TypeError, "eps"),
    BadInput("bn_eps_none", lambda: _bn(eps=None), TypeError, "eps"),
    BadInput("bn_momentum_above_one", lambda: _bn(momentum=1.5), ValueError, "momentum"),
    BadInput("bn_momentum_negative", lambda: _bn(momentum=-0.1), ValueError, "momentum"),
    BadInput("bn_momentum_nan", lambda: _bn(momentum=float("nan")), ValueError, "momentum"),
    BadInput("bn_momentum_string", lambda: _bn(momentum="0.1"), TypeError, "momentum"),
    BadInput("bn_axis_0", lambda: _bn(axis=0), ValueError, "axis"),
    BadInput("bn_axis_2_of_4d", lambda: _bn(_x(shape=(2, 3, 4, 5)), axis=2), ValueError, "axis"),
    BadInput("bn_axis_out_of_range", lambda: _bn(axis=5), ValueError, "axis"),
    BadInput("bn_axis_float", lambda: _bn(axis=1.0), TypeError, "axis"),
    BadInput("bn_axis_bool", lambda: _bn(axis=True), TypeError, "axis"),
    BadInput("bn_channels_last_mismatch", lambda: _bn(axis=-1), ValueError, "running_mean"),
    BadInput("bn_out_float64", lambda: _bn(out=np.empty((2, 3, 4))), TypeError, "out"),
    BadInput("bn_out_wrong_shape", lambda: _bn(out=np.empty((2, 3, 5), np.float32)), ValueError, "out"),
    BadInput("bn_out_non_contiguous", _non_contiguous_out, ValueError, "out"),
    BadInput("bn_out_read_only", _read_only_out, ValueError, "out"),
    BadInput("bn_out_list", lambda: _bn(out=[0.0] * 24), TypeError, "out"),
    BadInput("bn_out_overlaps_input", _overlapping_out, ValueError, "out"),
]

if bn_training_available():
    BN_BAD += [
        BadInput("bn_train_one_value_per_channel",
                 lambda: _bn(np.ones((1, 3), np.float32), training=True), ValueError, "per channel"),
        BadInput("bn_train_eps_zero", lambda: _bn(training=True, eps=0.0), ValueError, "eps"),
        BadInput("bn_train_x_int", lambda: _bn(_x(np.int64), training=True), TypeError, "input"),
        BadInput("bn_train_var_float64", lambda: _bn(var=np.ones(3), training=True), TypeError, "running_var"),
    ]


if bn_training_pieces_available():
    def _pieces():
        x = np.ones((2, 3, 4), np.float32)
        return x, np.ones_like(x), np.zeros(3, np.float32), np.ones(3, np.float32)

    def _read_only_stat():
        stat = np.zeros(3, np.float32)
        stat.flags.writeable = False
        return stat

    def _ft(x=None, **kwargs):
        return lambda: F.batch_norm_forward_train(_pieces()[0] if x is None else x, **kwargs)

    def _bw(eval_mode=False, **changes):
        def call():
            x, dy, m, v = _pieces()
            args = dict(dy=dy, x=x, m=m, v=v)
            args.update(changes)
            extra = {k: args.pop(k) for k in list(args) if k not in ("dy", "x", "m", "v")}
            function = F.batch_norm_backward_eval if eval_mode else F.batch_norm_backward
            return function(args["dy"], args["x"], args["m"], args["v"], **extra)
        return call

    BN_BAD += [
        BadInput("forward_train_running_mean_without_var", _ft(running_mean=np.zeros(3, np.float32)),
                 ValueError, "running_var"),
        BadInput("forward_train_momentum_none_with_stats",
                 _ft(running_mean=np.zeros(3, np.float32), running_var=np.ones(3, np.float32), momentum=None),
                 ValueError, "momentum"),
        BadInput("forward_train_read_only_running_mean",
                 _ft(running_mean=_read_only_stat(), running_var=np.ones(3, np.float32)), ValueError, "running_mean"),
        BadInput("forward_train_eps_zero", _ft(eps=0.0), ValueError, "eps"),
        BadInput("forward_train_one_value_per_channel", _ft(x=np.ones((1, 3), np.float32)), ValueError,
                 "per channel"),
        BadInput("forward_train_x_complex", _ft(x=np.ones((2, 3), np.complex64)), TypeError, "input"),
        BadInput("forward_train_weight_float64", _ft(weight=np.ones(3)), TypeError, "weight"),
        BadInput("backward_dy_shape", _bw(dy=np.ones((2, 3, 5), np.float32)), ValueError, "dy"),
        BadInput("backward_dy_float64", _bw(dy=np.ones((2, 3, 4))), TypeError, "dy"),
        BadInput("backward_mean_length", _bw(m=np.zeros(4, np.float32)), ValueError, "mean"),
        BadInput("backward_invstd_float64", _bw(v=np.ones(3)), TypeError, "invstd"),
        BadInput("backward_weight_int", _bw(weight=np.ones(3, np.int32)), TypeError, "weight"),
        BadInput("backward_out_float64", _bw(out=np.empty((2, 3, 4))), TypeError, "out"),
        BadInput("backward_axis_0", _bw(axis=0), ValueError, "axis"),
        BadInput("backward_x_int", _bw(x=np.ones((2, 3, 4), np.int32)), TypeError, "x"),
        BadInput("backward_eval_eps_negative", _bw(eval_mode=True, eps=-1.0), ValueError, "eps"),
        BadInput("backward_eval_var_length", _bw(eval_mode=True, v=np.ones(2, np.float32)), ValueError,
                 "running_var"),
        BadInput("backward_eval_dy_list", _bw(eval_mode=True, dy=[1.0] * 24), ValueError, "dy"),
        BadInput("backward_eval_x_int", _bw(eval_mode=True, x=np.ones((2, 3, 4), np.int32)), TypeError, "x"),
        BadInput("backward_eval_mean_float64", _bw(eval_mode=True, m=np.zeros(3)), TypeError, "running_mean"),
    ]


# section: optimizers -------------------------------------------------------------------

ALL_OPTIMIZERS = [optim.SGD, optim.Momentum, optim.RMSprop, optim.Adam, optim.AdamW, optim.Adagrad, optim.Lion]


def _params(dtype=np.float64):
    return [Parameter(np.ones((2, 3), dtype)), Parameter(np.ones(4, dtype))]


def _make(cls, **kwargs):
    return lambda: cls(_params(), **kwargs)


def _step_with_grad(cls, grad_factory, *, param_dtype=np.float64, mutate=None, **kwargs):
    def call():
        params = _params(param_dtype)
        opt = cls(params, **kwargs)
        params[0].grad = np.ones((2, 3), param_dtype)
        params[1].grad = grad_factory()
        if mutate is not None:
            mutate(params, opt)
        return opt.step()
    return call


def _read_only_data(params, opt):
    params[1].data.flags.writeable = False


def _non_contiguous_data(params, opt):
    params[1].data = np.ones(8)[::2]


def _int_data(params, opt):
    params[1].data = np.ones(4, np.int64)


def _group_value(key, value):
    def mutate(params, opt):
        opt.param_groups[0][key] = value
    return mutate


def _byteswapped():
    return np.ones(4, ">f8")


OPTIM_BAD: List[BadInput] = []
for _cls in ALL_OPTIMIZERS:
    _n = _cls.__name__
    OPTIM_BAD += [
        BadInput(f"{_n}_lr_negative", _make(_cls, lr=-1.0), ValueError, "lr"),
        BadInput(f"{_n}_lr_nan", _make(_cls, lr=float("nan")), ValueError, "lr"),
        BadInput(f"{_n}_lr_string", _make(_cls, lr="0.1"), TypeError, "lr"),
        BadInput(f"{_n}_lr_none", _make(_cls, lr=None), TypeError, "lr"),
        BadInput(f"{_n}_lr_complex", _make(_cls, lr=1j), TypeError, "lr"),
        BadInput(f"{_n}_weight_decay_negative", _make(_cls, weight_decay=-0.1), ValueError, "weight_decay"),
        BadInput(f"{_n}_maximize_int", _make(_cls, maximize=1), TypeError, "maximize"),
        BadInput(f"{_n}_grad_float32_for_float64", _step_with_grad(_cls, lambda: np.ones(4, np.float32)),
                 TypeError, "grad"),
        BadInput(f"{_n}_grad_float64_for_float32",
                 _step_with_grad(_cls, lambda: np.ones(4), param_dtype=np.float32), TypeError, "grad"),
        BadInput(f"{_n}_grad_wrong_shape", _step_with_grad(_cls, lambda: np.ones(5)), ValueError, "grad"),
        BadInput(f"{_n}_grad_transposed_shape", _step_with_grad(_cls, lambda: np.ones((4, 1))), ValueError, "grad"),
        BadInput(f"{_n}_grad_int", _step_with_grad(_cls, lambda: np.ones(4, np.int64)), TypeError, "grad"),
        BadInput(f"{_n}_grad_complex", _step_with_grad(_cls, lambda: np.ones(4, np.complex128)), TypeError, "grad"),
        BadInput(f"{_n}_grad_float16", _step_with_grad(_cls, lambda: np.ones(4, np.float16)), TypeError, "grad"),
        BadInput(f"{_n}_grad_byteswapped", _step_with_grad(_cls, _byteswapped), TypeError, "grad"),
        BadInput(f"{_n}_grad_list", _step_with_grad(_cls, lambda: [1.0] * 4), TypeError, "grad"),
        BadInput(f"{_n}_grad_scalar", _step_with_grad(_cls, lambda: 1.0), TypeError, "grad"),
        BadInput(f"{_n}_data_read_only", _step_with_grad(_cls, lambda: np.ones(4), mutate=_read_only_data),
                 ValueError, "data"),
        BadInput(f"{_n}_data_non_contiguous", _step_with_grad(_cls, lambda: np.ones(4), mutate=_non_contiguous_data),
                 ValueError, "data"),
        BadInput(f"{_n}_data_int", _step_with_grad(_cls, lambda: np.ones(4, np.int64), mutate=_int_data),
                 TypeError, "data"),
        BadInput(f"{_n}_group_lr_negative_later", _step_with_grad(_cls, lambda: np.ones(4),
                                                                  mutate=_group_value("lr", -1.0)),
                 ValueError, "lr"),
        BadInput(f"{_n}_group_lr_string_later", _step_with_grad(_cls, lambda: np.ones(4),
                                                                mutate=_group_value("lr", "x")),
                 TypeError, "lr"),
    ]

OPTIM_BAD += [
    BadInput("SGD_momentum_negative", _make(optim.SGD, momentum=-0.5), ValueError, "momentum"),
    BadInput("SGD_nesterov_without_momentum", _make(optim.SGD, nesterov=True), ValueError, "nesterov"),
    BadInput("SGD_nesterov_with_dampening", _make(optim.SGD, momentum=0.9, nesterov=True, dampening=0.5),
             ValueError, "nesterov"),
    BadInput("SGD_nesterov_string", _make(optim.SGD, momentum=0.9, nesterov="yes"), TypeError, "nesterov"),
    BadInput("SGD_dampening_string", _make(optim.SGD, dampening="0"), TypeError, "dampening"),
    BadInput("Momentum_momentum_one", _make(optim.Momentum, momentum=1.0), ValueError, "momentum"),
    BadInput("Momentum_momentum_negative", _make(optim.Momentum, momentum=-0.1), ValueError, "momentum"),
    BadInput("RMSprop_alpha_negative", _make(optim.RMSprop, alpha=-0.1), ValueError, "alpha"),
    BadInput("RMSprop_eps_negative", _make(optim.RMSprop, eps=-1e-8), ValueError, "eps"),
    BadInput("RMSprop_momentum_negative", _make(optim.RMSprop, momentum=-0.1), ValueError, "momentum"),
    BadInput("RMSprop_centered_string", _make(optim.RMSprop, centered="no"), TypeError, "centered"),
    BadInput("Adam_betas_one_value", _make(optim.Adam, betas=(0.9,)), TypeError, "betas"),
    BadInput("Adam_betas_scalar", _make(optim.Adam, betas=0.9), TypeError, "betas"),
    BadInput("Adam_betas_string", _make(optim.Adam, betas="ab"), TypeError, "betas"),
    BadInput("Adam_beta1_one", _make(optim.Adam, betas=(1.0, 0.999)), ValueError, "betas"),
    BadInput("Adam_beta2_negative", _make(optim.Adam, betas=(0.9, -0.1)), ValueError, "betas"),
    BadInput("Adam_beta_string", _make(optim.Adam, betas=(0.9, "x")), TypeError, "betas"),
    BadInput("Adam_eps_negative", _make(optim.Adam, eps=-1e-8), ValueError, "eps"),
    BadInput("Adam_amsgrad_none", _make(optim.Adam, amsgrad=None), TypeError, "amsgrad"),
    BadInput("AdamW_betas_nan", _make(optim.AdamW, betas=(float("nan"), 0.9)), ValueError, "betas"),
    BadInput("Adagrad_lr_decay_negative", _make(optim.Adagrad, lr_decay=-1.0), ValueError, "lr_decay"),
    BadInput("Adagrad_initial_accumulator_negative", _make(optim.Adagrad, initial_accumulator_value=-1.0),
             ValueError, "initial_accumulator_value"),
    BadInput("Adagrad_eps_negative", _make(optim.Adagrad, eps=-1.0), ValueError, "eps"),
    BadInput("Lion_beta2_above_one", _make(optim.Lion, betas=(0.9, 1.5)), ValueError, "betas"),
    BadInput("Adam_group_betas_bad_later", _step_with_grad(optim.Adam, lambda: np.ones(4),
                                                           mutate=_group_value("betas", (2.0, 0.9))),
             ValueError, "betas"),
    BadInput("params_empty", lambda: optim.SGD([]), ValueError, "params"),
    BadInput("params_single_parameter", lambda: optim.SGD(Parameter(np.ones(3))), TypeError, "params"),
    BadInput("params_ndarray", lambda: optim.SGD(np.ones(3)), TypeError, "params"),
    BadInput("params_list_of_ndarrays", lambda: optim.SGD([np.ones(3)]), TypeError, "params"),
    BadInput("params_set", lambda: optim.SGD([{"params": {Parameter(np.ones(3))}}]), TypeError, "params"),
    BadInput("params_none", lambda: optim.SGD(None), TypeError, "params"),
    BadInput("params_int", lambda: optim.SGD(3), TypeError, "params"),
    BadInput("params_group_without_params", lambda: optim.SGD([{"lr": 0.1}]), ValueError, "params"),
    BadInput("params_repeated", lambda: optim.SGD([Parameter(np.ones(3))] * 2), ValueError, "params"),
    BadInput("load_state_dict_wrong_group_count",
             lambda: optim.SGD(_params()).load_state_dict({"state": {}, "param_groups": []}),
             ValueError, "param"),
    BadInput("load_state_dict_wrong_state_shape",
             lambda: optim.SGD(_params(), momentum=0.9).load_state_dict(
                 {"state": {0: {"momentum_buffer": np.ones(5)}},
                  "param_groups": [dict(optim.SGD(_params()).state_dict()["param_groups"][0])]}),
             ValueError, "momentum_buffer"),
]


# section: gradient clipping --------------------------------------------------------------

def _clip(grad, max_norm=1.0, **kwargs):
    def call():
        param = Parameter(np.ones(4))
        param.grad = grad() if callable(grad) else grad
        return optim.clip_grad_norm_([param], max_norm, **kwargs)
    return call


CLIP_BAD = [
    BadInput("clip_max_norm_string", _clip(np.ones(4), "1"), TypeError, "max_norm"),
    BadInput("clip_max_norm_nan", _clip(np.ones(4), float("nan")), ValueError, "max_norm"),
    BadInput("clip_norm_type_1", _clip(np.ones(4), norm_type=1.0), ValueError, "norm_type"),
    BadInput("clip_norm_type_string", _clip(np.ones(4), norm_type="2"), TypeError, "norm_type"),
    BadInput("clip_grad_int", _clip(np.ones(4, np.int32)), TypeError, "grad"),
    BadInput("clip_grad_complex", _clip(np.ones(4, np.complex64)), TypeError, "grad"),
    BadInput("clip_grad_list", _clip([1.0] * 4), TypeError, "grad"),
    BadInput("clip_grad_non_contiguous", _clip(lambda: np.ones(8)[::2]), ValueError, "grad"),
    BadInput("clip_grad_read_only", _clip(lambda: _read_only(np.ones(4))), ValueError, "grad"),
    BadInput("clip_parameters_ndarray", lambda: optim.clip_grad_norm_([np.ones(3)], 1.0), TypeError,
             "parameters"),
    BadInput("clip_nonfinite_norm", _clip(np.array([1.0, np.nan, 0, 0]), error_if_nonfinite=True),
             RuntimeError, "non-finite"),
]


def _read_only(array):
    array.flags.writeable = False
    return array


# section: schedulers, Parameter, configuration -------------------------------------------

def _opt():
    return optim.SGD(_params(), lr=0.1, momentum=0.9)


def _step_past_one_cycle():
    sched = lr_scheduler.OneCycleLR(_opt(), max_lr=0.1, total_steps=2)
    for _ in range(3):
        sched.step()


SCHEDULER_BAD = [
    BadInput("StepLR_step_size_zero", lambda: lr_scheduler.StepLR(_opt(), 0), ValueError, "step_size"),
    BadInput("StepLR_step_size_float", lambda: lr_scheduler.StepLR(_opt(), 1.5), TypeError, "step_size"),
    BadInput("StepLR_gamma_string", lambda: lr_scheduler.StepLR(_opt(), 2, gamma="x"), TypeError, "gamma"),
    BadInput("StepLR_gamma_negative", lambda: lr_scheduler.StepLR(_opt(), 2, gamma=-0.1), ValueError, "gamma"),
    BadInput("StepLR_optimizer_none", lambda: lr_scheduler.StepLR(None, 2), TypeError, "optimizer"),
    BadInput("StepLR_last_epoch_below_minus_one", lambda: lr_scheduler.StepLR(_opt(), 2, last_epoch=-2),
             ValueError, "last_epoch"),
    BadInput("MultiStepLR_decreasing", lambda: lr_scheduler.MultiStepLR(_opt(), [3, 2]), ValueError, "milestones"),
    BadInput("ExponentialLR_gamma_nan", lambda: lr_scheduler.ExponentialLR(_opt(), float("nan")), ValueError, "gamma"),
    BadInput("LinearLR_start_factor_zero", lambda: lr_scheduler.LinearLR(_opt(), start_factor=0.0),
             ValueError, "start_factor"),
    BadInput("PolynomialLR_total_iters_zero", lambda: lr_scheduler.PolynomialLR(_opt(), total_iters=0),
             ValueError, "total_iters"),
    BadInput("CyclicLR_mode", lambda: lr_scheduler.CyclicLR(_opt(), 0.01, 0.1, mode="bad"), ValueError, "mode"),
    BadInput("CyclicLR_step_size_up_zero", lambda: lr_scheduler.CyclicLR(_opt(), 0.01, 0.1, step_size_up=0),
             ValueError, "step_size_up"),
    BadInput("CyclicLR_momentum_without_momentum",
             lambda: lr_scheduler.CyclicLR(optim.Adagrad(_params()), 0.01, 0.1), ValueError, "momentum"),
    BadInput("OneCycleLR_no_total_steps", lambda: lr_scheduler.OneCycleLR(_opt(), 0.1), ValueError, "total_steps"),
    BadInput("OneCycleLR_total_steps_zero", lambda: lr_scheduler.OneCycleLR(_opt(), 0.1, total_steps=0),
             ValueError, "total_steps"),
    BadInput("OneCycleLR_pct_start", lambda: lr_scheduler.OneCycleLR(_opt(), 0.1, total_steps=10, pct_start=1.5),
             ValueError, "pct_start"),
    BadInput("OneCycleLR_anneal_strategy",
             lambda: lr_scheduler.OneCycleLR(_opt(), 0.1, total_steps=10, anneal_strategy="x"),
             ValueError, "anneal_strategy"),
    BadInput("OneCycleLR_step_past_end", _step_past_one_cycle, ValueError, "total"),
    BadInput("ReduceLROnPlateau_mode", lambda: lr_scheduler.ReduceLROnPlateau(_opt(), mode="x"), ValueError, "mode"),
    BadInput("ReduceLROnPlateau_factor_one", lambda: lr_scheduler.ReduceLROnPlateau(_opt(), factor=1.0),
             ValueError, "factor"),
    BadInput("ReduceLROnPlateau_threshold_mode",
             lambda: lr_scheduler.ReduceLROnPlateau(_opt(), threshold_mode="x"), ValueError, "threshold_mode"),
    BadInput("LambdaLR_not_callable", lambda: lr_scheduler.LambdaLR(_opt(), 3), TypeError, "lr_lambda"),
    BadInput("SequentialLR_milestone_count",
             lambda: (lambda o: lr_scheduler.SequentialLR(
                 o, [lr_scheduler.StepLR(o, 2), lr_scheduler.StepLR(o, 3)], [2, 4]))(_opt()),
             ValueError, "milestones"),
    BadInput("schedules_cosine_T_max_string", lambda: fastbn.schedules.cosine(0.1, "x"), TypeError, "T_max"),
    BadInput("schedules_negative_step", lambda: fastbn.schedules.cosine(0.1, 10)(-1), ValueError, "step"),
    BadInput("schedules_complex_step", lambda: fastbn.schedules.cosine(0.1, 10)(np.ones(2, complex)),
             TypeError, "step"),
]

OTHER_BAD = [
    BadInput("Parameter_string", lambda: Parameter("abc"), TypeError, "Parameter"),
    BadInput("Parameter_complex", lambda: Parameter(np.ones(3, complex)), TypeError, "Parameter"),
    BadInput("Parameter_object", lambda: Parameter(np.array([object()])), TypeError, "Parameter"),
    BadInput("Parameter_grad_shape", lambda: Parameter(np.ones(3), grad=np.ones(4)), ValueError, "grad"),
    BadInput("set_num_threads_zero", lambda: fastbn.set_num_threads(0), ValueError, "n"),
    BadInput("set_num_threads_float", lambda: fastbn.set_num_threads(1.5), TypeError, "n"),
    BadInput("set_simd_target_unknown", lambda: fastbn.set_simd_target("sse9"), ValueError, "sse9"),
    BadInput("use_backend_unknown", lambda: fastbn.use_backend("gpu").__enter__(), ValueError, "backend"),
    BadInput("save_unsupported_value", lambda: fastbn.save("/nonexistent-dir/x.ckpt", {"f": print}),
             TypeError, "f"),
    BadInput("load_not_a_checkpoint", lambda: fastbn.load(__file__), ValueError, "checkpoint"),
]


# section: modules (once they exist) ------------------------------------------------------

MODULE_BAD: List[BadInput] = []
if bn_module_class() is not None:
    def _module(**kwargs):
        return fastbn.nn.BatchNorm2d(3, **kwargs)

    def _forward(x, **kwargs):
        return lambda: _module(**kwargs)(x)

    def _backward_bad(dy):
        def call():
            bn = _module()
            bn.train()
            bn(np.ones((2, 3, 2, 2), np.float32))
            return bn.backward(dy)
        return call

    MODULE_BAD += [
        BadInput("BatchNorm2d_num_features_zero", lambda: fastbn.nn.BatchNorm2d(0), ValueError, "num_features"),
        BadInput("BatchNorm2d_num_features_float", lambda: fastbn.nn.BatchNorm2d(2.5), TypeError, "num_features"),
        BadInput("BatchNorm2d_eps_zero", lambda: _module(eps=0.0), ValueError, "eps"),
        BadInput("BatchNorm2d_momentum_two", lambda: _module(momentum=2.0), ValueError, "momentum"),
        BadInput("BatchNorm2d_dtype_int", lambda: _module(dtype=np.int32), TypeError, "dtype"),
        BadInput("BatchNorm2d_input_3d", _forward(np.ones((2, 3, 4), np.float32)), ValueError, "4D"),
        BadInput("BatchNorm2d_input_channels", _forward(np.ones((2, 4, 2, 2), np.float32)), ValueError, "3"),
        BadInput("BatchNorm2d_input_float64", _forward(np.ones((2, 3, 2, 2))), TypeError, "float"),
        BadInput("BatchNorm2d_input_int", _forward(np.ones((2, 3, 2, 2), np.int64)), TypeError, "input"),
        BadInput("BatchNorm2d_one_value_per_channel", _forward(np.ones((1, 3, 1, 1), np.float32)), ValueError,
                 "per channel"),
        BadInput("BatchNorm2d_dy_shape", _backward_bad(np.ones((2, 3, 2, 3), np.float32)), ValueError, "shape"),
        BadInput("BatchNorm2d_dy_float64", _backward_bad(np.ones((2, 3, 2, 2))), TypeError, "float"),
    ]


BAD_INPUTS: List[BadInput] = BN_BAD + OPTIM_BAD + CLIP_BAD + SCHEDULER_BAD + OTHER_BAD + MODULE_BAD


def _outcome(bad: BadInput, backend: str) -> Tuple[type, str]:
    with fastbn.use_backend(backend), np.errstate(all="ignore"):
        try:
            bad.call()
        except Exception as error:  # noqa: BLE001 - the type is what we compare
            return type(error), str(error)
    return type(None), "no exception"


def test_bad_input_table_has_unique_names():
    names = [bad.name for bad in BAD_INPUTS]
    assert len(names) == len(set(names))
    assert len(BAD_INPUTS) >= 250


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=[bad.name for bad in BAD_INPUTS])
def test_both_backends_raise_the_same_documented_error(bad):
    fast_type, fast_message = _outcome(bad, "fast")
    reference_type, reference_message = _outcome(bad, "reference")
    assert fast_type is reference_type, (fast_type, fast_message, reference_type, reference_message)
    assert issubclass(fast_type, bad.error), (fast_type, fast_message)
    assert fast_message == reference_message
    assert bad.mentions.lower() in fast_message.lower(), fast_message


# section: the mixed-dtype rule across the API --------------------------------------------

BN_VECTORS = ("running_mean", "running_var", "weight", "bias")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("vector", BN_VECTORS + ("out",))
def test_batch_norm_never_mixes_float32_and_float64(backend, x_dtype, vector):
    other = np.float64 if x_dtype == np.float32 else np.float32
    x = np.ones((2, 3, 4), x_dtype)
    args = {name: (np.zeros(3, x_dtype) if name != "running_var" else np.ones(3, x_dtype)) for name in BN_VECTORS}
    kwargs = {}
    if vector == "out":
        kwargs["out"] = np.empty(x.shape, other)
    else:
        args[vector] = args[vector].astype(other)
    with fastbn.use_backend(backend):
        with pytest.raises(TypeError, match=vector):
            F.batch_norm(x, args["running_mean"], args["running_var"], args["weight"], args["bias"], **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ALL_OPTIMIZERS, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("param_dtype", [np.float32, np.float64])
def test_optimizers_never_mix_parameter_and_gradient_dtypes_and_change_nothing(backend, cls, param_dtype):
    other = np.float64 if param_dtype == np.float32 else np.float32
    params = _params(param_dtype)
    opt = cls(params)
    params[0].grad = np.ones((2, 3), param_dtype)
    params[1].grad = np.ones(4, other)
    before = [p.data.copy() for p in params]
    with fastbn.use_backend(backend):
        with pytest.raises(TypeError, match=r"\['params'\]\[1\]\.grad: expected dtype"):
            opt.step()
    for param, old in zip(params, before):
        np.testing.assert_array_equal(param.data, old)
    assert all(not state for state in opt.state.values()) or cls is optim.Adagrad


def test_checkpoint_restore_never_casts(tmp_path):
    params = _params(np.float64)
    opt = optim.Adam(params)
    for p in params:
        p.grad = np.ones_like(p.data)
    opt.step()
    fastbn.save(tmp_path / "c", {"optimizer": opt})
    with pytest.raises(TypeError, match="never casts"):
        fastbn.load_into(tmp_path / "c", {"optimizer": optim.Adam(_params(np.float32))})


def test_parameter_rejects_a_gradient_of_another_dtype():
    with pytest.raises(TypeError):
        Parameter(np.zeros(3, np.float64), grad=np.zeros(3, np.float32))


def test_parameter_keeps_a_zero_dimensional_shape():
    param = Parameter(np.float64(3.0))
    assert param.shape == ()


def _corrupt_state(value_factory, key="exp_avg"):
    def outcome(backend):
        params = [Parameter(np.ones(5))]
        opt = optim.Adam(params)
        params[0].grad = np.ones(5)
        opt.step()
        opt.state[params[0]][key] = value_factory()
        with fastbn.use_backend(backend):
            try:
                opt.step()
            except Exception as error:  # noqa: BLE001
                return type(error)
        return None
    return outcome


@pytest.mark.parametrize("value_factory,key", [
    (lambda: np.zeros(5, np.float32), "exp_avg"),
    (lambda: 1.5, "step"),
    (lambda: np.zeros((5, 1)), "exp_avg"),
], ids=["float32_state", "float_step", "2d_state"])
def test_corrupted_optimizer_state_raises_the_same_error_on_both_backends(value_factory, key):
    outcome = _corrupt_state(value_factory, key)
    fast, reference = outcome("fast"), outcome("reference")
    assert fast is not None and fast is reference
