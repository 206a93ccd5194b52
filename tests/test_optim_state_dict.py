"""Optimizer.check_state_dict: the one set of rules for saved optimizer state,
used by load_state_dict and by fastbn.load_into. Bad state raises TypeError
(wrong type) or ValueError (wrong value) naming the entry, and leaves the
optimizer exactly as it was."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest

import fastbn
from fastbn import optim
from fastbn.parameter import Parameter


def trained(kind="adam", dtype=np.float32, groups=2):
    """An optimizer with state for every parameter, over `groups` groups."""
    params = [Parameter(np.linspace(-1, 1, 6, dtype=dtype).reshape(2, 3)),
              Parameter(np.arange(4, dtype=dtype)),
              Parameter(np.ones(5, dtype))]
    if groups == 2:
        spec = [{"params": params[:2]}, {"params": params[2:], "lr": 0.5}]
    else:
        spec = params
    make = {"adam": lambda: optim.Adam(spec, lr=0.1),
            "adagrad": lambda: optim.Adagrad(spec, lr=0.1, lr_decay=0.01),
            "rmsprop": lambda: optim.RMSprop(spec, lr=0.1, momentum=0.5),
            "sgd": lambda: optim.SGD(spec, lr=0.1, momentum=0.9)}[kind]
    opt = make()
    for step in range(2):
        for param in params:
            param.grad = np.full_like(param.data, 0.25 * (step + 1))
        opt.step()
    return opt, params


def snapshot(opt):
    """Everything load_state_dict could change, deep-copied."""
    return (copy.deepcopy(opt.state_dict()), [list(map(id, g["params"])) for g in opt.param_groups],
            [id(g) for g in opt.param_groups],
            {id(p): {k: (id(v), v.copy() if isinstance(v, np.ndarray) else v) for k, v in s.items()}
             for p, s in opt.state.items()})


def assert_unchanged(opt, before):
    after = snapshot(opt)
    assert after[1:3] == before[1:3]
    assert after[3].keys() == before[3].keys()
    for key in before[3]:
        assert after[3][key].keys() == before[3][key].keys()
        for name, (ident, value) in before[3][key].items():
            assert after[3][key][name][0] == ident  # the very same buffer
            np.testing.assert_array_equal(after[3][key][name][1], value)
    assert repr(after[0]) == repr(before[0])


# section: wrong types and shapes of the whole dict ---------------------------------


@pytest.mark.parametrize("bad", [3, None, "state", [("state", {}), ("param_groups", [])]])
def test_load_state_dict_of_a_non_mapping_raises_type_error_naming_the_argument(bad):
    opt, _ = trained()
    before = snapshot(opt)
    with pytest.raises(TypeError, match=r"^state_dict: expected a dict with 'state' and 'param_groups'"):
        opt.load_state_dict(bad)
    assert_unchanged(opt, before)


def mutate(path_and_value):
    """A function changing one entry of a state dict (path of keys, new value)."""
    *path, value = path_and_value

    def change(state_dict):
        target = state_dict
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return change


_DELETE = object()

BAD_STATE = [
    # (change, error type, pattern in the message)
    (("state", _DELETE), ValueError, r"state_dict: expected a dict with .* \(missing \['state'\]\)"),
    (("param_groups", _DELETE), ValueError, r"missing \['param_groups'\]"),
    (("state", [1, 2]), TypeError, r"state_dict\['state'\]: expected a dict mapping parameter indices"),
    (("param_groups", {"params": [0]}), TypeError, r"state_dict\['param_groups'\]: expected a list of dicts"),
    (("param_groups", 1, _DELETE), ValueError, r"state_dict\['param_groups'\]\[1\]: expected 2 parameter"
                                               r"|expected 2 parameter groups"),
    (("param_groups", 1, "params", _DELETE), ValueError,
     r"state_dict\['param_groups'\]\[1\]: expected a 'params' entry"),
    (("param_groups", 1, 3), TypeError, r"state_dict\['param_groups'\]\[1\]: expected a dict, got int"),
    (("param_groups", 0, "params", 7), TypeError, r"state_dict\['param_groups'\]\[0\]\['params'\]: expected a list"),
    (("param_groups", 0, "params", [0]), ValueError, r"\[0\]: expected 2 parameters .* got 1"),
    (("param_groups", 1, "params", [0]), ValueError, r"\['params'\]\[0\]: parameter index 0 appears more than once"),
    (("param_groups", 1, "params", [[2]]), TypeError, r"\['params'\]\[0\]: expected a parameter index"),
    (("param_groups", 1, "lr", -1.0), ValueError, r"state_dict\['param_groups'\]\[1\]\['lr'\]"),
    (("state", 9, {}), ValueError, r"state_dict\['state'\]: entry 9 matches no parameter index"),
    (("state", 2, [1.0]), TypeError, r"state_dict\['state'\]\[2\]: expected a dict of state values"),
    (("state", 2, 5, np.ones(5, np.float32)), TypeError, r"state_dict\['state'\]\[2\]: expected str state names"),
    (("state", 2, "step", _DELETE), ValueError, r"state_dict\['state'\]\[2\]: expected a 'step' entry"),
    (("state", 2, "exp_avg", np.ones(4, np.float32)), ValueError,
     r"state_dict\['state'\]\[2\]\['exp_avg'\]: expected shape \(5,\)"),
    (("state", 2, "exp_avg", np.ones(5, np.float64)), TypeError,
     r"\[2\]\['exp_avg'\]: expected dtype float32 .* got float64"),
    (("state", 2, "exp_avg", np.ones(5, np.int32)), TypeError, r"\[2\]\['exp_avg'\]: expected dtype float32"),
    (("state", 2, "exp_avg", [1.0] * 5), TypeError, r"\[2\]\['exp_avg'\]: expected an ndarray, got list"),
    (("state", 2, "exp_avg", "zeros"), TypeError, r"\[2\]\['exp_avg'\]: expected an ndarray, got str"),
    (("state", 2, "step", "7"), TypeError, r"state_dict\['state'\]\[2\]\['step'\]: expected a whole number"),
    (("state", 2, "step", True), TypeError, r"\['step'\]: expected a whole number \(int\), got bool"),
    (("state", 2, "step", np.array([3])), TypeError, r"\['step'\]: expected a whole number"),
    (("state", 2, "step", 0), None, None),  # a valid step 0: the control case
    (("state", 2, "step", math.inf), ValueError, r"\['step'\]: expected a whole number, got inf"),
    (("state", 2, "step", -math.inf), ValueError, r"\['step'\]: expected a whole number, got -inf"),
    (("state", 2, "step", math.nan), ValueError, r"\['step'\]: expected a whole number, got nan"),
    (("state", 2, "step", 1e300), ValueError, r"\['step'\]: expected a whole number in \[0, 2\*\*53\]"),
    (("state", 2, "step", 2 ** 53 + 1), ValueError, r"\['step'\]: expected a whole number in \[0, 2\*\*53\]"),
    (("state", 2, "step", 2.5), ValueError, r"\['step'\]: expected a whole number, got 2.5"),
    (("state", 2, "step", -1), ValueError, r"\['step'\]: expected a whole number in \[0, 2\*\*53\], got -1"),
    (("state", 2, "step", np.float32(-3.0)), ValueError, r"got -3"),
]


@pytest.mark.parametrize("change,error,pattern", BAD_STATE,
                         ids=[f"case{i}" for i in range(len(BAD_STATE))])
def test_bad_state_raises_naming_the_entry_and_changes_nothing(change, error, pattern):
    opt, params = trained()
    saved = opt.state_dict()
    mutate(change)(saved)
    before = snapshot(opt)
    if error is None:
        opt.check_state_dict(saved)
        return
    with pytest.raises(error, match=pattern):
        opt.check_state_dict(saved)
    with pytest.raises(error, match=pattern):
        opt.load_state_dict(saved)
    assert_unchanged(opt, before)


@pytest.mark.parametrize("kind", ["adagrad", "rmsprop", "adam"])
def test_negative_step_is_refused_by_every_optimizer_that_counts_steps(kind):
    opt, _ = trained(kind)
    saved = opt.state_dict()
    saved["state"][1]["step"] = -4
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\[1\]\['step'\]: expected a whole number "
                                         r"in \[0, 2\*\*53\], got -4"):
        opt.load_state_dict(saved)
    assert_unchanged(opt, before)


def test_a_bad_entry_after_good_ones_leaves_the_earlier_state_untouched():
    # The last parameter's state is bad: nothing of the first two may be loaded.
    opt, params = trained()
    saved = opt.state_dict()
    for entry in saved["state"].values():
        entry["exp_avg"] = entry["exp_avg"] + 100
    saved["param_groups"][0]["lr"] = 0.75
    saved["state"][2]["exp_avg_sq"] = np.ones(2, np.float32)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"\[2\]\['exp_avg_sq'\]: expected shape"):
        opt.load_state_dict(saved)
    assert_unchanged(opt, before)


# section: what a valid state becomes ------------------------------------------------


def test_check_state_dict_returns_a_normalized_copy_and_changes_nothing():
    opt, params = trained()
    saved = opt.state_dict()
    # torch numbers parameters the same way, but any distinct hashables are allowed
    renamed = {"state": {f"p{k}": dict(v) for k, v in saved["state"].items()},
               "param_groups": [dict(g, params=[f"p{i}" for i in g["params"]]) for g in saved["param_groups"]]}
    renamed["state"]["p0"]["step"] = np.array(2.0, np.float32)  # torch's step: a 0-d float tensor
    before = snapshot(opt)
    normalized = opt.check_state_dict(renamed)
    assert_unchanged(opt, before)
    assert [g["params"] for g in normalized["param_groups"]] == [[0, 1], [2]]
    assert normalized["state"][0]["step"] == 2 and type(normalized["state"][0]["step"]) is int
    for index, entry in normalized["state"].items():
        for key, value in entry.items():
            if isinstance(value, np.ndarray):
                assert value is not renamed["state"][f"p{index}"][key]
                np.testing.assert_array_equal(value, saved["state"][index][key])
                assert value.flags.c_contiguous and value.flags.writeable
    # loading the normalized copy gives what loading the original gives
    other, _ = trained()
    other.load_state_dict(normalized)
    opt.load_state_dict(renamed)
    assert repr(other.state_dict()) == repr(opt.state_dict())


def test_check_state_dict_is_a_public_documented_method():
    doc = optim.Optimizer.check_state_dict.__doc__
    assert "load_state_dict" in doc and "Raises" in doc and "TypeError" in doc and "2**53" in doc


def test_largest_step_loads_and_both_backends_step_from_it():
    results = {}
    for backend in ("fast", "reference"):
        opt, params = trained(groups=1)
        saved = opt.state_dict()
        for entry in saved["state"].values():
            entry["step"] = float(2 ** 53)  # a float, as torch stores it
        opt.load_state_dict(saved)
        with fastbn.use_backend(backend):
            opt.step()
        results[backend] = [p.data.copy() for p in params]
        assert all(opt.state[p]["step"] == 2 ** 53 + 1 for p in params)
    for fast, reference in zip(results["fast"], results["reference"]):
        np.testing.assert_allclose(fast, reference, rtol=1e-6, atol=1e-7)


def test_state_of_torch_optimizer_loads_with_tensors_as_given():
    torch = pytest.importorskip("torch")
    data = [np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), np.arange(4, dtype=np.float32)]
    tensors = [torch.tensor(d, requires_grad=True) for d in data]
    reference = torch.optim.Adam(tensors, lr=0.1)
    for tensor in tensors:
        tensor.grad = torch.full_like(tensor, 0.5)
    reference.step()
    params = [Parameter(d.copy()) for d in data]
    opt = optim.Adam(params, lr=0.1)
    opt.load_state_dict(reference.state_dict())
    for param, tensor in zip(params, tensors):
        state, expected = opt.state[param], reference.state[tensor]
        assert state["step"] == 1 and type(state["step"]) is int
        np.testing.assert_array_equal(state["exp_avg"], expected["exp_avg"].numpy())
        assert state["exp_avg"].dtype == np.float32


# section: set_backend ----------------------------------------------------------------


@pytest.mark.parametrize("bad", [None, 1, b"fast", ["fast"]])
def test_set_backend_of_a_non_string_raises_type_error_naming_the_argument(bad):
    before = fastbn.get_backend()
    with pytest.raises(TypeError, match=r"^name: expected a backend name \(a str, one of \('fast', 'reference'\)\)"):
        fastbn.set_backend(bad)
    with pytest.raises(TypeError, match=r"^name: expected a backend name"):
        with fastbn.use_backend(bad):
            pass
    assert fastbn.get_backend() == before


def test_set_backend_of_an_unknown_name_raises_value_error():
    with pytest.raises(ValueError, match=r"^name: expected a backend name, one of .* got 'gpu'"):
        fastbn.set_backend("gpu")
