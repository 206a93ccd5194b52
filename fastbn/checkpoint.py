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
``bfloat16``   ``{"key": "a5"}``: an ml_dtypes bfloat16 array (bfloat16
               optimizer state), stored as its uint16 bit patterns
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

Temporary files are named ``.NAME.xxxxxxxx.tmp`` (8 hex digits; for a NAME
so long that this would exceed the file system's name limit, NAME is
shortened and followed by ``~`` and a hash of the full name). A save holds
an exclusive :func:`fcntl.flock` lock on its temporary file from creation
until after the rename. After a successful save, temporary files of the same
target that a killed save left behind are deleted: only regular files with
exactly that name pattern, owned by the current user, and not locked (so
never the file of a save still running, in this process or another). Where
locks are not available (Windows, file systems without ``flock``) nothing
is cleaned up.

A value that contains itself (a dict holding itself, directly or deeper)
cannot be saved: :class:`CheckpointError` names both places of the cycle.

Loading never executes code from the file: the zip directory and every
``.npy`` header are parsed by fastbn with bounded sizes (headers are
literals read with :func:`ast.literal_eval`, never pickle), the manifest
with :func:`json.loads`, class names are only compared as strings. Every
entry's header is read and compared with the manifest (shape and dtype) and
with the entry's size before any data is read, and no more data than the
header declares is ever decompressed, so a small file cannot make the loader
allocate much more than the arrays it declares (a "decompression bomb").
Any file that is not a well-formed fastbn checkpoint (truncated, bit flips,
unknown compression or encryption, duplicate or unexpected entries, bad
headers, entries that disagree with the manifest) raises
:class:`CheckpointError` (a ValueError) and nothing else.

:func:`load_into` checks the checkpoint against the objects it restores
before changing any of them, and before reading any array data (the checks
first run on placeholders with the saved shapes and dtypes): class names
(TypeError), entry and state names (missing or unexpected: CheckpointError),
array shapes (CheckpointError) and dtypes (TypeError: no silent casts, as
everywhere in fastbn). Optimizer state is checked by the optimizer's own
``check_state_dict`` (the rules ``load_state_dict`` applies); a bad value
there (a negative or fractional ``step``, say) is a CheckpointError, a
state array of another precision than its parameter a TypeError. If an
object's own ``load_state_dict`` still fails, the objects restored before it
are rolled back to their previous state.
"""
from __future__ import annotations

import ast
import collections
import copy
import hashlib
import json
import math
import os
import secrets
import stat
import struct
import zipfile
import zlib
from typing import Any, Dict, List, Mapping, Tuple, Union

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
        # id -> path of every container being encoded (the current branch),
        # to name a cycle instead of recursing until RecursionError.
        self.open_containers: Dict[int, str] = {}

    def _store(self, array: np.ndarray, path: str) -> str:
        if array.dtype.kind not in _ARRAY_KINDS or array.dtype.fields is not None:
            raise TypeError(f"fastbn.save: {path or '<root>'}: cannot store an array of dtype "
                            f"{array.dtype} (only bool, integer, float and complex arrays)")
        key = f"a{len(self.arrays)}"
        self.arrays[key] = array
        self.records[key] = {"path": path, "shape": list(array.shape), "dtype": array.dtype.str}
        return key

    def encode(self, value: Any, path: str) -> Any:
        if not isinstance(value, (Mapping, list, tuple)):
            return self._encode(value, path)
        key = id(value)
        if key in self.open_containers:
            raise CheckpointError(f"fastbn.save: {path or '<root>'}: the value contains itself "
                                  f"(it is {self.open_containers[key] or '<root>'}, which holds it): "
                                  "cannot store a cycle")
        self.open_containers[key] = path
        try:
            return self._encode(value, path)
        finally:
            del self.open_containers[key]

    def _encode(self, value: Any, path: str) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, np.ndarray) and _is_bfloat16(value.dtype):
            # .npy has no bfloat16: its bits are stored as uint16, tagged.
            return {"$type": "bfloat16", "key": self._store(value.view(np.uint16), path)}
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


def _is_bfloat16(dtype: np.dtype) -> bool:
    """ml_dtypes' bfloat16, recognized without importing ml_dtypes."""
    return dtype.kind == "V" and dtype.itemsize == 2 and dtype.name == "bfloat16"


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
        if kind == "bfloat16":
            array = self._array(node)
            if array.dtype != np.uint16:
                raise self._fail(f"bfloat16 entry {node['key']!r} is stored as {array.dtype}, expected uint16")
            from .optim._bf16 import bfloat16  # ml_dtypes, imported only when needed
            return array.view(bfloat16())
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

try:  # POSIX advisory locks mark the temporary files of saves in progress
    import fcntl
except ImportError:  # pragma: no cover - Windows: no stale-file cleanup
    fcntl = None

#: The name part tempfile would randomize; ours is 8 lowercase hex digits.
_RANDOM_HEX = 8
_TEMP_SUFFIX = ".tmp"


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


def _name_max(directory: str) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def _temp_prefix(directory: str, name: str) -> str:
    """The start of every temporary file name of target `name`:
    ``.NAME.`` or, when ``.NAME.xxxxxxxx.tmp`` would exceed the directory's
    name limit, ``.TRUNCATED~HASH.`` (the hash keeps long names that share
    a beginning apart)."""
    encoded = os.fsencode(name)
    fixed = len(b"..") + _RANDOM_HEX + len(_TEMP_SUFFIX)
    limit = _name_max(directory)
    if len(encoded) + fixed <= limit:
        return f".{name}."
    digest = hashlib.sha256(encoded).hexdigest()[:16]
    keep = max(limit - fixed - 1 - len(digest), 1)
    return "." + os.fsdecode(encoded[:keep]) + "~" + digest + "."


def _is_temp_name(name: str, prefix: str) -> bool:
    middle = name[len(prefix):-len(_TEMP_SUFFIX)]
    return (name.startswith(prefix) and name.endswith(_TEMP_SUFFIX) and len(middle) == _RANDOM_HEX
            and all(char in "0123456789abcdef" for char in middle))


def _create_temporary(directory: str, prefix: str) -> Tuple[int, str, bool]:
    """A new temporary file, open and (where possible) locked by us; the
    last item tells whether it is locked.

    The lock marks it as in use for the stale-file cleanup of other saves. A
    cleaner could unlink it in the instant between creation and locking; the
    link count tells, and we start over with a new name."""
    flags = (os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
             | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    while True:
        temporary = os.path.join(directory, f"{prefix}{secrets.token_hex(_RANDOM_HEX // 2)}{_TEMP_SUFFIX}")
        try:
            fd = os.open(temporary, flags, 0o600)
        except FileExistsError:
            continue
        if fcntl is None:
            return fd, temporary, False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # a file system without locks (some network mounts)
                return fd, temporary, False
            if os.fstat(fd).st_nlink > 0:
                return fd, temporary, True
        except BaseException:
            os.close(fd)
            _unlink_quietly(temporary)
            raise
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_stale_temporaries(directory: str, prefix: str) -> List[str]:
    """Delete the temporary files that saves of the same target left behind
    when they were killed; return their names.

    Only regular files named like our temporaries (`prefix`, 8 hex digits,
    ``.tmp``), owned by this user and not locked: a save in progress holds
    an exclusive lock on its temporary file until it has been renamed, so a
    file we can lock belongs to no running save. Never raises OSError: the
    save itself has already succeeded."""
    removed: List[str] = []
    if fcntl is None:
        return removed
    try:
        names = [name for name in os.listdir(directory) if _is_temp_name(name, prefix)]
    except OSError:
        return removed
    uid = os.getuid()
    for name in names:
        path = os.path.join(directory, name)
        try:
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != uid:
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            opened, current = os.fstat(fd), os.lstat(path)
            if (opened.st_ino, opened.st_dev) == (current.st_ino, current.st_dev):
                os.unlink(path)
                removed.append(name)
        except OSError:  # locked by a save in progress, or gone meanwhile
            pass
        finally:
            os.close(fd)
    return removed


def _atomic_write(path: str, entries: Dict[str, np.ndarray], compress: bool) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    mode = _new_file_mode(path)
    prefix = _temp_prefix(directory, os.path.basename(path))
    fd, temporary, locked = _create_temporary(directory, prefix)
    # The file stays open (and locked) until after the rename, so no other
    # save's cleanup can take it for a leftover while it is being written.
    file = os.fdopen(fd, "wb")
    try:
        try:
            _write_archive(file, entries, compress)
            file.flush()
            os.fchmod(file.fileno(), mode)
            os.fsync(file.fileno())
            if fcntl is None:  # Windows cannot rename an open file (and has no lock to keep)
                file.close()
            os.replace(temporary, path)
        except BaseException:
            _unlink_quietly(temporary)
            raise
    finally:
        file.close()
    _fsync_directory(directory)
    if locked:  # without locks, a leftover and a running save look the same
        _remove_stale_temporaries(directory, prefix)


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
    CheckpointError
        A value that contains itself, or is nested too deeply to store.
    """
    path = os.fspath(path)
    encoder = _Encoder()
    try:
        root = encoder.encode(obj, "")
        manifest = {"format": FORMAT, "version": VERSION, "fastbn_version": _fastbn_version(),
                    "root": root, "arrays": encoder.records}
        text = json.dumps(manifest, allow_nan=False, separators=(",", ":"))
    except RecursionError:
        raise CheckpointError(f"fastbn.save: {path}: the value is nested too deeply to store "
                              "(or an object's state_dict() contains itself)") from None
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
    path = os.fspath(path)
    with _Archive(path) as archive:
        return _unwrap(_decode(path, archive.manifest, archive.arrays()))


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
        Missing or unexpected names, wrong shapes, a bad optimizer state
        value, an unreadable or corrupt file.
    TypeError
        A class or a dtype that differs from the target's.

    Notes
    -----
    Nothing is modified unless every check passes. Build schedulers on the
    optimizer before calling this (constructing a scheduler sets the
    optimizer's lr, which the checkpoint then restores).
    """
    path = os.fspath(path)
    if not (_has_state(target) or isinstance(target, Mapping)):
        raise TypeError(f"fastbn.load_into: target: expected an object with load_state_dict() or "
                        f"a dict of them, got {type(target).__name__}")
    with _Archive(path) as archive:
        # Every check runs first on arrays that have the saved shapes and
        # dtypes but no data, so a file that does not fit the target is
        # refused before anything large is read; then again on the data.
        _checked_states(path, _decode(path, archive.manifest, archive.placeholders()), target, strict)
        saved = _decode(path, archive.manifest, archive.arrays())
    _apply(_checked_states(path, saved, target, strict))
    return _unwrap(saved)


def _checked_states(path: str, saved: Any, target: Any, strict: bool) -> List[Tuple[str, Any, Any]]:
    """(name, object, state to load) for every object `target` restores."""
    if _has_state(target):
        if not isinstance(saved, _SavedObject):
            raise CheckpointError(f"{path}: the checkpoint holds a {type(saved).__name__}, not one "
                                  "object: pass a dict of objects to restore")
        pairs = [("<root>", target, saved)]
    else:
        if not isinstance(saved, dict):
            raise CheckpointError(f"{path}: the checkpoint holds a single object, not named "
                                  "entries: pass the object itself")
        pairs = _pair_entries(path, saved, target, strict)
    return [(name, obj, _checked_state(f"{path}: {name}", obj, entry, strict))
            for name, obj, entry in pairs]


# section: load helpers -----------------------------------------------------------


def _fastbn_version() -> str:
    try:
        from . import __version__
        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


#: Largest .npy header read (NumPy's own limit): a longer one is refused
#: before it is read.
_MAX_HEADER_BYTES = 10000
#: Largest manifest read (its JSON text); larger ones are refused unread.
_MAX_MANIFEST_BYTES = 1 << 28
#: Deflate cannot expand data more than 1032-fold; a member claiming more
#: than that over its compressed size is refused before anything is
#: allocated for it.
_DEFLATE_MAX_RATIO = 1032
#: Bytes decompressed per read (bounds the memory a read needs beyond the
#: array it fills).
_CHUNK_BYTES = 1 << 20
_NPY_MAGIC = b"\x93NUMPY"
_NPY_SUFFIX = ".npy"
_ZIP_FLAG_ENCRYPTED = 0x1


class _Member:
    """One ``.npy`` entry of the archive, its header read and checked."""

    __slots__ = ("info", "key", "shape", "dtype", "fortran", "header_bytes")

    def __init__(self, info: zipfile.ZipInfo, key: str, shape: Tuple[int, ...], dtype: np.dtype,
                 fortran: bool, header_bytes: int) -> None:
        self.info, self.key, self.shape, self.dtype = info, key, shape, dtype
        self.fortran, self.header_bytes = fortran, header_bytes

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class _Archive:
    """A checkpoint file opened for reading.

    Opening reads and checks everything but the array data: the zip
    directory (no duplicate, encrypted or oddly compressed entries), the
    manifest, and the ``.npy`` header of every entry against the manifest
    and against the entry's size. `placeholders` then gives arrays of the
    right shapes and dtypes that take no memory (to check against a target
    before reading anything large), `arrays` reads the data, never more
    bytes per entry than its header declares.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path, "rb") as file:
                start = file.read(len(_NPY_MAGIC))
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            raise
        except OSError as error:
            raise CheckpointError(f"{path}: not a readable fastbn checkpoint ({error})") from None
        if start == _NPY_MAGIC:
            raise CheckpointError(f"{path}: not a fastbn checkpoint (a single .npy array, not an archive)")
        try:
            self.zip = zipfile.ZipFile(path)
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            raise
        except Exception as error:  # any failure to parse the directory means a corrupt file
            raise CheckpointError(f"{path}: not a readable fastbn checkpoint "
                                  f"({type(error).__name__}: {error})") from None
        try:
            self.file_size = os.fstat(self.zip.fp.fileno()).st_size
            self._open()
        except BaseException:
            self.zip.close()
            raise

    def __enter__(self) -> "_Archive":
        return self

    def __exit__(self, *exc_info) -> None:
        self.zip.close()

    def _fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {message}")

    def _open(self) -> None:
        infos: Dict[str, zipfile.ZipInfo] = {}
        for info in self.zip.infolist():
            name = info.filename
            if name in infos:
                raise self._fail(f"entry {name!r} appears more than once in the archive")
            if info.flag_bits & _ZIP_FLAG_ENCRYPTED:
                raise self._fail(f"entry {name!r} is encrypted")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise self._fail(f"entry {name!r} uses compression method {info.compress_type} "
                                 "(a checkpoint is stored or deflated)")
            if not name.endswith(_NPY_SUFFIX):
                raise self._fail(f"entry {name!r} is not a .npy array")
            infos[name] = info
        keys = {name[:-len(_NPY_SUFFIX)]: info for name, info in infos.items()}
        if MANIFEST_ENTRY not in keys:
            raise self._fail(f"not a fastbn checkpoint (no {MANIFEST_ENTRY!r} entry)")
        manifest_member = self._member(MANIFEST_ENTRY, keys[MANIFEST_ENTRY])
        if manifest_member.dtype != np.uint8 or len(manifest_member.shape) != 1:
            raise self._fail(f"the manifest entry must be a 1-D uint8 array, got dtype "
                             f"{manifest_member.dtype} and shape {manifest_member.shape}")
        if manifest_member.nbytes > _MAX_MANIFEST_BYTES:
            raise self._fail(f"the manifest declares {manifest_member.nbytes} bytes, more than "
                             f"the {_MAX_MANIFEST_BYTES} a checkpoint may have")
        self.manifest = _parse_manifest(self.path, self._data(manifest_member))
        records = self.manifest["arrays"]
        unexpected = sorted(set(keys) - set(records) - {MANIFEST_ENTRY})
        if unexpected:
            raise self._fail(f"entries not listed in the manifest: {unexpected}")
        self.members: Dict[str, _Member] = {}
        for key, record in records.items():
            if key == MANIFEST_ENTRY:
                raise self._fail(f"the manifest lists its own entry {key!r} as an array")
            where = f"array {key!r} ({_record_path(record)})"
            shape, dtype = _record_layout(self.path, where, record)
            if key not in keys:
                raise self._fail(f"{where} is missing")
            member = self._member(key, keys[key])
            if member.shape != shape:
                raise self._fail(f"{where}: shape {member.shape} differs from the manifest's {shape}")
            if member.dtype.str != dtype:
                raise self._fail(f"{where}: dtype {member.dtype.str} differs from the manifest's {dtype}")
            self.members[key] = member

    def _member(self, key: str, info: zipfile.ZipInfo) -> _Member:
        """Read and check the header of one entry (not its data)."""
        where = f"entry {info.filename!r}"
        try:
            with self.zip.open(info) as stream:
                shape, dtype, fortran, header_bytes = _read_npy_header(stream)
        except CheckpointError as error:
            raise self._fail(f"{where}: {error}") from None
        except Exception as error:  # the header is at most a few KB: any failure is corruption
            raise self._fail(f"{where}: unreadable .npy header ({type(error).__name__}: {error})") from None
        member = _Member(info, key, shape, dtype, fortran, header_bytes)
        size = header_bytes + member.nbytes
        if size != info.file_size:
            raise self._fail(f"{where}: its header declares {size} bytes, the archive "
                             f"{info.file_size}")
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise self._fail(f"{where}: stored uncompressed in {info.compress_size} bytes "
                             f"but declares {info.file_size}")
        if info.compress_type == zipfile.ZIP_DEFLATED and \
                info.file_size > _DEFLATE_MAX_RATIO * info.compress_size + _CHUNK_BYTES:
            raise self._fail(f"{where}: declares {info.file_size} bytes, more than deflate can "
                             f"expand {info.compress_size} compressed bytes to")
        if info.header_offset + info.compress_size > self.file_size:
            raise self._fail(f"{where}: extends past the end of the file")
        return member

    def _data(self, member: _Member) -> np.ndarray:
        """The array of one entry: exactly the bytes its header declares."""
        where = f"entry {member.info.filename!r}"
        shape = member.shape[::-1] if member.fortran else member.shape
        array = np.empty(shape, member.dtype)
        flat = memoryview(array.reshape(-1).view(np.uint8))
        try:
            with self.zip.open(member.info) as stream:
                stream.read(member.header_bytes)
                filled = 0
                while filled < len(flat):
                    count = stream.readinto(flat[filled:filled + _CHUNK_BYTES])
                    if not count:
                        raise self._fail(f"{where}: truncated ({filled} of {len(flat)} data bytes)")
                    filled += count
                if stream.read(1):
                    raise self._fail(f"{where}: longer than its header declares")
        except CheckpointError:
            raise
        except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as error:
            raise self._fail(f"{where}: corrupt data ({type(error).__name__}: {error})") from None
        return array.T if member.fortran else array

    def placeholders(self) -> Dict[str, np.ndarray]:
        """Read-only arrays of each entry's shape and dtype (zero strides: no memory)."""
        return {key: np.broadcast_to(np.zeros((), member.dtype), member.shape)
                for key, member in self.members.items()}

    def arrays(self) -> Dict[str, np.ndarray]:
        return {key: self._data(member) for key, member in self.members.items()}


def _read_npy_header(stream) -> Tuple[Tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, header size) of a ``.npy`` stream, read
    with bounded sizes; raises CheckpointError for anything unexpected."""
    magic = stream.read(len(_NPY_MAGIC) + 2)
    if len(magic) != len(_NPY_MAGIC) + 2 or magic[:len(_NPY_MAGIC)] != _NPY_MAGIC:
        raise CheckpointError("not a .npy array (bad magic string)")
    version = tuple(magic[len(_NPY_MAGIC):])
    if version not in ((1, 0), (2, 0)):
        raise CheckpointError(f".npy format version {version} (expected 1.0 or 2.0)")
    length_format = "<H" if version == (1, 0) else "<I"
    length_bytes = stream.read(struct.calcsize(length_format))
    if len(length_bytes) != struct.calcsize(length_format):
        raise CheckpointError("truncated .npy header")
    (length,) = struct.unpack(length_format, length_bytes)
    if length > _MAX_HEADER_BYTES:
        raise CheckpointError(f".npy header of {length} bytes (at most {_MAX_HEADER_BYTES})")
    text = stream.read(length)
    if len(text) != length:
        raise CheckpointError("truncated .npy header")
    header = ast.literal_eval(text.decode("latin1"))
    if not isinstance(header, dict) or set(header) != {"descr", "shape", "fortran_order"}:
        raise CheckpointError(f"malformed .npy header {text[:200]!r}")
    shape, descr, fortran = header["shape"], header["descr"], header["fortran_order"]
    if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
        raise CheckpointError(f"bad shape {shape!r} in the .npy header")
    if not isinstance(fortran, bool):
        raise CheckpointError(f"bad fortran_order {fortran!r} in the .npy header")
    if not isinstance(descr, str):
        raise CheckpointError(f"unsupported dtype {descr!r} (only bool, integer, float and complex)")
    dtype = np.dtype(descr)
    if dtype.kind not in _ARRAY_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise CheckpointError(f"unsupported dtype {dtype} (only bool, integer, float and complex)")
    return shape, dtype, fortran, len(magic) + len(length_bytes) + length


def _record_path(record: Any) -> str:
    path = record.get("path") if isinstance(record, dict) else None
    return path if isinstance(path, str) and path else "<root>"


def _record_layout(path: str, where: str, record: Any) -> Tuple[Tuple[int, ...], str]:
    """Shape and dtype string of a manifest record."""
    if not isinstance(record, dict) or not {"shape", "dtype"} <= set(record):
        raise CheckpointError(f"{path}: malformed manifest record for {where}")
    shape, dtype = record["shape"], record["dtype"]
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)) \
            or not isinstance(dtype, str):
        raise CheckpointError(f"{path}: malformed manifest record for {where}: shape {shape!r}, "
                              f"dtype {dtype!r}")
    return tuple(shape), dtype


def _decode(path: str, manifest: dict, arrays: Dict[str, np.ndarray]) -> Any:
    decoder = _Decoder(arrays, path)
    try:
        root = decoder.decode_root(manifest["root"])
    except RecursionError:
        raise CheckpointError(f"{path}: the manifest is nested too deeply") from None
    unused = sorted(set(arrays) - decoder.used, key=lambda key: (len(key), key))
    if unused:
        raise CheckpointError(f"{path}: arrays listed in the manifest but not used: {unused}")
    return root


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (fastbn writes non-finite floats as tagged objects)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of the float64 range")
    return value


def _parse_manifest(path: str, raw: np.ndarray) -> dict:
    try:
        manifest = json.loads(raw.tobytes().decode("utf-8"), parse_constant=_reject_constant,
                              parse_float=_finite_float)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError included
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
    if _is_optimizer_state(saved) and callable(getattr(obj, "check_state_dict", None)):
        return _checked_optimizer_state(where, obj, saved)
    current = obj.state_dict()
    _compare(where, saved, current, strict)
    if not strict and isinstance(saved, dict) and isinstance(current, Mapping):
        return {key: value for key, value in saved.items() if key in current}
    return saved


def _is_optimizer_state(state: Any) -> bool:
    return isinstance(state, dict) and set(state) == {"state", "param_groups"}


def _checked_optimizer_state(where: str, optimizer: Any, saved: dict) -> Any:
    """`optimizer.check_state_dict` (the one set of optimizer state rules)
    with the checkpoint's error types: a dtype that differs from the
    parameter's stays a TypeError, anything else is a CheckpointError."""
    from .optim.optimizer import _StateDtypeError

    try:
        return optimizer.check_state_dict(saved)
    except _StateDtypeError as error:
        raise _StateDtypeError(f"{where}: {error}") from None
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{where}: {error}") from None


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
