"""fastbn.torch's eager fast path (plain torch.autograd.Function classes that
update the running buffers in place) against the custom-op path it stands
in for: bit-identical outputs, gradients and buffers; the custom ops still
run whenever something other than plain eager autograd looks at the call."""
import pytest

torch = pytest.importorskip("torch")

import fastbn.torch as ft  # noqa: E402
from fastbn.torch import batchnorm  # noqa: E402

CLASSES = {(2, False): ft.BatchNorm2d, (2, True): ft.BatchNormReLU2d,
           (1, False): ft.BatchNorm1d, (1, True): ft.BatchNormReLU1d}
SHAPES = {2: (3, 5, 6, 7), 1: (6, 5, 7)}
EAGER = "EagerFor_fastbn_batch_norm_"
CUSTOM_OP = "GeneratedBackwardFor_fastbn_batch_norm_"


def make_input(dim, dtype, layout, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPES[dim], generator=generator, dtype=dtype) * 2 + 0.5
    if layout == "channels_last":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    return x


def module_twins(dim, relu, dtype, **options):
    """Two modules with the same random parameters and buffers."""
    first = CLASSES[dim, relu](5, dtype=dtype, **options)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for tensor in (first.weight, first.bias):
            if tensor is not None:
                tensor.copy_(torch.rand(5, generator=generator, dtype=dtype) + 0.5)
        if first.running_mean is not None:
            first.running_mean.copy_(torch.randn(5, generator=generator, dtype=dtype))
            first.running_var.copy_(torch.rand(5, generator=generator, dtype=dtype) + 0.5)
    second = CLASSES[dim, relu](5, dtype=dtype, **options)
    second.load_state_dict(first.state_dict())
    return first, second


def run_step(module, x, dy, eager, monkeypatch):
    """One forward + backward; returns (y, dx, dweight, dbias, grad_fn name)."""
    monkeypatch.setattr(batchnorm, "_EAGER_FAST_PATH", eager)
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(dy)
    grads = [None if p is None else p.grad for p in (module.weight, module.bias)]
    return y.detach(), x.grad, *grads, type(y.grad_fn).__name__


def assert_identical(a, b):
    if a is None or b is None:
        assert a is None and b is None
    else:
        assert a.dtype == b.dtype and a.stride() == b.stride()
        assert torch.equal(a, b)


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("options", [{}, dict(momentum=None), dict(track_running_stats=False),
                                     dict(affine=False)], ids=["default", "cumulative",
                                                               "no_running_stats", "no_affine"])
def test_eager_path_is_bit_identical_to_the_custom_op_path(dim, layout, dtype, relu, options,
                                                           monkeypatch):
    eager_module, op_module = module_twins(dim, relu, dtype, **options)
    modes = ["train", "train", "train", "eval", "train", "eval"]
    for step, mode in enumerate(modes):
        for module in (eager_module, op_module):
            module.train(mode == "train")
        x = make_input(dim, dtype, layout, seed=step)
        dy = make_input(dim, dtype, "contiguous", seed=100 + step)
        eager = run_step(eager_module, x, dy, True, monkeypatch)
        custom = run_step(op_module, x, dy, False, monkeypatch)
        kind = "train" if mode == "train" or not options.get("track_running_stats", True) \
            else "eval"
        assert eager[-1] == f"{EAGER}{kind}Backward"
        assert custom[-1] == f"{CUSTOM_OP}{kind}_defaultBackward"
        for ours, theirs in zip(eager[:-1], custom[:-1]):
            assert_identical(ours, theirs)
        for name, buffer in op_module.named_buffers():
            assert torch.equal(dict(eager_module.named_buffers())[name], buffer), name


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_eager_double_backward_equals_the_custom_op_path(relu, training, monkeypatch):
    results = []
    for eager in (True, False):
        module = module_twins(2, relu, torch.float64)[0].train(training)
        monkeypatch.setattr(batchnorm, "_EAGER_FAST_PATH", eager)
        x = make_input(2, torch.float64, "contiguous", seed=1).requires_grad_()
        y = module(x)
        (dx,) = torch.autograd.grad((y * y.detach().sin()).sum(), x, create_graph=True)
        (ddx,) = torch.autograd.grad(dx.pow(2).sum(), x)
        results.append((dx.detach(), ddx))
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)


def test_forward_without_grad_runs_the_kernels_and_updates_the_buffers(monkeypatch):
    eager_module, op_module = module_twins(2, False, torch.float32)
    x = make_input(2, torch.float32, "channels_last", seed=4)
    with torch.no_grad():
        y_eager = eager_module(x)
        monkeypatch.setattr(batchnorm, "_EAGER_FAST_PATH", False)
        y_op = op_module(x)
    assert y_eager.grad_fn is None
    assert_identical(y_eager, y_op)
    for (name, ours), theirs in zip(eager_module.named_buffers(), op_module.buffers()):
        assert torch.equal(ours, theirs), name
    assert int(eager_module.num_batches_tracked) == 1


def test_failing_training_forward_changes_no_state():
    module = ft.BatchNorm1d(4, momentum=None)
    before = {name: t.clone() for name, t in module.state_dict().items()}
    with pytest.raises(ValueError):
        module(torch.randn(1, 4))  # one value per channel
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def _module_with_shared_stats(how):
    module = ft.BatchNorm2d(5)  # make_input's channels
    if how == "same tensor":
        module.running_var = module.running_mean
    else:  # overlapping views of one buffer
        storage = torch.ones(8)
        module.running_mean, module.running_var = storage[:5], storage[3:]
    return module


def _refusal(module, x, eager, monkeypatch):
    """The error message of a training forward, and whether any state moved."""
    monkeypatch.setattr(batchnorm, "_EAGER_FAST_PATH", eager)
    before = {name: t.clone() for name, t in module.state_dict().items()}
    with pytest.raises(ValueError) as error:
        module(x)
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    return str(error.value)


@pytest.mark.parametrize("how", ["same tensor", "overlapping views"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_running_stats_sharing_memory_are_refused_alike_on_both_paths(how, requires_grad,
                                                                     monkeypatch):
    x = make_input(2, torch.float32, "contiguous", seed=0).requires_grad_(requires_grad)
    messages = [_refusal(_module_with_shared_stats(how), x, eager, monkeypatch)
                for eager in (True, False)]
    assert messages[0] == messages[1]
    assert "running_mean" in messages[0] and "running_var" in messages[0]


def test_train_op_refuses_running_stats_sharing_memory_with_the_eager_message(monkeypatch):
    """Called directly (as a compiled graph or a dispatch mode calls it), the
    op raises the eager path's error instead of updating a clone."""
    x = make_input(2, torch.float32, "contiguous", seed=1)
    message = _refusal(_module_with_shared_stats("same tensor"), x, True, monkeypatch)
    stats = torch.zeros(5)
    with pytest.raises(ValueError) as error:
        torch.ops.fastbn.batch_norm_train(x, None, None, stats, stats, 0.1, None, 1e-5, False)
    assert str(error.value) == message
    assert torch.equal(stats, torch.zeros(5))
    with pytest.raises(ValueError, match="running_var.*input"):
        torch.ops.fastbn.batch_norm_train(x, None, None, torch.zeros(5),
                                          x.view(-1)[:5], 0.1, None, 1e-5, False)


def test_running_stats_apart_in_eval_are_not_checked(monkeypatch):
    """Nothing is updated in eval, so shared statistics are only read."""
    x = make_input(2, torch.float32, "contiguous", seed=2)
    for eager in (True, False):
        monkeypatch.setattr(batchnorm, "_EAGER_FAST_PATH", eager)
        module = _module_with_shared_stats("same tensor").eval()
        expected = torch.nn.functional.batch_norm(x, module.running_mean, module.running_var,
                                                  module.weight, module.bias)
        torch.testing.assert_close(module(x), expected)


@pytest.mark.parametrize("eager", [True, False])
def test_autograd_grad_of_the_parameters_leaves_their_grad_untouched(eager, monkeypatch):
    """The parameter gradients are returned to autograd, not written into
    .grad: torch.autograd.grad must return them and change no .grad."""
    monkeypatch.setattr(batchnorm, "_EAGER_FAST_PATH", eager)
    module = ft.BatchNorm2d(5)
    reference = torch.nn.BatchNorm2d(5)
    x = make_input(2, torch.float32, "contiguous", seed=5).requires_grad_()
    dy = make_input(2, torch.float32, "contiguous", seed=6)
    module.weight.grad = torch.full((5,), 3.0)
    grads = torch.autograd.grad(module(x), [x, module.weight, module.bias], dy)
    expected = torch.autograd.grad(reference(x), [x, reference.weight, reference.bias], dy)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(module.weight.grad, torch.full((5,), 3.0))
    assert module.bias.grad is None


@pytest.mark.parametrize("eager", [True, False])
def test_parameter_hooks_see_the_gradient_and_grad_accumulates(eager, monkeypatch):
    monkeypatch.setattr(batchnorm, "_EAGER_FAST_PATH", eager)
    module = ft.BatchNorm2d(5)
    x = make_input(2, torch.float32, "contiguous", seed=7).requires_grad_()
    dy = make_input(2, torch.float32, "contiguous", seed=8)
    seen, accumulated = [], []
    module.weight.register_hook(lambda grad: seen.append(grad.clone()))
    module.bias.register_post_accumulate_grad_hook(
        lambda parameter: accumulated.append(parameter.grad.clone()))
    module(x).backward(dy)
    first_weight, first_bias = module.weight.grad.clone(), module.bias.grad.clone()
    module(x).backward(dy)
    assert len(seen) == 2 and len(accumulated) == 2
    torch.testing.assert_close(seen[0], first_weight)
    torch.testing.assert_close(accumulated[1], 2 * first_bias)
    torch.testing.assert_close(module.weight.grad, 2 * first_weight)
    torch.testing.assert_close(module.bias.grad, 2 * first_bias)


def test_running_stats_updated_after_an_eval_forward_invalidate_its_backward():
    """As with torch's BatchNorm: the eval backward reads the running
    statistics it saved; updating them in place first must raise, not give
    gradients of other statistics."""
    module = ft.BatchNorm2d(5)
    x = make_input(2, torch.float32, "contiguous", seed=0).requires_grad_()
    y = module.eval()(x)
    module.train()(x.detach())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_a_dispatch_mode_sees_the_custom_ops():
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    module = ft.BatchNorm2d(5)
    x = make_input(2, torch.float32, "contiguous", seed=0).requires_grad_()
    with RecordOps() as mode:
        module(x).sum().backward()
    assert any("fastbn.batch_norm_train" in name for name in mode.names)
    assert any("fastbn.batch_norm_backward" in name for name in mode.names)


def test_vmap_over_a_batch_of_inputs_uses_the_custom_op_path():
    """functorch transforms take the custom ops (which vmap can run by
    looping); eval mode, so no buffer is mutated under the transform."""
    module = ft.BatchNorm1d(5).eval()
    xs = torch.randn(3, 4, 5)
    expected = torch.stack([torch.nn.functional.batch_norm(
        x, module.running_mean, module.running_var, module.weight, module.bias) for x in xs])
    try:
        got = torch.func.vmap(module)(xs)
    except (RuntimeError, NotImplementedError) as error:  # custom op without a vmap rule
        pytest.skip(f"vmap of the custom op unsupported here: {error}")
    torch.testing.assert_close(got, expected)


def test_parametrized_weight_is_read_through_its_parametrization():
    """A parametrized weight is no longer in the module's parameter dict;
    the fast path must read the parametrized value, as torch does."""
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, weight):
            return 2 * weight

    ours, theirs = ft.BatchNorm2d(5), torch.nn.BatchNorm2d(5)
    for module in (ours, theirs):
        parametrize.register_parametrization(module, "weight", Double())
    x = make_input(2, torch.float32, "contiguous", seed=2)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
    assert type(y_ours.grad_fn).__name__ == f"{EAGER}trainBackward"
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    y_ours.sum().backward()
    y_theirs.sum().backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.parametrizations.weight.original.grad,
                               theirs.parametrizations.weight.original.grad,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_eager_path_passes_gradcheck_and_gradgradcheck(relu, training, layout):
    # no running statistics in training: gradcheck calls the module many times
    module = CLASSES[2, relu](3, dtype=torch.float64, track_running_stats=not training)
    module.train(training)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.5, 0.5)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 3, 2, generator=generator, dtype=torch.float64)
    if layout == "channels_last":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    x.requires_grad_()
    assert type(module(x).grad_fn).__name__.startswith(EAGER)
    assert torch.autograd.gradcheck(module, (x,))
    assert torch.autograd.gradgradcheck(module, (x,))
