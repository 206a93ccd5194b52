"""`fastbn.nn.Module`: registration, traversal, train/eval, state_dict and
load_state_dict validation."""
import numpy as np
import pytest

import fastbn
from fastbn import Parameter
from fastbn.nn import BatchNorm1d, IncompatibleKeys, Module


class Scale(Module):
    """y = x * weight (per feature), a minimal layer for the tests."""

    def __init__(self, features, with_buffer=True):
        super().__init__()
        self.weight = Parameter(np.ones(features, np.float32))
        self.register_buffer("calls", np.zeros((), np.int64) if with_buffer else None)

    def forward(self, x):
        self.calls[...] += 1
        return x * self.weight.data


class Net(Module):
    def __init__(self):
        super().__init__()
        self.first = Scale(3)
        self.norm = BatchNorm1d(3)
        self.head = Parameter(np.zeros(2, np.float32))


def test_assigning_parameters_and_modules_registers_them():
    net = Net()
    assert list(net._parameters) == ["head"]
    assert list(net._modules) == ["first", "norm"]
    assert [name for name, _ in net.named_parameters()] == [
        "head", "first.weight", "norm.weight", "norm.bias"]
    assert [p for p in net.parameters()] == [net.head, net.first.weight, net.norm.weight,
                                             net.norm.bias]
    assert [name for name, _ in net.named_buffers()] == [
        "first.calls", "norm.running_mean", "norm.running_var", "norm.num_batches_tracked"]
    assert [name for name, _ in net.named_modules()] == ["", "first", "norm"]
    assert list(net.children()) == [net.first, net.norm]


def test_named_parameters_without_recursion_and_with_prefix():
    net = Net()
    assert [name for name, _ in net.named_parameters(recurse=False)] == ["head"]
    assert [name for name, _ in net.named_parameters(prefix="model")][:2] == [
        "model.head", "model.first.weight"]


def test_shared_parameter_is_listed_once():
    net = Net()
    net.second = Scale(3)
    net.second.weight = net.first.weight
    assert sum(p is net.first.weight for p in net.parameters()) == 1


def test_call_runs_forward():
    layer = Scale(3)
    layer.weight.data[:] = 2
    np.testing.assert_array_equal(layer(np.ones(3, np.float32)), 2)
    assert int(layer.calls) == 1


def test_base_module_forward_and_backward_are_abstract():
    with pytest.raises(NotImplementedError, match="forward"):
        Module()(1)
    with pytest.raises(NotImplementedError, match="backward"):
        Module().backward(1)


def test_train_and_eval_switch_every_descendant():
    net = Net()
    assert net.training and net.norm.training
    assert net.eval() is net
    assert not net.training and not net.first.training and not net.norm.training
    assert net.train() is net
    assert net.norm.training
    with pytest.raises(TypeError, match="mode"):
        net.train("yes")


def test_zero_grad_clears_every_gradient():
    net = Net()
    for param in net.parameters():
        param.grad = np.ones_like(param.data)
    net.zero_grad(set_to_none=False)
    assert all(np.all(p.grad == 0) for p in net.parameters())
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_registered_names_only_accept_their_kind():
    layer = Scale(3)
    with pytest.raises(TypeError, match="weight: expected a fastbn.Parameter or None"):
        layer.weight = np.ones(3)
    with pytest.raises(TypeError, match="calls: expected an ndarray or None"):
        layer.calls = 3
    layer.weight = None
    assert list(layer.parameters()) == []
    with pytest.raises(ValueError, match="name"):
        layer.register_buffer("a.b", np.zeros(1))
    with pytest.raises(ValueError, match="already exists"):
        layer.register_buffer("forward", np.zeros(1))
    with pytest.raises(TypeError):
        layer.register_parameter("bias", np.zeros(1))


def test_deleting_an_attribute_unregisters_it():
    net = Net()
    del net.first
    assert [name for name, _ in net.named_modules()] == ["", "norm"]


def test_attributes_before_init_are_an_error():
    class Broken(Module):
        def __init__(self):
            self.weight = Parameter(np.ones(1))

    with pytest.raises(AttributeError, match="before Module.__init__"):
        Broken()


def test_state_dict_uses_dotted_names_in_torch_order_and_shares_memory():
    net = Net()
    state = net.state_dict()
    assert list(state) == ["head", "first.weight", "first.calls", "norm.weight", "norm.bias",
                           "norm.running_mean", "norm.running_var", "norm.num_batches_tracked"]
    assert state["first.weight"] is net.first.weight.data
    assert state["norm.running_mean"] is net.norm.running_mean


def test_load_state_dict_copies_in_place():
    source, target = Net(), Net()
    for array in source.state_dict().values():
        array[...] = np.arange(array.size).reshape(array.shape) + 1
    weight_array = target.first.weight.data
    result = target.load_state_dict({k: v.copy() for k, v in source.state_dict().items()})
    assert result == IncompatibleKeys([], [])
    assert target.first.weight.data is weight_array   # same array: optimizers keep working
    for key, value in source.state_dict().items():
        np.testing.assert_array_equal(target.state_dict()[key], value)


def test_load_state_dict_reports_missing_and_unexpected_keys():
    net = Net()
    state = dict(net.state_dict())
    del state["head"]
    state["extra"] = np.zeros(1)
    with pytest.raises(ValueError, match=r"missing key\(s\): 'head'; unexpected key\(s\): 'extra'"):
        net.load_state_dict(state)
    result = net.load_state_dict(state, strict=False)
    assert result.missing_keys == ["head"] and result.unexpected_keys == ["extra"]


def test_load_state_dict_validates_shapes_and_dtypes_before_copying():
    net = Net()
    state = {k: v.copy() + 1 for k, v in net.state_dict().items()}
    state["norm.bias"] = np.ones(4, np.float32)
    with pytest.raises(ValueError, match=r"state_dict\['norm.bias'\]: expected shape \(3,\), got \(4,\)"):
        net.load_state_dict(state)
    np.testing.assert_array_equal(net.first.weight.data, 1)   # nothing was copied
    state["norm.bias"] = np.ones(3, np.float64)
    with pytest.raises(TypeError, match=r"norm.bias'\]: expected dtype float32 \(the module's\), got float64"):
        net.load_state_dict(state)
    state["norm.bias"] = np.ones(3, np.float32)
    state["norm.num_batches_tracked"] = np.array(2.0)
    with pytest.raises(TypeError, match="integer"):
        net.load_state_dict(state)
    state["norm.num_batches_tracked"] = np.array(2, np.int32)   # any integer dtype is a count
    net.load_state_dict(state)
    assert net.norm.num_batches_tracked.dtype == np.int64 and int(net.norm.num_batches_tracked) == 2
    with pytest.raises(ValueError, match="numeric"):
        net.load_state_dict({**state, "head": np.array(["a", "b"])})
    with pytest.raises(TypeError, match="mapping"):
        net.load_state_dict([1, 2])


def test_repr_lists_children():
    text = repr(Net())
    assert text.startswith("Net(\n  (first): Scale()\n  (norm): BatchNorm1d(3, eps=1e-05")


def test_modules_are_exported():
    assert fastbn.nn.Module is Module
    assert fastbn.BatchNorm2d is fastbn.nn.BatchNorm2d
