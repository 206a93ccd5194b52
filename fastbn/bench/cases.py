"""Benchmark cases: each one builds, for the same seeded data, a callable per
contender ("fastbn", "reference", "torch") and says how many bytes the
operation must move at minimum (for GB/s)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

import fastbn
import fastbn.optim  # noqa: F401  (optimizer cases)

Contenders = Dict[str, Callable[[], object]]


@dataclass
class Case:
    name: str
    group: str                     # "batchnorm", "optimizer" or "overhead"
    description: str
    build: Callable[["BenchConfig"], Tuple[Contenders, float]]   # -> contenders, bytes moved
    per_call: bool = False         # microsecond calls: time in batches


@dataclass
class BenchConfig:
    dtype: np.dtype
    threads: int
    quick: bool
    torch: Optional[object]        # the torch module, or None
    order_seed: Optional[int] = 0  # seed of each round's contender order; None: fixed order


def _torch_dtype(config: BenchConfig):
    return config.torch.float32 if config.dtype == np.float32 else config.torch.float64


def _reference(fn: Callable[[], object]) -> Callable[[], object]:
    def call():
        with fastbn.use_backend("reference"):
            return fn()
    return call


# ---- batch norm ------------------------------------------------------------

def _out_buffer(x: np.ndarray, dy: "np.ndarray | None") -> np.ndarray:
    """The `out=` column's buffer, placed clear of x (and dy) modulo 4 KiB as
    fastbn places its own outputs (fastbn._output_cache.ALIAS_AHEAD): an
    np.empty_like made right after dy can land 16 bytes past it, where the
    kernels run 1.5-4x slower."""
    from fastbn import _output_cache
    inputs = (x.ctypes.data,) + (() if dy is None else (dy.ctypes.data,))
    return _output_cache.placed_array(x.shape, x.dtype, inputs)


def _bn_data(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    channels = shape[axis]
    x = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    x *= 2
    x += 0.5
    vectors = [rng.standard_normal(channels).astype(dtype) for _ in range(4)]
    vectors[1] = np.abs(vectors[1]) + 0.5   # running_var
    return x, vectors


def _torch_view(torch, array, axis):
    """A torch tensor over the same memory, in torch's (N, C, ...) indexing;
    channels-last arrays become channels_last-strided tensors (no copy)."""
    if array.dtype.kind == "V":  # ml_dtypes.bfloat16: torch reads its bits as int16
        tensor = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(array)
    if axis == -1 and array.ndim > 2:
        tensor = tensor.movedim(-1, 1)
    return tensor


def _bf16_activations(config: BenchConfig):
    """ml_dtypes.bfloat16 for the bfloat16 cases (float32 parameters and
    statistics, as torch's bf16 batch norm); skipped otherwise."""
    if np.dtype(config.dtype) != np.float32:
        # run_case reports NotImplementedError as a skipped case
        raise NotImplementedError(f"bfloat16 activations take float32 parameters, "
                                  f"not {np.dtype(config.dtype)}")
    try:
        import ml_dtypes
    except ImportError as error:
        raise NotImplementedError(f"bfloat16 cases need ml_dtypes ({error})") from None
    return np.dtype(ml_dtypes.bfloat16)


def _bn_case(kind: str, shape_full, shape_quick, axis: int, bf16: bool = False):
    """`bf16`: x and dy (and the outputs) in bfloat16, 2 bytes per element in
    the bytes moved; parameters and statistics in float32."""
    def build(config: BenchConfig):
        from fastbn import functional as F
        shape = shape_quick if config.quick else shape_full
        activations = _bf16_activations(config) if bf16 else None
        x, (running_mean, running_var, weight, bias) = _bn_data(shape, axis, config.dtype)
        if activations is not None:
            x = x.astype(activations)
        contenders: Contenders = {}
        nbytes = x.nbytes
        dy = None
        if kind == "eval":
            moved = 2 * nbytes

            def op(out=None):
                return F.batch_norm(x, running_mean, running_var, weight, bias, training=False,
                                    axis=axis, out=out)
        elif kind == "train":
            moved = 2 * nbytes
            rm, rv = running_mean.copy(), running_var.copy()

            def op(out=None):
                return F.batch_norm(x, rm, rv, weight, bias, training=True, axis=axis, out=out)
        else:  # backward
            moved = 3 * nbytes
            dy, _ = _bn_data(shape, axis, config.dtype, seed=1)
            if activations is not None:
                dy = dy.astype(activations)
            _, mean, invstd = F.batch_norm_forward_train(x, weight, bias, 1e-5, axis=axis)

            def op(out=None):
                return F.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis, out=out)
        # "fastbn" allocates its output like torch and the reference do;
        # "fastbn_out" reuses a buffer (out=), which skips the page faults of
        # a fresh allocation (the kernel zeroing new pages costs a full write).
        out = _out_buffer(x, dy)
        contenders["fastbn"] = op
        contenders["fastbn_out"] = lambda: op(out)
        contenders["reference"] = _reference(op)
        if activations is not None:
            # the same values in float32, in the same rounds: the bf16 rows'
            # "x fp32" is measured side by side, not against another row
            contenders["fastbn_fp32"] = _float32_twin(kind, x, dy if kind == "backward" else None,
                                                      axis, running_mean, running_var, weight,
                                                      bias)
        torch = config.torch
        if torch is not None:
            tx = _torch_view(torch, x, axis)
            t_mean, t_var = torch.from_numpy(running_mean.copy()), torch.from_numpy(running_var.copy())
            t_w, t_b = torch.from_numpy(weight), torch.from_numpy(bias)
            if kind in ("eval", "train"):
                training = kind == "train"

                def run_torch():
                    with torch.no_grad():
                        return torch.nn.functional.batch_norm(tx, t_mean, t_var, t_w, t_b,
                                                              training=training)
            else:
                tdy = _torch_view(torch, dy, axis)
                _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
                    tx, t_w, t_b, None, None, True, 0.1, 1e-5)

                def run_torch():
                    return torch.ops.aten.native_batch_norm_backward(
                        tdy, tx, t_w, None, None, save_mean, save_invstd, True, 1e-5,
                        [True, True, True])
            contenders["torch"] = run_torch
        return contenders, moved
    return build


def _float32_twin(kind: str, x, dy, axis: int, running_mean, running_var, weight, bias):
    """fastbn's allocating float32 call on float32 copies of the bfloat16
    case's arrays (the same values)."""
    from fastbn import functional as F
    x32 = x.astype(np.float32)
    if kind == "eval":
        return lambda: F.batch_norm(x32, running_mean, running_var, weight, bias,
                                    training=False, axis=axis)
    if kind == "train":
        rm, rv = running_mean.copy(), running_var.copy()
        return lambda: F.batch_norm(x32, rm, rv, weight, bias, training=True, axis=axis)
    dy32 = dy.astype(np.float32)
    _, mean, invstd = F.batch_norm_forward_train(x32, weight, bias, 1e-5, axis=axis)
    return lambda: F.batch_norm_backward(dy32, x32, mean, invstd, weight, axis=axis)


# ---- batch norm + ReLU ----------------------------------------------------------

def _bn_relu_case(kind: str, fused: bool, shape_full, shape_quick, axis: int = 1):
    """Training forward or backward of batch norm + ReLU, channels-first.
    "fastbn" is the fused kernel (fused=True) or fastbn's batch norm then
    the ReLU in NumPy (fused=False), as a user without the fused layer
    writes it; the reference and torch compute batch norm then ReLU."""
    def build(config: BenchConfig):
        from fastbn import functional as F
        shape = shape_quick if config.quick else shape_full
        x, (_mean, _var, weight, bias) = _bn_data(shape, axis, config.dtype)
        zero = x.dtype.type(0)
        dy = None
        if kind == "train":
            moved = 2 * x.nbytes

            def fused_op(out=None):
                return F.batch_norm_relu_forward_train(x, weight, bias, axis=axis, out=out)[0]

            def unfused_op(out=None):
                y = F.batch_norm_forward_train(x, weight, bias, axis=axis, out=out)[0]
                return np.maximum(y, zero, out=y)
        else:  # backward
            moved = 3 * x.nbytes
            dy, _ = _bn_data(shape, axis, config.dtype, seed=1)
            y, mean, invstd = F.batch_norm_relu_forward_train(x, weight, bias, axis=axis)

            def fused_op(out=None):
                return F.batch_norm_relu_backward(dy, x, mean, invstd, weight, bias, axis=axis,
                                                  out=out)[0]

            def unfused_op(out=None):
                return F.batch_norm_backward(np.where(y > 0, dy, zero), x, mean, invstd, weight,
                                             axis=axis, out=out)[0]
        op = fused_op if fused else unfused_op
        buffer = _out_buffer(x, dy)
        contenders: Contenders = {"fastbn": op, "fastbn_out": lambda: op(buffer),
                                  "reference": _reference(fused_op)}
        torch = config.torch
        if torch is not None:
            functional = torch.nn.functional
            tx = _torch_view(torch, x, axis)
            t_w, t_b = torch.from_numpy(weight), torch.from_numpy(bias)
            if kind == "train":
                def run_torch():
                    with torch.no_grad():
                        return functional.relu(functional.batch_norm(tx, None, None, t_w, t_b,
                                                                     training=True), inplace=True)
            else:
                tdy = _torch_view(torch, dy, axis)
                xg, wg, bg = (t.clone().requires_grad_(True) for t in (tx, t_w, t_b))
                t_y = functional.relu(functional.batch_norm(xg, None, None, wg, bg, training=True))

                def run_torch():
                    return torch.autograd.grad(t_y, (xg, wg, bg), tdy, retain_graph=True)
            contenders["torch"] = run_torch
        return contenders, moved
    return build


# ---- optimizers ------------------------------------------------------------

def resnet50_shapes() -> List[tuple]:
    """Parameter shapes of torchvision's ResNet-50 (161 tensors, 25,557,032
    parameters): conv weights, BatchNorm weight/bias, fc weight/bias."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    in_channels = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            shapes += [(width, in_channels, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (width * 4, width, 1, 1), (width * 4,), (width * 4,)]
            if block == 0:
                shapes += [(width * 4, in_channels, 1, 1), (width * 4,), (width * 4,)]
            in_channels = width * 4
    shapes += [(1000, 2048), (1000,)]
    return shapes


# bytes per parameter one step must move in float32: read+write of the param
# and each state buffer, read of the grad
OPTIMIZERS = {
    # name: (fastbn kwargs, state buffers, torch class name, torch variant kwargs)
    "Adam": (dict(lr=1e-3), 2, "Adam", dict(fused=True)),
    "AdamW": (dict(lr=1e-3), 2, "AdamW", dict(fused=True)),
    "SGD-momentum": (dict(lr=1e-2, momentum=0.9), 1, "SGD", dict(fused=True)),
    "Momentum": (dict(lr=1e-2, momentum=0.9), 1, None, None),
    "RMSprop": (dict(lr=1e-3), 1, "RMSprop", dict(foreach=True)),
    "Adagrad": (dict(lr=1e-2), 1, "Adagrad", dict(fused=True)),
    "Lion": (dict(lr=1e-4), 1, None, None),
    "NAdam": (dict(lr=2e-3), 2, "NAdam", dict(foreach=True)),
    "RAdam": (dict(lr=1e-3), 2, "RAdam", dict(foreach=True)),
    "Adadelta": (dict(lr=1.0), 2, "Adadelta", dict(foreach=True)),
    "Adamax": (dict(lr=2e-3), 2, "Adamax", dict(foreach=True)),
    # bfloat16 state (ml_dtypes): 2-byte state buffers; torch keeps float32 state
    "Adam-bf16state": (dict(lr=1e-3, state_dtype="bfloat16"), 2, "Adam", dict(fused=True)),
    # pure bfloat16: bfloat16 params, grads and state (stochastic rounding);
    # torch's peer runs bfloat16 params and grads, its state follows the params
    "Adam-bf16": (dict(lr=1e-3, state_dtype="bfloat16"), 2, "Adam", dict(fused=True)),
}
# variants whose parameters and gradients are bfloat16 whatever the run's dtype
BF16_PARAM_OPTIMIZERS = ("Adam-bf16",)


def _optimizer_case(name: str, shapes_fn: Callable[[bool], List[tuple]]):
    fast_kwargs, state_buffers, torch_name, torch_variant = OPTIMIZERS[name]
    class_name = "SGD" if name == "SGD-momentum" else name.split("-bf16")[0]
    state_itemsize = 2 if fast_kwargs.get("state_dtype") == "bfloat16" else None
    bf16_params = name in BF16_PARAM_OPTIMIZERS

    def build(config: BenchConfig):
        if state_itemsize is not None and np.dtype(config.dtype) != np.float32:
            # run_case reports NotImplementedError as a skipped case
            raise NotImplementedError(f"state_dtype='bfloat16' is for float32 parameters, "
                                      f"not {np.dtype(config.dtype)}")
        dtype = np.dtype(config.dtype)
        if bf16_params:
            from fastbn.optim._bf16 import bfloat16
            dtype = np.dtype(bfloat16())
        shapes = shapes_fn(config.quick)
        rng = np.random.default_rng(0)
        datas = [(rng.standard_normal(s, dtype=np.float32) * 0.05).astype(dtype) for s in shapes]
        grads = [(rng.standard_normal(s, dtype=np.float32) * 0.01).astype(dtype) for s in shapes]
        itemsize = dtype.itemsize
        total = sum(d.size for d in datas)
        moved = total * (itemsize * (2 + 1) + 2 * state_buffers * (state_itemsize or itemsize))

        def make_fast(kwargs=fast_kwargs, param_dtype=dtype):
            params = [fastbn.Parameter(d.astype(param_dtype), grad=g.astype(param_dtype, copy=False))
                      for d, g in zip(datas, grads)]
            return getattr(fastbn.optim, class_name)(params, **kwargs)

        fast_opt, reference_opt = make_fast(), make_fast()
        contenders: Contenders = {"fastbn": fast_opt.step, "reference": _reference(reference_opt.step)}
        if state_itemsize is not None:
            # the ratio a bfloat16 row is judged by, timed in the same rounds:
            # fastbn's float32 optimizer (float32 state) on float32 copies of
            # the same values
            float32_kwargs = {k: v for k, v in fast_kwargs.items() if k != "state_dtype"}
            contenders["fastbn_fp32"] = make_fast(float32_kwargs, np.dtype(np.float32)).step
        torch = config.torch
        if torch is not None and torch_name is not None:
            if bf16_params:   # torch.from_numpy does not take ml_dtypes arrays
                t_params = [torch.from_numpy(d.astype(np.float32)).to(torch.bfloat16) for d in datas]
                t_grads = [torch.from_numpy(g.astype(np.float32)).to(torch.bfloat16) for g in grads]
            else:
                t_params = [torch.from_numpy(d.copy()) for d in datas]
                t_grads = [torch.from_numpy(g) for g in grads]
            for p, g in zip(t_params, t_grads):
                p.requires_grad_(True)
                p.grad = g
            torch_kwargs = {k: v for k, v in fast_kwargs.items() if k != "state_dtype"}
            try:
                t_opt = getattr(torch.optim, torch_name)(t_params, **torch_kwargs, **torch_variant)
                t_opt.step()
            except (RuntimeError, TypeError):   # variant unsupported on this build
                t_opt = getattr(torch.optim, torch_name)(t_params, **torch_kwargs, foreach=True)
            contenders["torch"] = t_opt.step
        return contenders, moved
    return build


def _resnet_shapes(quick: bool) -> List[tuple]:
    return resnet50_shapes()


def _many_small_shapes(quick: bool) -> List[tuple]:
    return [(1000,)] * 1000


# ---- per-call overhead -----------------------------------------------------

def _overhead_case(training: bool):
    def build(config: BenchConfig):
        from fastbn import functional as F
        x, (running_mean, running_var, weight, bias) = _bn_data((2, 4), 1, config.dtype)
        rm, rv = running_mean.copy(), running_var.copy()

        def run():
            return F.batch_norm(x, rm, rv, weight, bias, training=training)
        contenders: Contenders = {"fastbn": run, "reference": _reference(run)}
        torch = config.torch
        if torch is not None:
            tx, tm, tv = torch.from_numpy(x), torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
            tw, tb = torch.from_numpy(weight), torch.from_numpy(bias)

            def run_torch():
                with torch.no_grad():
                    return torch.nn.functional.batch_norm(tx, tm, tv, tw, tb, training=training)
            contenders["torch"] = run_torch
        return contenders, 2 * x.nbytes
    return build


# (N, C) inputs of BatchNorm1d (MLPs, tabular models) at a spread of shapes,
# some off any power-of-two grid; and channels-last BatchNorm2d/3d at a
# spread of channel counts.  (name suffix, full shape, quick shape)
SHAPES_NC = [("64x64", (64, 64), (64, 64)), ("100x300", (100, 300), (100, 300)),
             ("256x512", (256, 512), (256, 512)), ("777x1000", (777, 1000), (777, 1000)),
             ("3000x96", (3000, 96), (3000, 96)), ("64x4096", (64, 4096), (64, 4096)),
             ("1000x300", (1000, 300), (1000, 300)), ("4096x1024", (4096, 1024), (1024, 1024)),
             ("8192x4096", (8192, 4096), (2048, 4096)), ("8192x64", (8192, 64), (8192, 64))]
SHAPES_CL = [("c16", (32, 56, 56, 16), (8, 56, 56, 16)), ("c64", (32, 56, 56, 64), (8, 56, 56, 64)),
             ("c200", (16, 28, 28, 200), (4, 28, 28, 200)),
             ("c512", (32, 14, 14, 512), (8, 14, 14, 512)),
             ("3d_c48", (4, 16, 28, 28, 48), (2, 8, 28, 28, 48))]


def _shape_cases() -> List[Case]:
    cases = []
    for suffix, full, quick in SHAPES_NC:
        for kind, label in (("train", "training forward"), ("eval", "eval forward"),
                            ("backward", "backward")):
            cases.append(Case(f"bn1d_{kind}_{suffix}", "batchnorm",
                              f"BatchNorm1d {label} {full}", _bn_case(kind, full, quick, 1)))
        for kind, label in (("train", "training forward"), ("backward", "backward")):
            cases.append(Case(f"bn1d_relu_{kind}_{suffix}", "batchnorm",
                              f"BatchNorm1d+ReLU {label}, fused {full}",
                              _bn_relu_case(kind, True, full, quick, 1)))
    for suffix, full, quick in SHAPES_CL:
        for kind, label in (("train", "training forward"), ("backward", "backward")):
            cases.append(Case(f"bn_cl_{kind}_{suffix}", "batchnorm",
                              f"BN {label} {full} channels-last", _bn_case(kind, full, quick, -1)))
    return cases


def _bf16_cases() -> List[Case]:
    """bfloat16 activations (ml_dtypes), torch's bf16 batch norm as the peer;
    the float32 rows of the same shapes are bn_train_fwd_nchw etc."""
    cases = []
    for layout, shape, quick, axis in (("nchw", (64, 128, 56, 56), (16, 128, 56, 56), 1),
                                       ("nhwc", (64, 56, 56, 128), (16, 56, 56, 128), -1)):
        label = "channels-first" if axis == 1 else "channels-last"
        for kind, name, text in (("train", "train_fwd", "training forward"),
                                 ("eval", "eval_fwd", "eval forward"),
                                 ("backward", "backward", "backward")):
            cases.append(Case(f"bn_bf16_{name}_{layout}", "batchnorm",
                              f"BN bfloat16 {text} {shape} {label}",
                              _bn_case(kind, shape, quick, axis, bf16=True)))
    return cases


def all_cases() -> List[Case]:
    return [
        Case("bn_train_fwd_nchw", "batchnorm", "BN training forward (64,128,56,56) channels-first",
             _bn_case("train", (64, 128, 56, 56), (16, 128, 56, 56), 1)),
        Case("bn_eval_fwd_nchw", "batchnorm", "BN eval forward (64,128,56,56) channels-first",
             _bn_case("eval", (64, 128, 56, 56), (16, 128, 56, 56), 1)),
        Case("bn_backward_nchw", "batchnorm", "BN backward (64,128,56,56) channels-first",
             _bn_case("backward", (64, 128, 56, 56), (16, 128, 56, 56), 1)),
        Case("bn_train_fwd_nhwc", "batchnorm", "BN training forward (32,56,56,64) channels-last",
             _bn_case("train", (32, 56, 56, 64), (8, 56, 56, 64), -1)),
        Case("bn_backward_nhwc", "batchnorm", "BN backward (32,56,56,64) channels-last",
             _bn_case("backward", (32, 56, 56, 64), (8, 56, 56, 64), -1)),
        Case("bn_train_fwd_small", "batchnorm", "BN training forward (8,256,14,14) channels-first",
             _bn_case("train", (8, 256, 14, 14), (8, 256, 14, 14), 1)),
        Case("bn_train_fwd_tiny", "batchnorm", "BN training forward (4,32,8,8) channels-first",
             _bn_case("train", (4, 32, 8, 8), (4, 32, 8, 8), 1)),
        Case("bn_relu_train_fwd_nchw", "batchnorm",
             "BN+ReLU training forward, fused (64,128,56,56) channels-first",
             _bn_relu_case("train", True, (64, 128, 56, 56), (16, 128, 56, 56))),
        Case("bn_then_relu_train_fwd_nchw", "batchnorm",
             "BN then ReLU (NumPy) training forward (64,128,56,56) channels-first",
             _bn_relu_case("train", False, (64, 128, 56, 56), (16, 128, 56, 56))),
        Case("bn_relu_backward_nchw", "batchnorm",
             "BN+ReLU backward, fused (64,128,56,56) channels-first",
             _bn_relu_case("backward", True, (64, 128, 56, 56), (16, 128, 56, 56))),
        Case("bn_then_relu_backward_nchw", "batchnorm",
             "ReLU (NumPy) then BN backward (64,128,56,56) channels-first",
             _bn_relu_case("backward", False, (64, 128, 56, 56), (16, 128, 56, 56))),
        Case("overhead_eval_2x4", "overhead", "per-call: BN eval forward on (2,4)",
             _overhead_case(False), per_call=True),
        Case("overhead_train_2x4", "overhead", "per-call: BN training forward on (2,4)",
             _overhead_case(True), per_call=True),
    ] + _bf16_cases() + _shape_cases() + [
        Case(f"optim_{name.lower()}_resnet50", "optimizer",
             f"{name} step, ResNet-50 parameters (161 tensors, 25.6M)",
             _optimizer_case(name, _resnet_shapes))
        for name in OPTIMIZERS
    ] + [
        Case("optim_adam_1000x1000", "optimizer", "Adam step, 1000 tensors x 1000 parameters",
             _optimizer_case("Adam", _many_small_shapes)),
    ]
