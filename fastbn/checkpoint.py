"""Checkpoints: save and restore modules, optimizers and schedulers.

>>> fastbn.save("run.ckpt", {"model": model, "optimizer": opt, "scheduler": sched, "epoch": 7})
>>> # later, in a fresh process: build the same objects, then
>>> extra = fastbn.load_into("run.ckpt", {"model": model, "optimizer": opt, "scheduler": sched})
>>> extra["epoch"]
7
>>> fastbn.load("run.ckpt")["optimizer"]["param_groups"][0]["lr"]   # just read it
0.1

What can be saved
-----------------
Any object with ``state_dict()`` / ``load_state_dict()`` (``fastbn.nn``
modules, ``fastbn.optim`` optimizers, ``fastbn.optim.lr_scheduler``
schedulers, or your own), or a dict whose values are such objects or plain
data: nested dicts, lists and tuples of None, bool, int, float, str, NumPy
arrays and NumPy scalars (numeric dtypes), ``collections.Counter``. Anything
else (functions, arbitrary classes, object arrays) raises TypeError at save
time, naming where it sits.

File format (version 1)
-----------------------
A ZIP archive as written by :func:`numpy.savez` (readable with
``numpy.load(path, allow_pickle=False)``) holding:

- ``__manifest__``: a 1-D uint8 array, the UTF-8 bytes of a JSON document
  ``{"format": "fastbn-checkpoint", "version": 1, "fastbn_version": ...,
  "root": <node>, "arrays": {"a0": {"path": "model/weight", "shape": [...],
  "dtype": "<f4"}, ...}}``;
- ``a0``, ``a1``, ...: every array of the checkpoint, in NumPy's ``.npy``
  format (never object arrays, so never pickle).

A ``<node>`` is a JSON value: null, true/false, a string, an integer, a
finite number (written with Python's shortest round-trip repr, so every
float64 comes back bit for bit), a list, or an object whose keys are all
strings (other than ``"$type"``). Everything else is an object tagged by
``"$type"``:

=============  ===========================================================
``$type``      meaning
=============  ===========================================================
``array``      ``{"key": "a3"}``: the array stored under entry ``a3``
``scalar``     ``{"key": "a4"}``: a NumPy scalar, stored as a 0-d array
``float``      ``{"value": "inf" | "-inf" | "nan"}``: a non-finite float
``tuple``      ``{"items": [<node>, ...]}``
``dict``       ``{"items": [[<key node>, <node>], ...]}``: a dict with
               non-string keys (an optimizer's ``state`` has int keys)
``counter``    ``{"items": [[<key node>, <count>], ...]}``
``object``     ``{"class": "Adam", "state": <node>}``: the state_dict of an
               object, with the name of its class
=============  ===========================================================

Safety
------
Saving is atomic: the archive is written to a temporary file in the target's
directory, flushed and fsync'ed, then renamed over the target with
:func:`os.replace`, and the directory is fsync'ed. A crash or an exception
mid-save leaves the previous checkpoint as it was (and removes the temporary
file when Python is still running to do so).

Loading never executes code from the file: arrays are read with
``allow_pickle=False``, the manifest is parsed with :func:`json.loads`,
class names are only compared as strings. A file that is not a fastbn
checkpoint, is truncated, or whose entries disagree with its manifest raises
:class:`CheckpointError` (a ValueError).

:func:`load_into` checks the checkpoint against the objects it restores
before changing any of them: class names (TypeError), entry and state names
(missing or unexpected: ValueError), array shapes (ValueError) and dtypes
(TypeError: no silent casts, as everywhere in fastbn). If an object's own
``load_state_dict`` still fails, the objects restored before it are rolled
back to their previous state.
"""
from __future__ import annotations

import collections
import copy
import json
import math
import os
import tempfile
import zipfile
import zlib
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

__all__ = ["save", "load", "load_into", "CheckpointError", "FORMAT", "VERSION"]

FORMAT = "fastbn-checkpoint"
VERSION = 1
MANIFEST_ENTRY = "__manifest__"

PathLike = Union[str, "os.PathLike[str]"]

# NumPy dtype kinds an array may have: bool, signed/unsigned int, float, complex.
_ARRAY_KINDS = "biufc"


class CheckpointError(ValueError):
    """The file is not a readable fastbn checkpoint, or does not match the
    objects it is loaded into."""


def _has_state(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


# section: encoding -------------------------------------------------------------


class _Encoder:
    """Turns a Python value into a JSON node plus a table of arrays."""

    def __init__(self) -> None:
        self.arrays: Dict[str, np.ndarray] = {}
        self.records: Dict[str, Dict[str, Any]] = {}

    def _store(self, array: np.ndarray, path: str) -> str:
        if array.dtype.kind not in _ARRAY_KINDS or array.dtype.fields is not None:
            raise TypeError(f"fastbn.save: {path or '<root>'}: cannot store an array of dtype "
                            f"{array.dtype} (only bool, integer, float and complex arrays)")
        key = f"a{len(self.arrays)}"
        self.arrays[key] = array
        self.records[key] = {"path": path, "shape": list(array.shape), "dtype": array.dtype.str}
        return key

    def encode(self, value: Any, path: str) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, np.ndarray):
            return {"$type": "array", "key": self._store(value, path)}
        if isinstance(value, np.generic):
            return {"$type": "scalar", "key": self._store(np.asarray(value), path)}
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            value = float(value)
            return value if math.isfinite(value) else {"$type": "float", "value": repr(value)}
        if isinstance(value, collections.Counter):
            return {"$type": "counter",
                    "items": [[self._encode_key(k, path), self.encode(v, _join(path, k))]
                              for k, v in value.items()]}
        if isinstance(value, Mapping):
            if all(isinstance(k, str) for k in value) and "$type" not in value:
                return {k: self.encode(v, _join(path, k)) for k, v in value.items()}
            return {"$type": "dict",
                    "items": [[self._encode_key(k, path), self.encode(v, _join(path, k))]
                              for k, v in value.items()]}
        if isinstance(value, tuple):
            return {"$type": "tuple", "items": [self.encode(v, _join(path, i)) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, _join(path, i)) for i, v in enumerate(value)]
        if _has_state(value):
            return {"$type": "object", "class": type(value).__name__,
                    "state": self.encode(value.state_dict(), path)}
        raise TypeError(f"fastbn.save: {path or '<root>'}: cannot store a value of type "
                        f"{type(value).__name__} (supported: objects with state_dict(), dicts, "
                        "lists, tuples, None, bool, int, float, str, numpy arrays and scalars)")

    def _encode_key(self, key: Any, path: str) -> Any:
        if key is None or isinstance(key, (bool, str, int, float, tuple, np.generic)):
            return self.encode(key, path)
        raise TypeError(f"fastbn.save: {path or '<root>'}: cannot store a dict key of type "
                        f"{type(key).__name__} (supported: None, bool, int, float, str, tuple, numpy scalars)")


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


# section: decoding -------------------------------------------------------------


class _Decoder:
    """Turns a JSON node back into Python values, objects into state dicts."""

    def __init__(self, arrays: Dict[str, np.ndarray], where: str) -> None:
        self.arrays = arrays
        self.where = where
        self.used: set = set()

    def _fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: {message}")

    def _array(self, node: dict) -> np.ndarray:
        key = node.get("key")
        if key not in self.arrays:
            raise self._fail(f"the manifest refers to a missing array entry {key!r}")
        self.used.add(key)
        return self.arrays[key]

    def decode_root(self, node: Any) -> Any:
        """The root: an object becomes a ``_SavedObject``, and so does each
        object directly inside a root dict (the entries `load_into` restores)."""
        if isinstance(node, dict) and "$type" not in node:
            return {key: self.decode(value, objects=True) for key, value in node.items()}
        if isinstance(node, dict) and node.get("$type") == "dict":
            return {self._key(k): self.decode(v, objects=True) for k, v in self._items(node, pairs=True)}
        return self.decode(node, objects=True)

    def decode(self, node: Any, objects: bool = False) -> Any:
        """With `objects`, an ``object`` node becomes ``_SavedObject``; else
        (and always below it) its state."""
        if node is None or isinstance(node, (bool, str, int, float)):
            return node
        if isinstance(node, list):
            return [self.decode(item) for item in node]
        if not isinstance(node, dict):
            raise self._fail(f"unexpected manifest value of type {type(node).__name__}")
        if "$type" not in node:
            return {key: self.decode(value) for key, value in node.items()}
        kind = node["$type"]
        if kind == "array":
            return self._array(node)
        if kind == "scalar":
            array = self._array(node)
            if array.ndim != 0:
                raise self._fail(f"scalar entry {node['key']!r} has shape {array.shape}, expected ()")
            return array[()]
        if kind == "float":
            if node.get("value") not in ("inf", "-inf", "nan"):
                raise self._fail(f"bad non-finite float {node.get('value')!r}")
            return float(node["value"])
        if kind == "tuple":
            return tuple(self.decode(item) for item in self._items(node, pairs=False))
        if kind in ("dict", "counter"):
            pairs = [(self._key(k), self.decode(v)) for k, v in self._items(node, pairs=True)]
            return collections.Counter(dict(pairs)) if kind == "counter" else dict(pairs)
        if kind == "object":
            if not isinstance(node.get("class"), str) or "state" not in node:
                raise self._fail("an object entry needs a 'class' name and a 'state'")
            state = self.decode(node["state"])
            return _SavedObject(node["class"], state) if objects else state
        raise self._fail(f"unknown manifest $type {kind!r}")

    def _items(self, node: dict, pairs: bool) -> list:
        items = node.get("items")
        if not isinstance(items, list) or (pairs and not all(
                isinstance(item, list) and len(item) == 2 for item in items)):
            raise self._fail(f"malformed {node['$type']!r} entry in the manifest")
        return items

    def _key(self, node: Any) -> Any:
        key = self.decode(node)
        if isinstance(key, (list, dict, np.ndarray)):
            raise self._fail(f"a dict key cannot be a {type(key).__name__}")
        return key


class _SavedObject:
    """An object's state in a checkpoint, with the name of its class."""

    __slots__ = ("class_name", "state")

    def __init__(self, class_name: str, state: Any) -> None:
        self.class_name = class_name
        self.state = state


def _unwrap(value: Any) -> Any:
    if isinstance(value, _SavedObject):
        return value.state
    if type(value) is dict:  # the root dict (Counters and deeper dicts hold no objects)
        return {key: _unwrap(item) for key, item in value.items()}
    return value


# section: atomic write ---------------------------------------------------------


def _new_file_mode(path: str) -> int:
    """The mode the checkpoint keeps: the old file's, or 0o666 minus the umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        pass
    try:  # reading the umask without changing it (Linux >= 4.7)
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    return 0o644


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_archive(file, entries: Dict[str, np.ndarray], compress: bool) -> None:
    writer = np.savez_compressed if compress else np.savez
    writer(file, allow_pickle=False, **entries)


def _atomic_write(path: str, entries: Dict[str, np.ndarray], compress: bool) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    mode = _new_file_mode(path)
    fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                     dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            _write_archive(file, entries, compress)
            file.flush()
            os.fchmod(file.fileno(), mode)
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)


# section: public API -------------------------------------------------------------


def save(path: PathLike, obj: Any, *, compress: bool = False) -> None:
    """Write a checkpoint of `obj` to `path`, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination, used as given (no suffix is appended). An existing file
        is replaced only once the new checkpoint is completely on disk.
    obj : object with state_dict(), or dict
        A module, optimizer or scheduler, or a dict mapping names to such
        objects and/or plain data (numbers, strings, arrays, nested
        dicts/lists/tuples); see the module docstring.
    compress : bool, default False
        Deflate the archive (smaller, slower).

    Raises
    ------
    TypeError
        A value that cannot be stored (the message gives its path).
    """
    path = os.fspath(path)
    encoder = _Encoder()
    root = encoder.encode(obj, "")
    manifest = {"format": FORMAT, "version": VERSION, "fastbn_version": _fastbn_version(),
                "root": root, "arrays": encoder.records}
    text = json.dumps(manifest, allow_nan=False, separators=(",", ":"))
    entries = dict(encoder.arrays)
    entries[MANIFEST_ENTRY] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    _atomic_write(path, entries, compress)


def load(path: PathLike) -> Any:
    """Read a checkpoint written by :func:`save`.

    Returns the saved structure with every object replaced by its state dict
    (a module's ``{name: array}``, an optimizer's ``{"state", "param_groups"}``,
    a scheduler's attributes), ready for ``load_state_dict``.

    Raises
    ------
    CheckpointError
        Not a fastbn checkpoint, truncated or inconsistent.
    FileNotFoundError
    """
    return _unwrap(_read(os.fspath(path)))


def load_into(path: PathLike, target: Any, *, strict: bool = True) -> Any:
    """Restore the objects of a checkpoint in place, after checking them all.

    Parameters
    ----------
    path : str or os.PathLike
    target : object with load_state_dict(), or dict of them
        An object when the checkpoint holds one object; otherwise a dict
        mapping checkpoint entry names to the objects to restore (every name
        must be in the checkpoint).
    strict : bool, default True
        Also require every object of the checkpoint to be restored, and each
        state to have no name the target lacks. With False, such objects and
        names are ignored (a name the target needs but the checkpoint lacks
        is still an error).

    Returns
    -------
    The checkpoint's content as :func:`load` returns it (plain entries such
    as an epoch number included).

    Raises
    ------
    CheckpointError (ValueError)
        Missing or unexpected names, wrong shapes, unreadable file.
    TypeError
        A class or a dtype that differs from the target's.

    Notes
    -----
    Nothing is modified unless every check passes. Build schedulers on the
    optimizer before calling this (constructing a scheduler sets the
    optimizer's lr, which the checkpoint then restores).
    """
    path = os.fspath(path)
    saved = _read(path)
    if _has_state(target):
        if not isinstance(saved, _SavedObject):
            raise CheckpointError(f"{path}: the checkpoint holds a {type(saved).__name__}, not one "
                                  "object: pass a dict of objects to restore")
        pairs = [("<root>", target, saved)]
    elif isinstance(target, Mapping):
        if not isinstance(saved, dict):
            raise CheckpointError(f"{path}: the checkpoint holds a single object, not named "
                                  "entries: pass the object itself")
        pairs = _pair_entries(path, saved, target, strict)
    else:
        raise TypeError(f"fastbn.load_into: target: expected an object with load_state_dict() or "
                        f"a dict of them, got {type(target).__name__}")
    states = [(name, obj, _checked_state(f"{path}: {name}", obj, entry, strict))
              for name, obj, entry in pairs]
    _apply(states)
    return _unwrap(saved)


# section: load helpers -----------------------------------------------------------


def _fastbn_version() -> str:
    try:
        from . import __version__
        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


def _read(path: str) -> Any:
    try:
        archive = np.load(path, allow_pickle=False)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise CheckpointError(f"{path}: not a readable fastbn checkpoint ({error})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{path}: not a fastbn checkpoint (a single .npy array, not an archive)")
    with archive:
        try:
            names = set(archive.files)
            if MANIFEST_ENTRY not in names:
                raise CheckpointError(f"{path}: not a fastbn checkpoint (no {MANIFEST_ENTRY!r} entry)")
            manifest = _parse_manifest(path, archive[MANIFEST_ENTRY])
            records = manifest["arrays"]
            unexpected = sorted(names - set(records) - {MANIFEST_ENTRY})
            if unexpected:
                raise CheckpointError(f"{path}: entries not listed in the manifest: {unexpected}")
            arrays = {key: _checked_array(path, key, archive, record) for key, record in records.items()}
        except CheckpointError:
            raise
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as error:
            raise CheckpointError(f"{path}: corrupt checkpoint ({type(error).__name__}: {error})") from None
    decoder = _Decoder(arrays, path)
    try:
        root = decoder.decode_root(manifest["root"])
    except RecursionError:
        raise CheckpointError(f"{path}: the manifest is nested too deeply") from None
    unused = sorted(set(arrays) - decoder.used, key=lambda key: int(key[1:]) if key[1:].isdigit() else -1)
    if unused:
        raise CheckpointError(f"{path}: arrays listed in the manifest but not used: {unused}")
    return root


def _parse_manifest(path: str, raw: np.ndarray) -> dict:
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise CheckpointError(f"{path}: the manifest entry must be a 1-D uint8 array, got "
                              f"dtype {raw.dtype} and shape {raw.shape}")
    try:
        manifest = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(f"{path}: the manifest is not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fastbn checkpoint (manifest format "
                              f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path}: bad checkpoint version {version!r}")
    if version > VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version} is newer than this "
                              f"fastbn understands ({VERSION}); upgrade fastbn")
    if "root" not in manifest or not isinstance(manifest.get("arrays"), dict):
        raise CheckpointError(f"{path}: the manifest needs 'root' and 'arrays' entries")
    return manifest


def _checked_array(path: str, key: str, archive, record: Any) -> np.ndarray:
    if not isinstance(record, dict) or not {"shape", "dtype"} <= set(record):
        raise CheckpointError(f"{path}: malformed manifest record for array {key!r}")
    if key not in archive.files:
        raise CheckpointError(f"{path}: array entry {key!r} ({record.get('path')}) is missing")
    array = archive[key]
    where = f"{path}: array {key!r} ({record.get('path') or '<root>'})"
    if list(array.shape) != list(record["shape"]):
        raise CheckpointError(f"{where}: shape {array.shape} differs from the manifest's "
                              f"{tuple(record['shape'])}")
    if array.dtype.str != record["dtype"]:
        raise CheckpointError(f"{where}: dtype {array.dtype.str} differs from the manifest's "
                              f"{record['dtype']}")
    if array.dtype.kind not in _ARRAY_KINDS:
        raise CheckpointError(f"{where}: unsupported dtype {array.dtype}")
    return array


def _pair_entries(path: str, saved: dict, target: Mapping, strict: bool) -> List[Tuple[str, Any, _SavedObject]]:
    pairs = []
    missing = [name for name in target if name not in saved]
    if missing:
        raise CheckpointError(f"{path}: no entry named {missing} in the checkpoint "
                              f"(it has {sorted(map(str, saved))})")
    for name, obj in target.items():
        if not _has_state(obj):
            raise TypeError(f"fastbn.load_into: target[{name!r}]: expected an object with "
                            f"load_state_dict(), got {type(obj).__name__}")
        entry = saved[name]
        if not isinstance(entry, _SavedObject):
            raise CheckpointError(f"{path}: entry {name!r} is plain data ({type(entry).__name__}), "
                                  "not the state of an object")
        pairs.append((repr(name), obj, entry))
    if strict:
        left = [name for name, entry in saved.items() if isinstance(entry, _SavedObject) and name not in target]
        if left:
            raise CheckpointError(f"{path}: objects {left} of the checkpoint have no target "
                                  "(pass them too, or strict=False)")
    return pairs


def _checked_state(where: str, obj: Any, entry: _SavedObject, strict: bool) -> Any:
    """The state to pass to ``obj.load_state_dict`` once it matches `obj`
    (without `strict`, names `obj` does not have are left out)."""
    if entry.class_name != type(obj).__name__:
        raise TypeError(f"{where}: saved from a {entry.class_name}, cannot be loaded into a "
                        f"{type(obj).__name__}")
    saved = entry.state
    if _is_optimizer_state(saved) and hasattr(obj, "param_groups"):
        _check_optimizer_state(where, obj, saved)
        return saved
    current = obj.state_dict()
    _compare(where, saved, current, strict)
    if not strict and isinstance(saved, dict) and isinstance(current, Mapping):
        return {key: value for key, value in saved.items() if key in current}
    return saved


def _is_optimizer_state(state: Any) -> bool:
    return isinstance(state, dict) and set(state) == {"state", "param_groups"}


def _check_optimizer_state(where: str, optimizer: Any, saved: dict) -> None:
    """Groups and parameter counts match; every saved state array has its
    parameter's shape and dtype (state entries need not exist yet)."""
    groups, saved_groups = optimizer.param_groups, saved["param_groups"]
    if not isinstance(saved_groups, list) or len(saved_groups) != len(groups):
        raise CheckpointError(f"{where}: {len(saved_groups) if isinstance(saved_groups, list) else '?'} "
                              f"parameter groups saved, the optimizer has {len(groups)}")
    param_of: Dict[Any, Any] = {}
    for index, (saved_group, group) in enumerate(zip(saved_groups, groups)):
        saved_params = saved_group.get("params") if isinstance(saved_group, dict) else None
        if not isinstance(saved_params, list) or len(saved_params) != len(group["params"]):
            raise CheckpointError(
                f"{where}: param_groups[{index}] has {len(saved_params) if isinstance(saved_params, list) else '?'} "
                f"parameters saved, the optimizer's has {len(group['params'])}")
        param_of.update(zip(saved_params, group["params"]))
    state = saved["state"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: 'state' must be a dict, got {type(state).__name__}")
    for index, entry in state.items():
        if index not in param_of:
            raise CheckpointError(f"{where}: state[{index!r}] matches no saved parameter index")
        data = param_of[index].data
        for key, value in (entry.items() if isinstance(entry, dict) else ()):
            if isinstance(value, np.ndarray) and value.ndim > 0:
                name = f"{where}: state[{index!r}][{key!r}]"
                if value.shape != data.shape:
                    raise CheckpointError(f"{name}: shape {value.shape} saved, the parameter has "
                                          f"shape {data.shape}")
                if value.dtype != data.dtype:
                    raise TypeError(f"{name}: dtype {value.dtype} saved, the parameter has dtype "
                                    f"{data.dtype} (fastbn never casts silently)")


def _is_structure(value: Any) -> bool:
    return isinstance(value, (dict, list, tuple, np.ndarray))


def _compare(where: str, saved: Any, current: Any, strict: bool) -> None:
    """Names, shapes and dtypes of `saved` against the target's current state."""
    if saved is None or current is None:
        return
    if isinstance(current, np.ndarray) or isinstance(saved, np.ndarray):
        if not (isinstance(current, np.ndarray) and isinstance(saved, np.ndarray)):
            raise CheckpointError(f"{where}: saved {type(saved).__name__}, the target has "
                                  f"{type(current).__name__}")
        if saved.shape != current.shape:
            raise CheckpointError(f"{where}: shape {saved.shape} saved, the target has {current.shape}")
        if saved.dtype != current.dtype:
            raise TypeError(f"{where}: dtype {saved.dtype} saved, the target has {current.dtype} "
                            "(fastbn never casts silently)")
        return
    if isinstance(current, Mapping):
        if not isinstance(saved, Mapping):
            raise CheckpointError(f"{where}: saved {type(saved).__name__}, the target has a dict")
        missing = [key for key in current if key not in saved]
        unexpected = [key for key in saved if key not in current]
        if missing or (strict and unexpected):
            details = []
            if missing:
                details.append(f"missing {missing}")
            if strict and unexpected:
                details.append(f"unexpected {unexpected}")
            raise CheckpointError(f"{where}: names differ from the target's: {'; '.join(details)}")
        for key in current:
            _compare(f"{where}[{key!r}]", saved[key], current[key], strict)
        return
    if isinstance(current, (list, tuple)) and any(_is_structure(item) for item in current):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(current):
            raise CheckpointError(f"{where}: {len(saved) if isinstance(saved, (list, tuple)) else type(saved).__name__} "
                                  f"items saved, the target has {len(current)}")
        for index, (saved_item, current_item) in enumerate(zip(saved, current)):
            _compare(f"{where}[{index}]", saved_item, current_item, strict)


def _apply(pairs: List[Tuple[str, Any, Any]]) -> None:
    """load_state_dict on every object; roll back the earlier ones if one fails."""
    done: List[Tuple[Any, Any]] = []
    for _name, obj, state in pairs:
        previous = copy.deepcopy(obj.state_dict())
        try:
            obj.load_state_dict(state)
        except BaseException:
            for restored, state in reversed(done):
                restored.load_state_dict(state)
            raise
        done.append((obj, previous))
