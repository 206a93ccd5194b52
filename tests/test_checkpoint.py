"""fastbn.save / load / load_into: the documented .npz format, exact round
trips, atomic writes that survive a crash mid-save, no pickle on load, clear
errors for mismatched checkpoints, and resumed training equal to an
uninterrupted run bit for bit."""
from __future__ import annotations

import collections
import json
import os
import stat
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

import fastbn
from fastbn import checkpoint, optim
from fastbn.optim import lr_scheduler
from fastbn.parameter import Parameter

from test_optim_cases import CASES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# section: helpers ----------------------------------------------------------------


class ToyModule:
    """A minimal module-like object: named arrays plus an int counter."""

    def __init__(self, channels=3, dtype=np.float32):
        self.weight = np.ones(channels, dtype)
        self.bias = np.zeros(channels, dtype)
        self.steps = 0

    def state_dict(self):
        return {"weight": self.weight, "bias": self.bias, "steps": self.steps}

    def load_state_dict(self, state):
        np.copyto(self.weight, state["weight"])
        np.copyto(self.bias, state["bias"])
        self.steps = int(state["steps"])


class FailingLoad(ToyModule):
    """Writes half of its state, then fails (to test the rollback)."""

    def load_state_dict(self, state):
        np.copyto(self.weight, state["weight"])
        raise RuntimeError("simulated failure inside load_state_dict")


def assert_same(actual, expected, path="root"):
    """Equal values, types and (for arrays) dtype, shape and bits."""
    if isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray), path
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, path
        assert actual.tobytes() == np.ascontiguousarray(expected).tobytes(), path
    elif isinstance(expected, np.generic):
        assert type(actual) is type(expected) and actual.tobytes() == expected.tobytes(), path
    elif isinstance(expected, dict):
        assert type(actual) is type(expected) and list(actual) == list(expected), path
        for key in expected:
            assert_same(actual[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), path
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{path}[{index}]")
    elif isinstance(expected, float) and expected != expected:
        assert isinstance(actual, float) and actual != actual, path
    elif isinstance(expected, float):
        assert type(actual) is float and np.float64(actual).tobytes() == np.float64(expected).tobytes(), path
    else:
        assert type(actual) is type(expected) and actual == expected, path


def temp_files(directory):
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp"))


def rewrite(path, manifest_change=None, arrays_change=None):
    """Rewrite a checkpoint with a modified manifest and/or arrays (tampering)."""
    with np.load(path, allow_pickle=False) as archive:
        entries = {name: archive[name] for name in archive.files}
    manifest = json.loads(entries.pop(checkpoint.MANIFEST_ENTRY).tobytes())
    if manifest_change:
        manifest_change(manifest)
    if arrays_change:
        arrays_change(entries)
    entries[checkpoint.MANIFEST_ENTRY] = np.frombuffer(json.dumps(manifest).encode(), np.uint8)
    with open(path, "wb") as file:
        np.savez(file, **entries)


def small_training_state():
    params = [Parameter(np.arange(6, dtype=np.float32).reshape(2, 3)), Parameter(np.ones(4))]
    opt = optim.Adam(params, lr=0.1)
    sched = lr_scheduler.StepLR(opt, step_size=2)
    for param in params:
        param.grad = np.full_like(param.data, 0.5)
    opt.step()
    sched.step()
    return params, opt, sched


# section: round trips and format -------------------------------------------------


def test_every_supported_value_round_trips_exactly(tmp_path):
    big_endian = np.arange(5, dtype=">f8")
    value = {
        "none": None, "flag": True, "text": "épsilon / ünïcode", "int": -7, "huge_int": 2 ** 100,
        "float": 0.1, "negative_zero": -0.0, "tiny": 5e-324, "largest": 1.7976931348623157e308,
        "inf": float("inf"), "minus_inf": float("-inf"), "nan": float("nan"),
        "tuple": (1, (2.5, "x"), []), "list": [1, [2, {"a": None}]],
        "int_keys": {0: "zero", 1: {"step": 3}}, "mixed_keys": {1: "a", "1": "b", (2, 3): "c", None: 4},
        "dollar": {"$type": "not a tag"},
        "counter": collections.Counter({2: 1, 4: 3}),
        "f32_scalar": np.float32(1.1), "i64_scalar": np.int64(-3), "bool_scalar": np.bool_(True),
        "arrays": [np.arange(12, dtype=np.float32).reshape(3, 4), np.zeros((0, 3)), np.array(2.5),
                   np.arange(10, dtype=np.int16)[::-3], np.asfortranarray(np.eye(3)), big_endian,
                   np.array([np.nan, -np.inf, 1e-45], np.float32), np.array([1 + 2j]),
                   np.array([True, False]), np.arange(4, dtype=np.uint8)],
    }
    path = tmp_path / "values.ckpt"
    fastbn.save(path, value)
    assert_same(fastbn.load(path), value)
    assert_same(fastbn.load(str(path)), value)


def test_file_is_a_plain_npz_with_a_json_manifest(tmp_path):
    params, opt, sched = small_training_state()
    path = tmp_path / "run.ckpt"
    fastbn.save(path, {"optimizer": opt, "scheduler": sched, "epoch": 4})
    assert os.listdir(tmp_path) == ["run.ckpt"]  # no suffix appended, no temporary left
    with np.load(path, allow_pickle=False) as archive:
        names = sorted(archive.files)
        manifest = json.loads(archive[checkpoint.MANIFEST_ENTRY].tobytes().decode("utf-8"))
        arrays = {name: archive[name] for name in names if name != checkpoint.MANIFEST_ENTRY}
    assert manifest["format"] == "fastbn-checkpoint" and manifest["version"] == 1
    assert manifest["fastbn_version"] == fastbn.__version__
    root = manifest["root"]
    assert root["epoch"] == 4
    assert root["optimizer"]["$type"] == "object" and root["optimizer"]["class"] == "Adam"
    assert root["scheduler"]["class"] == "StepLR"
    # every array of the optimizer state is an entry, described in the manifest
    assert names == sorted(manifest["arrays"]) + [checkpoint.MANIFEST_ENTRY] or \
        set(names) == set(manifest["arrays"]) | {checkpoint.MANIFEST_ENTRY}
    paths = {record["path"] for record in manifest["arrays"].values()}
    assert "optimizer/state/0/exp_avg" in paths and "optimizer/state/1/exp_avg_sq" in paths
    for key, record in manifest["arrays"].items():
        assert list(arrays[key].shape) == record["shape"] and arrays[key].dtype.str == record["dtype"]
    np.testing.assert_array_equal(arrays[_key_of(manifest, "optimizer/state/0/exp_avg")],
                                  opt.state[params[0]]["exp_avg"])
    with zipfile.ZipFile(path) as archive:  # nothing but .npy entries
        assert all(name.endswith(".npy") for name in archive.namelist())


def _key_of(manifest, path):
    return next(key for key, record in manifest["arrays"].items() if record["path"] == path)


def test_compressed_checkpoint_loads_the_same(tmp_path):
    value = {"x": np.zeros((100, 100)), "y": [1, 2.5]}
    fastbn.save(tmp_path / "a", value)
    fastbn.save(tmp_path / "b", value, compress=True)
    assert os.path.getsize(tmp_path / "b") < os.path.getsize(tmp_path / "a")
    assert_same(fastbn.load(tmp_path / "b"), value)


def test_single_object_round_trip_returns_its_state_dict(tmp_path):
    params, opt, _ = small_training_state()
    fastbn.save(tmp_path / "opt", opt)
    assert_same(fastbn.load(tmp_path / "opt"), opt.state_dict())


@pytest.mark.parametrize("bad,where", [
    (lambda: None, "fn"),
    ({1, 2}, "fn"),
    (object(), "fn"),
    (np.array([object()], dtype=object), "fn"),
    (np.zeros(2, dtype=[("a", "f4")]), "fn"),
    (np.array(["text"]), "fn"),
])
def test_unsupported_values_raise_type_error_naming_their_path_and_keep_the_old_file(tmp_path, bad, where):
    path = tmp_path / "c.ckpt"
    fastbn.save(path, {"keep": np.arange(3)})
    before = path.read_bytes()
    with pytest.raises(TypeError, match=r"fastbn.save: nested/0/fn: cannot store"):
        fastbn.save(path, {"nested": [{where: bad}]})
    assert path.read_bytes() == before
    assert temp_files(tmp_path) == []


def test_unsupported_dict_key_raises_type_error(tmp_path):
    with pytest.raises(TypeError, match="dict key of type frozenset"):
        fastbn.save(tmp_path / "k", {frozenset([1]): 1})


# section: atomic write -------------------------------------------------------------


def test_exception_mid_write_keeps_the_previous_checkpoint_and_removes_the_temporary(tmp_path, monkeypatch):
    path = tmp_path / "run.ckpt"
    old = {"step": 1, "w": np.arange(1000.0)}
    fastbn.save(path, old)
    before = path.read_bytes()

    def write_half_then_fail(file, entries, compress):
        file.write(b"PK\x03\x04 partial archive")
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(checkpoint, "_write_archive", write_half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        fastbn.save(path, {"step": 2, "w": np.zeros(1000)})
    assert path.read_bytes() == before
    assert_same(fastbn.load(path), old)
    assert temp_files(tmp_path) == []


def test_keyboard_interrupt_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "run.ckpt"
    fastbn.save(path, {"step": 1})
    real_write_array = np.lib.format.write_array
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write_array(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fastbn.save(path, {"step": 2, "a": np.ones(10), "b": np.ones(10)})
    monkeypatch.undo()
    assert fastbn.load(path) == {"step": 1}
    assert temp_files(tmp_path) == []


def test_failed_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "run.ckpt"
    fastbn.save(path, {"step": 1})

    def failing_replace(src, dst):
        raise PermissionError("simulated rename failure")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(PermissionError):
        fastbn.save(path, {"step": 2})
    monkeypatch.undo()
    assert fastbn.load(path) == {"step": 1}
    assert temp_files(tmp_path) == []


CRASH_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    import fastbn
    from fastbn import checkpoint
    path, moment = sys.argv[1], sys.argv[2]
    if moment == "mid_write":
        real = np.lib.format.write_array
        count = [0]
        def crash_on_second_array(*args, **kwargs):
            count[0] += 1
            if count[0] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        np.lib.format.write_array = crash_on_second_array
    else:  # the whole archive is in the temporary file, not yet renamed
        def crash_on_fsync(fd):
            os.kill(os.getpid(), signal.SIGKILL)
        os.fsync = crash_on_fsync
    fastbn.save(path, {"step": 2, "a": np.zeros(300000), "b": np.zeros(300000)})
    print("not reached")
""")


@pytest.mark.parametrize("moment", ["mid_write", "before_rename"])
def test_process_killed_mid_save_leaves_the_previous_checkpoint_intact(tmp_path, moment):
    path = tmp_path / "run.ckpt"
    old = {"step": 1, "a": np.arange(300000.0), "b": np.ones(300000)}
    fastbn.save(path, old)
    before = path.read_bytes()
    result = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(path), moment],
                            cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=_pythonpath()),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, result.stderr
    assert "not reached" not in result.stdout
    assert path.read_bytes() == before
    assert_same(fastbn.load(path), old)
    # the killed process could not clean up: its partial file is a hidden temporary
    leftovers = temp_files(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].startswith(".run.ckpt.")


def _pythonpath():
    return os.pathsep.join([os.path.dirname(os.path.dirname(fastbn.__file__))]
                           + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def test_save_fsyncs_the_file_before_renaming_and_the_directory_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append("fsync_dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync_file")
        return real_fsync(fd)

    def recording_replace(src, dst):
        events.append("replace")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    fastbn.save(tmp_path / "run.ckpt", {"a": np.ones(3)})
    assert events == ["fsync_file", "replace", "fsync_dir"]


def test_new_file_follows_the_umask_and_an_overwritten_one_keeps_its_mode(tmp_path):
    path = tmp_path / "run.ckpt"
    previous = os.umask(0o027)
    try:
        fastbn.save(path, {"a": 1})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    os.chmod(path, 0o600)
    fastbn.save(path, {"a": 2})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


# section: loading is safe and validated ------------------------------------------


def test_loading_never_unpickles(tmp_path):
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.ckpt"
    fastbn.save(path, {"a": np.ones(2)})
    with np.load(path) as archive:
        entries = {name: archive[name] for name in archive.files}
    entries["a0"] = np.array([Payload()], dtype=object)
    with open(path, "wb") as file:
        np.savez(file, allow_pickle=True, **entries)
    with pytest.raises(checkpoint.CheckpointError, match="pickle"):
        fastbn.load(path)
    assert not marker.exists()
    # a bare pickle is rejected as well
    import pickle
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(checkpoint.CheckpointError):
        fastbn.load(raw)
    assert not marker.exists()


@pytest.mark.parametrize("content,pattern", [
    (b"", "not a readable fastbn checkpoint"),
    (b"just some text", "not a readable fastbn checkpoint"),
    (None, "no '__manifest__' entry"),  # a plain npz
    ("npy", "single .npy array"),
])
def test_files_that_are_not_checkpoints_raise_checkpoint_error(tmp_path, content, pattern):
    path = tmp_path / "f"
    if content is None:
        with open(path, "wb") as file:
            np.savez(file, x=np.ones(3))
    elif content == "npy":
        with open(path, "wb") as file:
            np.save(file, np.ones(3))
    else:
        path.write_bytes(content)
    with pytest.raises(checkpoint.CheckpointError, match=pattern):
        fastbn.load(path)
    assert issubclass(checkpoint.CheckpointError, ValueError)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        fastbn.load(tmp_path / "absent")


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_checkpoint_raises_checkpoint_error(tmp_path, keep):
    path = tmp_path / "t.ckpt"
    fastbn.save(path, {"a": np.arange(10000.0), "b": np.ones(5000, np.float32)})
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(checkpoint.CheckpointError):
        fastbn.load(path)


def test_corrupted_bytes_in_a_compressed_checkpoint_raise_checkpoint_error(tmp_path):
    path = tmp_path / "c.ckpt"
    fastbn.save(path, {"a": np.arange(10000.0)}, compress=True)
    data = bytearray(path.read_bytes())
    middle = len(data) // 3
    data[middle:middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError):
        fastbn.load(path)


@pytest.mark.parametrize("tamper,pattern", [
    (dict(manifest_change=lambda m: m.update(version=99)), "newer than this fastbn"),
    (dict(manifest_change=lambda m: m.update(format="other")), "not a fastbn checkpoint"),
    (dict(manifest_change=lambda m: m["arrays"]["a0"].update(shape=[4])), "differs from the manifest"),
    (dict(manifest_change=lambda m: m["arrays"]["a0"].update(dtype="<f4")), "differs from the manifest"),
    (dict(arrays_change=lambda a: a.update(extra=np.ones(1))), "not listed in the manifest"),
    (dict(arrays_change=lambda a: a.pop("a0")), "missing"),
    (dict(manifest_change=lambda m: m["root"].update(w={"$type": "pickle"})), "unknown manifest"),
    (dict(manifest_change=lambda m: m["root"].update(w={"$type": "float", "value": "1e400"})), "non-finite"),
    (dict(manifest_change=lambda m: m["root"].pop("w")), "not used"),
])
def test_manifest_and_entries_must_agree(tmp_path, tamper, pattern):
    path = tmp_path / "m.ckpt"
    fastbn.save(path, {"w": np.arange(3.0)})
    rewrite(path, **tamper)
    with pytest.raises(checkpoint.CheckpointError, match=pattern):
        fastbn.load(path)


# section: load_into validation ---------------------------------------------------


def test_load_into_restores_every_object_and_returns_the_plain_entries(tmp_path):
    params, opt, sched = small_training_state()
    module = ToyModule()
    module.weight[:] = [1.0, 2.0, 3.0]
    module.steps = 9
    fastbn.save(tmp_path / "run", {"model": module, "optimizer": opt, "scheduler": sched, "epoch": 3})

    fresh_params = [Parameter(p.data.copy()) for p in params]
    fresh_opt = optim.Adam(fresh_params, lr=0.1)
    fresh_sched = lr_scheduler.StepLR(fresh_opt, step_size=2)
    fresh_module = ToyModule()
    content = fastbn.load_into(tmp_path / "run", {"model": fresh_module, "optimizer": fresh_opt,
                                                  "scheduler": fresh_sched})
    assert content["epoch"] == 3
    assert_same(fresh_module.state_dict(), module.state_dict())
    assert_same(fresh_opt.state_dict(), opt.state_dict())
    assert_same(fresh_sched.state_dict(), sched.state_dict())


def test_load_into_a_single_object(tmp_path):
    module = ToyModule()
    module.bias[:] = 5
    fastbn.save(tmp_path / "m", module)
    other = ToyModule()
    fastbn.load_into(tmp_path / "m", other)
    assert_same(other.state_dict(), module.state_dict())
    with pytest.raises(checkpoint.CheckpointError, match="single object"):
        fastbn.load_into(tmp_path / "m", {"model": other})
    fastbn.save(tmp_path / "d", {"model": module})
    with pytest.raises(checkpoint.CheckpointError, match="pass a dict"):
        fastbn.load_into(tmp_path / "d", other)
    with pytest.raises(TypeError, match="target"):
        fastbn.load_into(tmp_path / "d", [other])


def _adam_checkpoint(tmp_path, shapes=((2, 3), (4,)), dtype=np.float64):
    params = [Parameter(np.ones(shape, dtype)) for shape in shapes]
    opt = optim.Adam(params, lr=0.1)
    for param in params:
        param.grad = np.ones_like(param.data)
    opt.step()
    fastbn.save(tmp_path / "opt", {"optimizer": opt})
    return tmp_path / "opt"


@pytest.mark.parametrize("make_target,error,pattern", [
    (lambda: optim.SGD([Parameter(np.ones((2, 3))), Parameter(np.ones(4))]), TypeError,
     "saved from a Adam, cannot be loaded into a SGD"),
    (lambda: optim.Adam([Parameter(np.ones((3, 2))), Parameter(np.ones(4))]), checkpoint.CheckpointError,
     r"'optimizer': state_dict\['state'\]\[0\]\['exp_avg'\]: expected shape \(3, 2\) \(the shape of the parameter\), got \(2, 3\)"),
    (lambda: optim.Adam([Parameter(np.ones((2, 3), np.float32)), Parameter(np.ones(4))]), TypeError,
     r"'optimizer': state_dict\['state'\]\[0\]\['exp_avg'\]: expected dtype float32 \(the parameter's; fastbn never casts state\), got float64"),
    (lambda: optim.Adam([Parameter(np.ones((2, 3)))]), checkpoint.CheckpointError,
     r"state_dict\['param_groups'\]\[0\]: expected 1 parameters \(as this optimizer's group 0 has\), got 2"),
    (lambda: optim.Adam([{"params": [Parameter(np.ones((2, 3)))]}, {"params": [Parameter(np.ones(4))]}]),
     checkpoint.CheckpointError, r"state_dict: expected 2 parameter groups \(as this optimizer has\), got 1"),
])
def test_load_into_rejects_a_mismatched_optimizer_and_changes_nothing(tmp_path, make_target, error, pattern):
    path = _adam_checkpoint(tmp_path)
    target = make_target()
    before = target.state_dict()
    with pytest.raises(error, match=pattern):
        fastbn.load_into(path, {"optimizer": target})
    assert_same(target.state_dict(), before)


@pytest.mark.parametrize("change,error,pattern", [
    (lambda m: setattr(m, "weight", np.ones(4, np.float32)), checkpoint.CheckpointError,
     r"\['weight'\]: shape \(3,\) saved, the target has \(4,\)"),
    (lambda m: setattr(m, "bias", np.zeros(3, np.float64)), TypeError,
     r"\['bias'\]: dtype float32 saved, the target has float64"),
])
def test_load_into_checks_shapes_and_dtypes_of_module_state(tmp_path, change, error, pattern):
    fastbn.save(tmp_path / "m", {"model": ToyModule()})
    target = ToyModule()
    change(target)
    before = {k: np.copy(v) for k, v in target.state_dict().items()}
    with pytest.raises(error, match=pattern):
        fastbn.load_into(tmp_path / "m", {"model": target})
    assert_same({k: np.copy(v) for k, v in target.state_dict().items()}, before)


class ToyModuleWithRunningMean(ToyModule):
    def state_dict(self):
        return dict(super().state_dict(), running_mean=np.zeros(3, np.float32))

    def load_state_dict(self, state):
        super().load_state_dict(state)


def test_load_into_reports_missing_and_unexpected_names(tmp_path):
    fastbn.save(tmp_path / "m", {"model": ToyModule()})
    with pytest.raises(TypeError, match="saved from a ToyModule, cannot be loaded into a ToyModuleWithRunningMean"):
        fastbn.load_into(tmp_path / "m", {"model": ToyModuleWithRunningMean()})

    class ToyModuleNarrow(ToyModule):
        def state_dict(self):
            state = super().state_dict()
            del state["bias"]
            return state
    ToyModuleNarrow.__name__ = "ToyModule"
    narrow = ToyModuleNarrow()
    with pytest.raises(checkpoint.CheckpointError, match=r"unexpected \['bias'\]"):
        fastbn.load_into(tmp_path / "m", {"model": narrow})

    class ToyModuleWide(ToyModuleWithRunningMean):
        pass
    ToyModuleWide.__name__ = "ToyModule"
    with pytest.raises(checkpoint.CheckpointError, match=r"missing \['running_mean'\]"):
        fastbn.load_into(tmp_path / "m", {"model": ToyModuleWide()})
    with pytest.raises(checkpoint.CheckpointError, match=r"missing \['running_mean'\]"):
        fastbn.load_into(tmp_path / "m", {"model": ToyModuleWide()}, strict=False)


def test_strict_false_ignores_unexpected_names_and_untargeted_objects(tmp_path):
    module = ToyModule()
    module.weight[:] = 7
    fastbn.save(tmp_path / "m", {"model": module, "other": ToyModule(), "epoch": 1})
    target = ToyModule()
    with pytest.raises(checkpoint.CheckpointError, match=r"objects \['other'\] of the checkpoint have no target"):
        fastbn.load_into(tmp_path / "m", {"model": target})
    fastbn.load_into(tmp_path / "m", {"model": target}, strict=False)
    np.testing.assert_array_equal(target.weight, 7)


def test_load_into_rejects_missing_entries_and_plain_data_targets(tmp_path):
    fastbn.save(tmp_path / "m", {"model": ToyModule(), "epoch": 1})
    with pytest.raises(checkpoint.CheckpointError, match=r"no entry named \['optimizer'\]"):
        fastbn.load_into(tmp_path / "m", {"model": ToyModule(), "optimizer": ToyModule()})
    with pytest.raises(checkpoint.CheckpointError, match="'epoch' is plain data"):
        fastbn.load_into(tmp_path / "m", {"model": ToyModule(), "epoch": ToyModule()})
    with pytest.raises(TypeError, match=r"target\['model'\]: expected an object with load_state_dict"):
        fastbn.load_into(tmp_path / "m", {"model": 3})


def test_validation_failure_of_a_later_object_leaves_earlier_ones_untouched(tmp_path):
    first = ToyModule()
    first.weight[:] = 2
    fastbn.save(tmp_path / "m", {"a": first, "b": ToyModule()})
    target_a, target_b = ToyModule(), ToyModule(channels=4)
    with pytest.raises(checkpoint.CheckpointError, match="'b'"):
        fastbn.load_into(tmp_path / "m", {"a": target_a, "b": target_b})
    np.testing.assert_array_equal(target_a.weight, 1)


def test_failure_inside_load_state_dict_rolls_back_the_objects_already_restored(tmp_path):
    saved_a, saved_b = ToyModule(), FailingLoad()
    saved_a.weight[:] = 2
    saved_b.weight[:] = 3
    fastbn.save(tmp_path / "m", {"a": saved_a, "b": saved_b})
    target_a, target_b = ToyModule(), FailingLoad()
    with pytest.raises(RuntimeError, match="simulated failure"):
        fastbn.load_into(tmp_path / "m", {"a": target_a, "b": target_b})
    np.testing.assert_array_equal(target_a.weight, 1)
    assert target_a.steps == 0


# section: resumed training equals uninterrupted training -------------------------

SCHEDULERS = {
    "one_cycle": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=40),
    "cyclic": lambda opt: lr_scheduler.CyclicLR(opt, 0.001, 0.05, step_size_up=3,
                                                cycle_momentum="momentum" in opt.defaults
                                                or "betas" in opt.defaults),
    "multistep": lambda opt: lr_scheduler.MultiStepLR(opt, milestones=[3, 5, 11], gamma=0.5),
    "warm_restarts": lambda opt: lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=3, T_mult=2),
    "sequential": lambda opt: lr_scheduler.SequentialLR(
        opt, [lr_scheduler.LinearLR(opt, 0.1, 1.0, 4), lr_scheduler.CosineAnnealingLR(opt, 9)], [4]),
    "plateau": lambda opt: lr_scheduler.ReduceLROnPlateau(opt, patience=1, factor=0.5),
    "chained": lambda opt: lr_scheduler.ChainedScheduler(
        [lr_scheduler.ExponentialLR(opt, 0.95), lr_scheduler.StepLR(opt, 4, 0.5)]),
}

RESUME_CASES = ["sgd_nesterov_weight_decay", "momentum_weight_decay_maximize", "rmsprop_all_options",
                "adam_all_options", "adamw_amsgrad_maximize", "adagrad_lr_decay_weight_decay",
                "lion_weight_decay_maximize", "adam_no_bias_correction"]

TOTAL_STEPS, SAVE_AT = 14, 6


def _bn_module_class():
    nn = getattr(fastbn, "nn", None)
    cls = getattr(nn, "BatchNorm2d", None) if nn is not None else None
    return cls if cls is not None and hasattr(cls, "backward") else None


def _build(case, scheduler_name, dtype, with_bn):
    rng = np.random.default_rng(0)
    params = [Parameter(rng.standard_normal(shape).astype(dtype)) for shape in ((3, 5), (7,), (2, 2, 2))]
    modules = {}
    if with_bn:
        bn = _bn_module_class()(4, dtype=dtype)
        bn.train()
        modules["bn"] = bn
        params = params + list(bn.parameters())
    cls, kwargs = CASES[case]
    groups = [{"params": params[:1], "lr": kwargs["lr"] * 0.5}, {"params": params[1:]}]
    opt = cls(groups, **kwargs)
    sched = SCHEDULERS[scheduler_name](opt)
    return params, modules, opt, sched


def _train_steps(params, modules, opt, sched, first, last, scheduler_name):
    for step in range(first, last):
        rng = np.random.default_rng(1000 + step)
        for param in params:
            param.grad = rng.standard_normal(param.shape).astype(param.dtype)
        bn = modules.get("bn")
        if bn is not None:
            x = rng.standard_normal((3, 4, 2, 2)).astype(bn.weight.dtype) * 2 + 1
            for param in bn.parameters():
                param.grad = None
            bn(x)
            bn.backward(rng.standard_normal(x.shape).astype(x.dtype))
        opt.step()
        if scheduler_name == "plateau":
            sched.step(1.0 if step % 3 else 0.5)
        else:
            sched.step()


def _everything(params, modules, opt, sched):
    state = {"params": [p.data for p in params], "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "lrs": [g["lr"] for g in opt.param_groups]}
    state.update({name: module.state_dict() for name, module in modules.items()})
    return state


def _resume_equals_uninterrupted(tmp_path, case, scheduler_name, dtype, with_bn=False):
    import warnings
    warnings.simplefilter("ignore", UserWarning)  # torch's call-order warning on the first step
    params, modules, opt, sched = _build(case, scheduler_name, dtype, with_bn)
    _train_steps(params, modules, opt, sched, 0, TOTAL_STEPS, scheduler_name)
    expected = _everything(params, modules, opt, sched)

    params, modules, opt, sched = _build(case, scheduler_name, dtype, with_bn)
    _train_steps(params, modules, opt, sched, 0, SAVE_AT, scheduler_name)
    path = tmp_path / "resume.ckpt"
    fastbn.save(path, {"params": [p.data for p in params], "optimizer": opt, "scheduler": sched,
                       **modules, "step": SAVE_AT})
    del params, modules, opt, sched

    params, modules, opt, sched = _build(case, scheduler_name, dtype, with_bn)
    restored = fastbn.load_into(path, {"optimizer": opt, "scheduler": sched, **modules})
    for param, saved in zip(params, restored["params"]):
        if not any(param is p for m in modules.values() for p in m.parameters()):
            np.copyto(param.data, saved)
    _train_steps(params, modules, opt, sched, restored["step"], TOTAL_STEPS, scheduler_name)
    assert_same(_everything(params, modules, opt, sched), expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", RESUME_CASES)
def test_resumed_training_equals_uninterrupted_bit_for_bit(tmp_path, case, dtype):
    scheduler_name = list(SCHEDULERS)[RESUME_CASES.index(case) % len(SCHEDULERS)]
    _resume_equals_uninterrupted(tmp_path, case, scheduler_name, dtype)


@pytest.mark.parametrize("scheduler_name", list(SCHEDULERS))
def test_resume_with_every_scheduler_kind_is_bit_exact(tmp_path, scheduler_name):
    _resume_equals_uninterrupted(tmp_path, "sgd_nesterov_weight_decay", scheduler_name, np.float32)
    _resume_equals_uninterrupted(tmp_path, "adam_all_options", scheduler_name, np.float64)


@pytest.mark.skipif(_bn_module_class() is None, reason="fastbn.nn.BatchNorm2d with backward not available yet")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_resume_with_a_batch_norm_module_is_bit_exact(tmp_path, dtype):
    _resume_equals_uninterrupted(tmp_path, "adam_all_options", "one_cycle", dtype, with_bn=True)


# section: a whole model: Sequential with BatchNorm, resumed in a new process ------

MLP_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import fastbn
    from fastbn import nn
    from fastbn.optim import lr_scheduler

    def build():
        rng = np.random.default_rng(0)
        model = nn.Sequential(nn.Linear(6, 16, rng=rng), nn.BatchNorm1d(16, momentum=None), nn.ReLU(),
                              nn.Linear(16, 3, rng=rng))
        optimizer = fastbn.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True)
        scheduler = lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=20)
        return model, optimizer, scheduler

    def train(model, optimizer, scheduler, first, last):
        criterion = nn.CrossEntropyLoss()
        for step in range(first, last):
            rng = np.random.default_rng(100 + step)
            x = rng.standard_normal((32, 6)).astype(np.float32)
            y = rng.integers(0, 3, 32)
            model.train()
            criterion(model(x), y)
            optimizer.zero_grad()
            model.backward(criterion.backward())
            optimizer.step()
            scheduler.step()

    def fingerprint(model, optimizer):
        model.eval()
        x = np.random.default_rng(7).standard_normal((5, 6)).astype(np.float32)
        arrays = [model(x)] + list(model.state_dict().values())
        arrays += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, np.ndarray)]
        return b"".join(np.ascontiguousarray(a).tobytes() for a in arrays).hex()

    mode, path = sys.argv[1], sys.argv[2]
    model, optimizer, scheduler = build()
    if mode == "uninterrupted":
        train(model, optimizer, scheduler, 0, 18)
    elif mode == "first_half":
        train(model, optimizer, scheduler, 0, 9)
        fastbn.save(path, {"model": model, "optimizer": optimizer, "scheduler": scheduler, "step": 9})
    else:
        step = fastbn.load_into(path, {"model": model, "optimizer": optimizer, "scheduler": scheduler})["step"]
        train(model, optimizer, scheduler, step, 18)
    print(fingerprint(model, optimizer))
""")


@pytest.mark.skipif(not hasattr(getattr(fastbn, "nn", None), "Sequential"), reason="fastbn.nn not available")
def test_a_model_resumed_in_a_new_process_equals_the_uninterrupted_run(tmp_path):
    path = str(tmp_path / "mlp.ckpt")

    def run(mode):
        result = subprocess.run([sys.executable, "-c", MLP_SCRIPT, mode, path], capture_output=True, text=True,
                                timeout=300, env=dict(os.environ, PYTHONPATH=_pythonpath()), cwd=str(tmp_path))
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    uninterrupted = run("uninterrupted")
    run("first_half")
    assert run("resume") == uninterrupted


@pytest.mark.skipif(not hasattr(getattr(fastbn, "nn", None), "Sequential"), reason="fastbn.nn not available")
def test_load_into_a_model_of_another_architecture_names_the_mismatch(tmp_path):
    from fastbn import nn
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    fastbn.save(tmp_path / "m", {"model": model})
    wider = nn.Sequential(nn.Linear(4, 9), nn.BatchNorm1d(9), nn.Linear(9, 2))
    with pytest.raises(checkpoint.CheckpointError, match=r"\['0.weight'\]: shape \(8, 4\) saved, the target has \(9, 4\)"):
        fastbn.load_into(tmp_path / "m", {"model": wider})
    deeper = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2), nn.Linear(2, 2))
    with pytest.raises(checkpoint.CheckpointError, match=r"missing \['3.weight', '3.bias'\]"):
        fastbn.load_into(tmp_path / "m", {"model": deeper})
    double = nn.Sequential(nn.Linear(4, 8, dtype=np.float64), nn.BatchNorm1d(8, dtype=np.float64),
                           nn.Linear(8, 2, dtype=np.float64))
    with pytest.raises(TypeError, match="dtype float32 saved, the target has float64"):
        fastbn.load_into(tmp_path / "m", {"model": double})
