"""fastbn.torch against torch itself: the BatchNorm modules (outputs,
gradients of x/weight/bias, running statistics, num_batches_tracked) over
ranks, memory formats, dtypes and options; the fallback to torch; the custom
ops under opcheck, gradcheck, torch.compile and torch.export."""
import copy

import pytest

torch = pytest.importorskip("torch")

import fastbn  # noqa: E402
import fastbn.torch as ft  # noqa: E402
from fastbn.torch import _ops  # noqa: E402

nn = torch.nn

TORCH_CLASS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
FAST_CLASS = {1: ft.BatchNorm1d, 2: ft.BatchNorm2d, 3: ft.BatchNorm3d}
FUSED_CLASS = {1: ft.BatchNormReLU1d, 2: ft.BatchNormReLU2d, 3: ft.BatchNormReLU3d}
# rank -> (module dimension, odd shape)
SHAPES = {2: (1, (7, 5)), 3: (1, (3, 5, 7)), 4: (2, (3, 5, 7, 9)), 5: (3, (2, 5, 3, 7, 3))}
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-11)}


def channels_last(x):
    """The same values stored with the channel dimension innermost."""
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


def random_input(shape, dtype, memory_format, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=dtype) * 3 + 1
    return channels_last(x) if memory_format == "channels_last" else x


def module_pair(dim, fast_class=None, dtype=torch.float32, **options):
    """A torch BatchNorm and a fastbn one with the same random state."""
    theirs = TORCH_CLASS[dim](5, dtype=dtype, **options)
    ours = (fast_class or FAST_CLASS[dim])(5, dtype=dtype, **options)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in (theirs.weight, theirs.bias):
            if tensor is not None:
                tensor.copy_(torch.rand(5, generator=generator, dtype=dtype) + 0.5)
        if theirs.running_var is not None:
            theirs.running_mean.copy_(torch.randn(5, generator=generator, dtype=dtype))
            theirs.running_var.copy_(torch.rand(5, generator=generator, dtype=dtype) + 0.5)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def assert_close(ours, theirs, dtype):
    torch.testing.assert_close(ours, theirs, **TOLERANCE[dtype])


def assert_same_state(ours, theirs, dtype):
    for key, value in theirs.state_dict().items():
        if key == "num_batches_tracked":
            assert torch.equal(ours.state_dict()[key], value)
        else:
            assert_close(ours.state_dict()[key], value, dtype)


def step_and_compare(ours, theirs, x, dtype, relu=False, seed=0):
    """One forward + backward of both modules; compares y, dx, dweight,
    dbias and the buffers afterwards."""
    x_ours = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    x_theirs = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    y_ours = ours(x_ours)
    y_theirs = theirs(x_theirs)
    if relu:
        y_theirs = torch.relu(y_theirs)
    assert_close(y_ours, y_theirs, dtype)
    if x.dim() != 3:  # torch returns (N, C, L) contiguous; fastbn keeps the (N, L, C) storage
        assert y_ours.stride() == y_theirs.stride()
    generator = torch.Generator().manual_seed(seed + 100)
    dy = torch.randn(y_theirs.shape, generator=generator, dtype=dtype)
    y_ours.backward(dy)
    y_theirs.backward(dy)
    assert_close(x_ours.grad, x_theirs.grad, dtype)
    for name in ("weight", "bias"):
        if getattr(theirs, name) is not None:
            assert_close(getattr(ours, name).grad, getattr(theirs, name).grad, dtype)
            getattr(ours, name).grad = None
            getattr(theirs, name).grad = None
    assert_same_state(ours, theirs, dtype)
    return y_ours


def fastbn_op_name(y):
    return type(y.grad_fn).__name__


# section: modules are torch's modules ------------------------------------------------


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_modules_are_instances_of_torch_batchnorm_with_the_same_state_dict_keys(dim):
    ours, theirs = module_pair(dim)
    fused = FUSED_CLASS[dim](5)
    assert isinstance(ours, TORCH_CLASS[dim]) and isinstance(fused, TORCH_CLASS[dim])
    assert list(ours.state_dict()) == list(theirs.state_dict()) == list(fused.state_dict())
    assert [name for name, _ in ours.named_parameters()] == ["weight", "bias"]


def test_state_dict_loads_both_ways_between_torch_and_fastbn():
    ours, theirs = module_pair(2)
    for _ in range(2):
        ours(torch.randn(4, 5, 3, 3))
    fresh_torch = nn.BatchNorm2d(5)
    fresh_torch.load_state_dict(ours.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(fresh_torch.state_dict()[key], value)
    fresh_ours = ft.BatchNorm2d(5)
    fresh_ours.load_state_dict(fresh_torch.state_dict())
    for key, value in fresh_torch.state_dict().items():
        assert torch.equal(fresh_ours.state_dict()[key], value)


def test_constructor_accepts_device_and_dtype_like_torch():
    layer = ft.BatchNorm3d(4, eps=1e-3, momentum=0.2, affine=True, track_running_stats=True,
                           device="cpu", dtype=torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.running_var.dtype == torch.float64
    assert (layer.eps, layer.momentum) == (1e-3, 0.2)


# section: fast path against torch ----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_training_steps_then_eval_match_torch(rank, memory_format, dtype):
    if rank == 2 and memory_format == "channels_last":
        pytest.skip("a 2-D input has one layout")
    dim, shape = SHAPES[rank]
    ours, theirs = module_pair(dim, dtype=dtype)
    for step in range(3):
        x = random_input(shape, dtype, memory_format, seed=step)
        y = step_and_compare(ours, theirs, x, dtype, seed=step)
        assert "fastbn_batch_norm_train" in fastbn_op_name(y)
    ours.eval()
    theirs.eval()
    y = step_and_compare(ours, theirs, random_input(shape, dtype, memory_format, seed=9), dtype)
    assert "fastbn_batch_norm_eval" in fastbn_op_name(y)
    assert int(ours.num_batches_tracked) == 3
    ours.train()
    theirs.train()
    step_and_compare(ours, theirs, random_input(shape, dtype, memory_format, seed=10), dtype)
    assert int(ours.num_batches_tracked) == 4


@pytest.mark.parametrize("options", [dict(momentum=None), dict(track_running_stats=False),
                                     dict(affine=False), dict(affine=False, momentum=None),
                                     dict(momentum=1.0, eps=1e-3)],
                         ids=["momentum_none", "no_running_stats", "no_affine",
                              "no_affine_momentum_none", "momentum_one"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_options_match_torch_in_train_and_eval(options, dtype):
    ours, theirs = module_pair(2, dtype=dtype, **options)
    for step in range(3):
        step_and_compare(ours, theirs, random_input((4, 5, 3, 6), dtype, "contiguous", step),
                         dtype, seed=step)
    ours.eval()
    theirs.eval()
    step_and_compare(ours, theirs, random_input((4, 5, 3, 6), dtype, "channels_last", 7), dtype)


def test_cumulative_average_first_batch_replaces_initial_statistics():
    ours, _ = module_pair(1, momentum=None)
    x = torch.randn(6, 5, dtype=torch.float32)
    ours(x)
    torch.testing.assert_close(ours.running_mean, x.mean(0))
    torch.testing.assert_close(ours.running_var, x.var(0, unbiased=True))


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_fused_batchnorm_relu_matches_torch_batchnorm_then_relu(dim, memory_format):
    shape = SHAPES[dim + 2][1]
    ours, theirs = module_pair(dim, fast_class=FUSED_CLASS[dim])
    for step in range(2):
        x = random_input(shape, torch.float32, memory_format, seed=step)
        step_and_compare(ours, theirs, x, torch.float32, relu=True, seed=step)
    ours.eval()
    theirs.eval()
    x = random_input(shape, torch.float32, memory_format, seed=5)
    step_and_compare(ours, theirs, x, torch.float32, relu=True)


def test_single_value_per_channel_raises_like_torch():
    ours, theirs = module_pair(1)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        theirs(torch.randn(1, 5))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ours(torch.randn(1, 5))


def test_broadcast_gradient_from_sum_is_accepted():
    ours, theirs = module_pair(2)
    x = torch.randn(3, 5, 4, 4, requires_grad=True)
    x_theirs = x.detach().clone().requires_grad_()
    ours(x).sum().backward()  # dy is an expanded (stride 0) tensor
    theirs(x_theirs).sum().backward()
    assert_close(x.grad, x_theirs.grad, torch.float32)
    assert_close(ours.weight.grad, theirs.weight.grad, torch.float32)


# section: fallback to torch ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_falls_back_to_torch(dtype):
    ours, theirs = module_pair(2, dtype=dtype)
    x = torch.randn(4, 5, 3, 3).to(dtype)
    y_ours, y_theirs = ours(x), theirs(x)
    assert torch.equal(y_ours, y_theirs)
    assert_same_state(ours, theirs, torch.float32)


def test_non_contiguous_input_falls_back_to_torch_with_the_same_results():
    ours, theirs = module_pair(2)
    base = torch.randn(4, 5, 6, 8)
    x_ours = base.clone().requires_grad_()
    x_theirs = base.clone().requires_grad_()
    assert _ops.channel_axis(x_ours[:, :, ::2, 1::2]) == 0
    y_ours, y_theirs = ours(x_ours[:, :, ::2, 1::2]), theirs(x_theirs[:, :, ::2, 1::2])
    assert "fastbn" not in fastbn_op_name(y_ours)
    assert torch.equal(y_ours, y_theirs)
    dy = torch.randn(y_theirs.shape)
    y_ours.backward(dy)
    y_theirs.backward(dy)
    assert torch.equal(x_ours.grad, x_theirs.grad)
    assert_same_state(ours, theirs, torch.float32)


def test_mismatched_dtypes_raise_torchs_own_error():
    ours, theirs = module_pair(2)
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError) as torch_error:
        theirs(x)
    with pytest.raises(RuntimeError) as our_error:
        ours(x)
    assert str(our_error.value) == str(torch_error.value)


def test_fallback_emits_no_warning():
    ours, _ = module_pair(2, dtype=torch.bfloat16)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            ours(torch.randn(4, 5, 3, 3).to(torch.bfloat16))


# section: custom ops -----------------------------------------------------------------


def _op_arguments(dtype=torch.float64, memory_format="contiguous", requires_grad=False):
    generator = torch.Generator().manual_seed(3)
    x = random_input((3, 2, 2, 2), dtype, memory_format).requires_grad_(requires_grad)
    weight = (torch.rand(2, generator=generator, dtype=dtype) + 0.5).requires_grad_(requires_grad)
    bias = torch.randn(2, generator=generator, dtype=dtype).requires_grad_(requires_grad)
    running_mean = torch.randn(2, generator=generator, dtype=dtype)
    running_var = torch.rand(2, generator=generator, dtype=dtype) + 0.5
    return x, weight, bias, running_mean, running_var


@pytest.mark.parametrize("relu", [False, True])
def test_custom_ops_pass_torch_library_opcheck(relu):
    x, weight, bias, running_mean, running_var = _op_arguments(requires_grad=True)
    torch.library.opcheck(torch.ops.fastbn.batch_norm_train.default,
                          (x, weight, bias, running_mean, running_var, 0.1, None, 1e-5, relu))
    torch.library.opcheck(torch.ops.fastbn.batch_norm_eval.default,
                          (x, running_mean, running_var, weight, bias, 1e-5, relu))
    dy = torch.randn_like(x)
    _, mean, invstd, _, _ = torch.ops.fastbn.batch_norm_train(x, weight, bias, None, None, 0.1,
                                                              None, 1e-5, relu)
    torch.library.opcheck(torch.ops.fastbn.batch_norm_backward.default,
                          (dy, x, mean, invstd, weight, bias, 1e-5, relu))
    torch.library.opcheck(torch.ops.fastbn.batch_norm_backward_eval.default,
                          (dy, x, running_mean, running_var, weight, bias, 1e-5, relu))


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("relu", [False, True])
def test_gradcheck_passes_in_float64_and_gradgradcheck_with_relu(relu, memory_format):
    x, weight, bias, running_mean, running_var = _op_arguments(
        memory_format=memory_format, requires_grad=True)

    def train(x, weight, bias):
        return torch.ops.fastbn.batch_norm_train(x, weight, bias, None, None, 0.1, None, 1e-5,
                                                 relu)[0]

    def evaluate(x, weight, bias):
        return torch.ops.fastbn.batch_norm_eval(x, running_mean, running_var, weight, bias,
                                                1e-5, relu)

    for function in (train, evaluate):
        assert torch.autograd.gradcheck(function, (x, weight, bias))
        if relu and memory_format == "channels_last":  # the slowest check: one variant
            assert torch.autograd.gradgradcheck(function, (x, weight, bias))


def test_train_op_leaves_its_running_statistics_inputs_unchanged():
    x, weight, bias, running_mean, running_var = _op_arguments()
    before = running_mean.clone(), running_var.clone()
    _, _, _, new_mean, new_var = torch.ops.fastbn.batch_norm_train(
        x, weight, bias, running_mean, running_var, 0.5, None, 1e-5, False)
    assert torch.equal(running_mean, before[0]) and torch.equal(running_var, before[1])
    torch.testing.assert_close(new_mean, 0.5 * before[0] + 0.5 * x.mean((0, 2, 3)))
    torch.testing.assert_close(new_var, 0.5 * before[1] + 0.5 * x.var((0, 2, 3), unbiased=True))


def test_op_outputs_keep_the_channels_last_memory_format():
    x, weight, bias, running_mean, running_var = _op_arguments(memory_format="channels_last")
    y = torch.ops.fastbn.batch_norm_eval(x, running_mean, running_var, weight, bias, 1e-5, False)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()


def small_mlp(batchnorm_class):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), batchnorm_class(8), nn.ReLU(), nn.Linear(8, 3))


def test_torch_compile_fullgraph_matches_eager_and_updates_buffers():
    # aot_eager exercises the fake kernels and the autograd registration
    # (AOTAutograd) without inductor's C++ compile (30-60 s here; the
    # slow-marked tests/test_torch_compile_inductor.py runs inductor).
    eager_model = small_mlp(ft.BatchNorm1d)
    compiled_model = copy.deepcopy(eager_model)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    for step in range(2):
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(step))
        y_eager, y_compiled = eager_model(x), compiled(x)
        torch.testing.assert_close(y_compiled, y_eager)
        y_eager.square().sum().backward()
        y_compiled.square().sum().backward()
    for (name, p_eager), p_compiled in zip(eager_model.named_parameters(),
                                           compiled_model.parameters()):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, msg=name)
    for key, value in eager_model.state_dict().items():
        torch.testing.assert_close(compiled_model.state_dict()[key], value)
    assert int(compiled_model[1].num_batches_tracked) == 2


@pytest.mark.parametrize("training", [False, True])
def test_torch_export_captures_the_ops_and_buffer_updates(training):
    model = small_mlp(lambda c: ft.BatchNorm1d(c, momentum=None)).train(training)
    x = torch.randn(5, 6)
    exported = torch.export.export(copy.deepcopy(model), (x,)).run_decompositions({})
    op = "fastbn.batch_norm_train" if training else "fastbn.batch_norm_eval"
    assert op in exported.graph_module.code
    mutated = set(exported.graph_signature.buffers_to_mutate.values())
    expected = {"1.running_mean", "1.running_var", "1.num_batches_tracked"} if training else set()
    assert mutated == expected
    replayed = exported.module()
    torch.testing.assert_close(replayed(x), model(x))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(replayed.state_dict()[key], value)


# section: convert --------------------------------------------------------------------


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 4))


@pytest.mark.parametrize("fuse_relu", [False, True])
def test_convert_keeps_modules_parameters_and_buffers_identical(fuse_relu):
    model = small_cnn()
    tensors = {name: tensor for name, tensor in model.state_dict(keep_vars=True).items()}
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert ft.convert(model, fuse_relu=fuse_relu) is model
    for name, tensor in model.state_dict(keep_vars=True).items():
        assert tensor is tensors[name], name
    assert list(model.state_dict(keep_vars=True)) == list(tensors)
    assert [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] \
        == batchnorms
    expected = ([ft.BatchNormReLU2d, ft.BatchNormReLU2d, ft.BatchNormReLU1d] if fuse_relu
                else [ft.BatchNorm2d, ft.BatchNorm2d, ft.BatchNorm1d])
    assert [type(m) for m in batchnorms] == expected
    relus = sum(isinstance(m, nn.ReLU) for m in model.modules())
    assert relus == (0 if fuse_relu else 3)


def test_convert_leaves_batchnorm_subclasses_and_unfollowed_layers_alone():
    class MyBatchNorm(nn.BatchNorm2d):
        pass

    model = nn.Sequential(MyBatchNorm(4), nn.ReLU(), nn.BatchNorm2d(4), nn.Tanh())
    ft.convert(model, fuse_relu=True)
    assert type(model[0]) is MyBatchNorm and type(model[1]) is nn.ReLU
    assert type(model[2]) is ft.BatchNorm2d and type(model[3]) is nn.Tanh


def test_convert_rejects_a_non_module():
    with pytest.raises(TypeError, match="module: expected a torch.nn.Module, got list"):
        ft.convert([nn.BatchNorm2d(3)])


@pytest.mark.parametrize("fuse_relu", [False, True])
def test_converted_cnn_trains_with_the_same_losses_as_torch(fuse_relu):
    reference, converted = small_cnn(), small_cnn()
    ft.convert(converted, fuse_relu=fuse_relu)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
                  for m in (reference, converted)]
    generator = torch.Generator().manual_seed(7)
    losses = {id(reference): [], id(converted): []}
    for step in range(20):
        x = torch.randn(8, 3, 9, 9, generator=generator)
        target = torch.randint(0, 4, (8,), generator=generator)
        for model, optimizer in zip((reference, converted), optimizers):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), target)
            loss.backward()
            optimizer.step()
            losses[id(model)].append(loss.item())
    torch.testing.assert_close(losses[id(converted)], losses[id(reference)], rtol=1e-4, atol=0)


def test_optimizer_built_before_convert_still_trains_the_model():
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ft.convert(model)
    weight_before = model[1].weight.detach().clone()
    loss = model(torch.randn(4, 3, 5, 5)).square().mean()
    loss.backward()
    optimizer.step()
    assert not torch.equal(model[1].weight, weight_before)


# section: threads --------------------------------------------------------------------


def test_fastbn_threads_follow_torch_unless_set_explicitly():
    previous = torch.get_num_threads()
    layer = ft.BatchNorm2d(5)
    x = torch.randn(2, 5, 3, 3)
    try:
        fastbn.set_num_threads(None)
        torch.set_num_threads(1)
        layer(x)
        assert fastbn.get_num_threads() == 1
        assert fastbn.get_user_num_threads() is None  # following torch is not a user choice
        fastbn.set_num_threads(2)
        torch.set_num_threads(1)
        layer(x)
        assert fastbn.get_user_num_threads() == 2
        assert fastbn._core.get_user_threads() == 2  # the limit in force, not torch's 1
        fastbn.set_num_threads(None)  # back to following torch at the next op
        # (with one shared OpenMP runtime, resetting fastbn also reset torch's count)
        torch.set_num_threads(1)
        layer(x)
        assert fastbn._core.get_user_threads() == 1
        assert fastbn.get_user_num_threads() is None
    finally:
        fastbn.set_num_threads(None)
        torch.set_num_threads(previous)


# section: packaging ------------------------------------------------------------------


def test_importing_fastbn_does_not_import_torch(tmp_path):
    import os
    import subprocess
    import sys
    code = "import sys, fastbn, fastbn.nn, fastbn.optim; print('torch' in sys.modules)"
    # from a neutral folder, with the package this test imported first on the
    # path, so an uncompiled source checkout never shadows it
    package_root = os.path.dirname(os.path.dirname(fastbn.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=str(tmp_path), env=env)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("training", [False, True])
def test_inference_mode_and_no_grad_take_the_fast_path(training):
    ours, theirs = module_pair(2)
    ours.train(training)
    theirs.train(training)
    x = torch.randn(4, 5, 3, 3)
    with torch.inference_mode():
        assert_close(ours(x), theirs(x), torch.float32)
    with torch.no_grad():
        assert_close(ours(x), theirs(x), torch.float32)
    assert_same_state(ours, theirs, torch.float32)


def test_double_backward_through_a_module_matches_torch():
    ours, theirs = module_pair(2, dtype=torch.float64)
    x = torch.randn(3, 5, 2, 2, dtype=torch.float64)
    penalties = []
    for module in (ours, theirs):
        x_leaf = x.clone().requires_grad_()
        y = module(x_leaf)
        (grad_x,) = torch.autograd.grad(y.pow(3).sum(), x_leaf, create_graph=True)
        grad_x.square().sum().backward()
        penalties.append((x_leaf.grad, module.weight.grad))
    assert_close(penalties[0][0], penalties[1][0], torch.float64)
    assert_close(penalties[0][1], penalties[1][1], torch.float64)
