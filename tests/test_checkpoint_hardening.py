"""Checkpoint files crafted to attack or confuse the loader: every one is
refused with CheckpointError, quickly and without reading more than the
manifest declares; leftover temporary files of killed saves are cleaned up
without touching a save in progress; long names and cycles are handled."""
from __future__ import annotations

import errno
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
import warnings
import zipfile

import numpy as np
import pytest

import fastbn
from fastbn import checkpoint, optim
from fastbn.parameter import Parameter

fcntl = pytest.importorskip("fcntl")


# section: crafting archives -------------------------------------------------------


def npy_header(shape, descr="<f4", fortran=False, text=None, version=(1, 0)):
    """The bytes of a .npy header (magic, length, dict text), NumPy's layout."""
    if text is None:
        text = f"{{'descr': {descr!r}, 'fortran_order': {fortran}, 'shape': {tuple(shape)!r}, }}"
    body = text.encode("latin1")
    length_format = "<H" if version == (1, 0) else "<I"
    start = 6 + 2 + struct.calcsize(length_format)
    body += b" " * ((-(start + len(body) + 1)) % 64) + b"\n"
    return b"\x93NUMPY" + bytes(version) + struct.pack(length_format, len(body)) + body


def npy(array):
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def manifest(root, records):
    text = json.dumps({"format": checkpoint.FORMAT, "version": 1, "fastbn_version": "test",
                       "root": root, "arrays": records})
    return npy(np.frombuffer(text.encode(), np.uint8))


def weight_manifest(shape=(5, 4), dtype="<f4", key="a0", as_object=False):
    """A manifest of one array "w": plain data, or the state of a WeightHolder."""
    root = {"w": {"$type": "array", "key": key}}
    if as_object:
        root = {"$type": "object", "class": "WeightHolder", "state": root}
    return manifest(root, {key: {"path": "w", "shape": list(shape), "dtype": dtype}})


def write_zip(path, members, compression=zipfile.ZIP_STORED):
    """`members`: (name, bytes or an iterable of byte chunks)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        with zipfile.ZipFile(path, "w", compression=compression) as archive:
            for name, content in members:
                with archive.open(name, "w", force_zip64=True) as stream:
                    for chunk in ([content] if isinstance(content, bytes) else content):
                        stream.write(chunk)
    return path


def patch_zip_fields(path, local_offset, central_offset, change):
    """Apply `change(old) -> new` to a 16-bit field of every local and central header."""
    data = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", local_offset), (b"PK\x01\x02", central_offset)):
        start = data.find(signature)
        while start >= 0:
            (old,) = struct.unpack_from("<H", data, start + offset)
            struct.pack_into("<H", data, start + offset, change(old))
            start = data.find(signature, start + 4)
    path.write_bytes(bytes(data))


def refused_quickly(path, pattern, call=fastbn.load):
    """The load raises CheckpointError matching `pattern`; returns (seconds, peak bytes)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(checkpoint.CheckpointError, match=pattern):
            call(path)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return elapsed, peak


class WeightHolder:
    def __init__(self, shape=(5, 4)):
        self.w = np.zeros(shape, np.float32)

    def state_dict(self):
        return {"w": self.w}

    def load_state_dict(self, state):
        np.copyto(self.w, state["w"])


# section: decompression bomb (issue 17.10) ------------------------------------------

BOMB_ELEMENTS = 25_000_000  # 100 MB of float32 zeros, about 100 KB deflated


def zero_chunks(count, chunk=1 << 20):
    while count > 0:
        yield bytes(min(chunk, count))
        count -= chunk


def bomb(path, manifest_shape):
    return write_zip(path, [("__manifest__.npy", weight_manifest(manifest_shape, as_object=True)),
                            ("a0.npy", [npy_header((BOMB_ELEMENTS,)), *zero_chunks(4 * BOMB_ELEMENTS)])],
                     compression=zipfile.ZIP_DEFLATED)


def test_bomb_whose_header_disagrees_with_the_manifest_is_refused_before_decompressing(tmp_path):
    path = bomb(tmp_path / "bomb.ckpt", manifest_shape=(5, 4))
    assert path.stat().st_size < 4 * BOMB_ELEMENTS // 500  # really a bomb
    elapsed, peak = refused_quickly(path, r"array 'a0' \(w\): shape \(25000000,\) differs from the manifest's \(5, 4\)")
    assert elapsed < 1.0 and peak < 4 * BOMB_ELEMENTS // 50, (elapsed, peak)
    elapsed, peak = refused_quickly(path, "differs from the manifest",
                                    lambda p: fastbn.load_into(p, WeightHolder()))
    assert elapsed < 1.0 and peak < 4 * BOMB_ELEMENTS // 50, (elapsed, peak)


def test_consistent_bomb_is_refused_by_load_into_before_its_data_is_read(tmp_path):
    # manifest and header agree on 10**8 bytes; the target holds (5, 4): the
    # shapes are compared before a byte of data is decompressed.
    path = bomb(tmp_path / "bomb.ckpt", manifest_shape=(BOMB_ELEMENTS,))
    holder = WeightHolder()
    elapsed, peak = refused_quickly(
        path, r"\['w'\]: shape \(25000000,\) saved, the target has \(5, 4\)",
        lambda p: fastbn.load_into(p, holder))
    assert elapsed < 1.0 and peak < 4 * BOMB_ELEMENTS // 50, (elapsed, peak)
    assert not holder.w.any()


def test_member_declaring_a_trillion_elements_is_refused_without_allocating(tmp_path):
    shape = (10 ** 12,)
    path = write_zip(tmp_path / "huge.ckpt", [("__manifest__.npy", weight_manifest(shape)),
                                              ("a0.npy", npy_header(shape) + bytes(64))])
    elapsed, peak = refused_quickly(path, r"entry 'a0.npy': its header declares 4000000000\d* bytes")
    assert elapsed < 1.0 and peak < 1 << 20


def test_a_member_that_needs_more_than_deflate_can_expand_is_refused(tmp_path):
    # Header, manifest and zip directory all claim about 4 GB, backed by a few bytes.
    size = 2 ** 32 - 2
    header_length = len(npy_header((size,), "|u1"))
    shape = (size - header_length,)
    path = write_zip(tmp_path / "huge.ckpt", [("__manifest__.npy", weight_manifest(shape, "|u1")),
                                              ("a0.npy", npy_header(shape, "|u1") + bytes(64))],
                     compression=zipfile.ZIP_DEFLATED)
    data = bytearray(path.read_bytes())
    central = data.find(b"PK\x01\x02", data.find(b"PK\x01\x02") + 4)  # a0's directory record
    struct.pack_into("<L", data, central + 24, size)  # its uncompressed size
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as archive:
        assert archive.getinfo("a0.npy").file_size == size
    elapsed, peak = refused_quickly(path, "more than deflate can expand")
    assert elapsed < 1.0 and peak < 1 << 20


def test_an_honest_large_member_still_loads(tmp_path):
    # The bounds are not tighter than the format: all-zero arrays compress
    # about 1000-fold and must load.
    path = tmp_path / "zeros.ckpt"
    zeros = np.zeros(2_000_000, np.float32)
    fastbn.save(path, {"w": zeros}, compress=True)
    assert path.stat().st_size < zeros.nbytes // 200
    np.testing.assert_array_equal(fastbn.load(path)["w"], zeros)


# section: every corrupt file raises CheckpointError (issue 17.11) --------------------


def good_checkpoint(tmp_path, compress=False):
    path = tmp_path / "good.ckpt"
    fastbn.save(path, {"w": np.arange(20, dtype=np.float32).reshape(5, 4)}, compress=compress)
    return path


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("bit", [0, 1, 2, 4, 7, 8, 15])
def test_unknown_compression_method_from_a_bit_flip_raises_checkpoint_error(tmp_path, compress, bit):
    path = good_checkpoint(tmp_path, compress)
    patch_zip_fields(path, 8, 10, lambda method: method ^ (1 << bit))
    with pytest.raises(checkpoint.CheckpointError, match=r"uses compression method \d+ \(a checkpoint is "
                                                         r"stored or deflated\)"):
        fastbn.load(path)


@pytest.mark.parametrize("compress", [False, True])
def test_stored_and_deflated_swapped_by_a_bit_flip_raise_checkpoint_error(tmp_path, compress):
    path = good_checkpoint(tmp_path, compress)
    patch_zip_fields(path, 8, 10, lambda method: method ^ 8)
    with pytest.raises(checkpoint.CheckpointError, match="__manifest__.npy"):
        fastbn.load(path)


def test_encrypted_flag_raises_checkpoint_error(tmp_path):
    path = good_checkpoint(tmp_path)
    patch_zip_fields(path, 6, 8, lambda flags: flags | 1)
    with pytest.raises(checkpoint.CheckpointError, match="is encrypted"):
        fastbn.load(path)


def test_other_unsupported_zip_flags_raise_checkpoint_error(tmp_path):
    path = good_checkpoint(tmp_path)
    patch_zip_fields(path, 6, 8, lambda flags: flags | 0x20)  # "compressed patched data"
    with pytest.raises(checkpoint.CheckpointError):
        fastbn.load(path)


GARBAGE_HEADERS = {
    "unterminated_string": dict(text="{'descr': '<f4, 'fortran_order': False, 'shape': (5, 4), }"),
    "python2_style_long": dict(text="{'descr': '<f4', 'fortran_order': False, 'shape': (5L, 4L), }"),
    "unbalanced": dict(text="{'descr': '<f4', 'fortran_order': False, 'shape': (5, 4), " + "(" * 3000),
    "call": dict(text="__import__('os').system('echo pwned')"),
    "not_a_dict": dict(text="[1, 2, 3]"),
    "extra_key": dict(text="{'descr': '<f4', 'fortran_order': False, 'shape': (5, 4), 'x': 1}"),
    "negative_dim": dict(shape=(5, -4)),
    "bool_dim": dict(text="{'descr': '<f4', 'fortran_order': False, 'shape': (True, 4), }"),
    "float_dim": dict(text="{'descr': '<f4', 'fortran_order': False, 'shape': (5.0, 4), }"),
    "object_dtype": dict(descr="|O"),
    "structured_dtype": dict(text="{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (5, 4), }"),
    "void_dtype": dict(descr="|V4"),
    "subarray_dtype": dict(descr="(2,)<f2"),
    "unknown_dtype": dict(descr="<q99"),
    "bad_fortran": dict(text="{'descr': '<f4', 'fortran_order': 'yes', 'shape': (5, 4), }"),
    "non_latin1": dict(text="{'descr': '<f4', 'fortran_order': False, 'shape': (5, 4), } \u20ac"),
}


def header_bytes(spec):
    spec = dict(spec)
    if "\u20ac" in spec.get("text", ""):
        return npy_header((5, 4), text="x")[:8] + struct.pack("<H", 64) + spec["text"].encode() + b" " * 20
    return npy_header(spec.pop("shape", (5, 4)), **spec)


@pytest.mark.parametrize("name", sorted(GARBAGE_HEADERS))
def test_garbage_npy_header_raises_checkpoint_error(tmp_path, name):
    path = write_zip(tmp_path / "g.ckpt", [("__manifest__.npy", weight_manifest()),
                                           ("a0.npy", header_bytes(GARBAGE_HEADERS[name]) + bytes(80))])
    with pytest.raises(checkpoint.CheckpointError, match=r"entry 'a0.npy'|array 'a0'"):
        fastbn.load(path)


@pytest.mark.parametrize("magic", [b"\x93NUMPY\x03\x00", b"\x93NUMPY\x01", b"\x93NUMP", b"",
                                   b"\x93NUMPY\x02\x00\xff\xff\xff\x00"])
def test_bad_npy_magic_version_or_header_length_raises_checkpoint_error(tmp_path, magic):
    path = write_zip(tmp_path / "g.ckpt", [("__manifest__.npy", weight_manifest()), ("a0.npy", magic)])
    with pytest.raises(checkpoint.CheckpointError, match=r"entry 'a0.npy'"):
        fastbn.load(path)


def test_garbage_manifest_header_raises_checkpoint_error(tmp_path):
    path = write_zip(tmp_path / "g.ckpt", [("__manifest__.npy", npy_header((10,), text="{'descr': (") + bytes(10))])
    with pytest.raises(checkpoint.CheckpointError, match="__manifest__.npy"):
        fastbn.load(path)


@pytest.mark.parametrize("text", ['{"format": NaN}', '{"format": 1e999}', "9" * 5000, "[" * 100000,
                                  '{"format": "fastbn-checkpoint", "version": 1, "root": {}, "arrays": []}'])
def test_manifest_json_that_is_not_what_save_writes_raises_checkpoint_error(tmp_path, text):
    path = write_zip(tmp_path / "j.ckpt", [("__manifest__.npy", npy(np.frombuffer(text.encode(), np.uint8)))])
    with pytest.raises(checkpoint.CheckpointError):
        fastbn.load(path)


def test_non_ascii_digits_in_an_array_key_raise_checkpoint_error(tmp_path):
    records = {"a0": {"path": "w", "shape": [2], "dtype": "<f4"},
               "a\u00b2": {"path": "x", "shape": [2], "dtype": "<f4"},
               "a\u0663": {"path": "y", "shape": [2], "dtype": "<f4"}}
    path = write_zip(tmp_path / "k.ckpt", [
        ("__manifest__.npy", manifest({"w": {"$type": "array", "key": "a0"}}, records)),
        ("a0.npy", npy(np.ones(2, np.float32))), ("a\u00b2.npy", npy(np.ones(2, np.float32))),
        ("a\u0663.npy", npy(np.ones(2, np.float32)))])
    with pytest.raises(checkpoint.CheckpointError, match="listed in the manifest but not used"):
        fastbn.load(path)


def test_manifest_record_with_bad_shape_or_dtype_raises_checkpoint_error(tmp_path):
    for record in ({"path": "w", "shape": "5", "dtype": "<f4"}, {"path": "w", "shape": [5, -1], "dtype": "<f4"},
                   {"path": "w", "shape": [5, 4], "dtype": 4}, {"path": "w", "shape": [True], "dtype": "<f4"}):
        path = write_zip(tmp_path / "r.ckpt", [
            ("__manifest__.npy", manifest({"w": {"$type": "array", "key": "a0"}}, {"a0": record})),
            ("a0.npy", npy(np.ones((5, 4), np.float32)))])
        with pytest.raises(checkpoint.CheckpointError, match="malformed manifest record"):
            fastbn.load(path)


def test_duplicate_member_names_are_refused(tmp_path):
    path = write_zip(tmp_path / "d.ckpt", [("__manifest__.npy", weight_manifest()),
                                           ("a0.npy", npy(np.zeros((5, 4), np.float32))),
                                           ("a0.npy", npy(np.ones((5, 4), np.float32)))])
    with pytest.raises(checkpoint.CheckpointError, match="'a0.npy' appears more than once"):
        fastbn.load(path)
    duplicate_manifest = write_zip(tmp_path / "m.ckpt", [("__manifest__.npy", weight_manifest()),
                                                         ("a0.npy", npy(np.zeros((5, 4), np.float32))),
                                                         ("__manifest__.npy", weight_manifest())])
    with pytest.raises(checkpoint.CheckpointError, match="appears more than once"):
        fastbn.load(duplicate_manifest)


def test_members_that_are_not_npy_arrays_are_refused(tmp_path):
    path = write_zip(tmp_path / "x.ckpt", [("__manifest__.npy", weight_manifest()),
                                           ("a0.npy", npy(np.zeros((5, 4), np.float32))),
                                           ("../evil.sh", b"echo hi")])
    with pytest.raises(checkpoint.CheckpointError, match="'../evil.sh' is not a .npy array"):
        fastbn.load(path)


@pytest.mark.parametrize("extra", [b"", b"\x00" * 4])
def test_member_data_shorter_or_longer_than_its_header_is_refused(tmp_path, extra):
    data = npy(np.zeros((5, 4), np.float32))
    data = data[:-4] if not extra else data + extra
    path = write_zip(tmp_path / "s.ckpt", [("__manifest__.npy", weight_manifest()), ("a0.npy", data)])
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"entry 'a0.npy': its header declares 208 bytes, the archive (204|212)"):
        fastbn.load(path)


def test_fortran_ordered_arrays_still_load(tmp_path):
    array = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    path = write_zip(tmp_path / "f.ckpt", [("__manifest__.npy", weight_manifest((3, 4), "<f8")),
                                           ("a0.npy", npy(array))])
    loaded = fastbn.load(path)["w"]
    np.testing.assert_array_equal(loaded, array)


def adam_checkpoint(tmp_path, step):
    params = [Parameter(np.ones(3, np.float32))]
    opt = optim.Adam(params)
    params[0].grad = np.ones(3, np.float32)
    opt.step()
    path = tmp_path / "opt.ckpt"
    fastbn.save(path, {"optimizer": opt})
    with np.load(path) as archive:
        entries = {name: archive[name] for name in archive.files}
    text = json.loads(entries["__manifest__"].tobytes())
    entry = text["root"]["optimizer"]["state"]["state"]["items"][0][1]
    entry["step"] = step
    entries["__manifest__"] = np.frombuffer(json.dumps(text).encode(), np.uint8)
    with open(path, "wb") as file:
        np.savez(file, **entries)
    return path, opt


@pytest.mark.parametrize("step,pattern", [
    ("7", r"'optimizer': state_dict\['state'\]\[0\]\['step'\]: expected a whole number"),
    (-1, r"\['step'\]: expected a whole number in \[0, 2\*\*53\], got -1"),
    ({"$type": "float", "value": "inf"}, r"\['step'\]: expected a whole number, got inf"),
    (1e300, r"\['step'\]: expected a whole number in \[0, 2\*\*53\]"),
    ([1, 2], r"\['step'\]: expected a whole number"),
])
def test_bad_optimizer_step_in_a_checkpoint_raises_checkpoint_error_and_loads_nothing(tmp_path, step, pattern):
    path, _ = adam_checkpoint(tmp_path, step)
    target = optim.Adam([Parameter(np.zeros(3, np.float32))])
    with pytest.raises(checkpoint.CheckpointError, match=pattern):
        fastbn.load_into(path, {"optimizer": target})
    assert len(target.state) == 0


# section: stale temporary files (issue 17.12) ----------------------------------------


def make_stale(directory, name, token):
    path = directory / f"{checkpoint._temp_prefix(str(directory), name)}{token}.tmp"
    path.write_bytes(b"PK partial")
    return path


def test_successful_save_removes_stale_temporaries_but_not_a_locked_one_or_lookalikes(tmp_path):
    target = tmp_path / "run.ckpt"
    stale = [make_stale(tmp_path, "run.ckpt", token) for token in ("0123abcd", "ffffffff", "00000000")]
    busy = make_stale(tmp_path, "run.ckpt", "abcdef01")
    lookalikes = [tmp_path / name for name in (".run.ckpt.0123ABCD.tmp", ".run.ckpt.0123abc.tmp",
                                                 ".run.ckpt.0123abcd.tmp.bak", ".run.ckpt.x.0123abcd.tmp",
                                                 ".other.ckpt.0123abcd.tmp", "run.ckpt.0123abcd.tmp",
                                                 ".run.ckpt.xyz_0123.tmp")]
    for path in lookalikes:
        path.write_bytes(b"keep me")
    (tmp_path / ".run.ckpt.0a0a0a0a.tmp").mkdir()  # a directory, not a file
    os.symlink(lookalikes[0], tmp_path / ".run.ckpt.1b1b1b1b.tmp")  # a symlink
    fd = os.open(busy, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a save in progress holds it
        fastbn.save(target, {"w": np.ones(3)})
    finally:
        os.close(fd)
    assert not any(path.exists() for path in stale)
    assert busy.exists() and all(path.read_bytes() == b"keep me" for path in lookalikes)
    assert (tmp_path / ".run.ckpt.0a0a0a0a.tmp").is_dir() and os.path.islink(tmp_path / ".run.ckpt.1b1b1b1b.tmp")
    np.testing.assert_array_equal(fastbn.load(target)["w"], np.ones(3))
    fastbn.save(target, {"w": np.ones(3)})  # the lock is gone: now it is stale
    assert not busy.exists()


def test_stale_temporaries_of_another_owner_are_kept(tmp_path):
    if os.getuid() != 0:
        pytest.skip("needs root to give a file to another user")
    stale = make_stale(tmp_path, "run.ckpt", "0123abcd")
    os.chown(stale, 12345, 12345)
    fastbn.save(tmp_path / "run.ckpt", {"w": 1})
    assert stale.exists()


def test_a_save_in_progress_holds_a_lock_on_its_temporary_file(tmp_path, monkeypatch):
    seen = []
    real_write = checkpoint._write_archive

    def probing_write(file, entries, compress):
        names = [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
        assert len(names) == 1
        fd = os.open(tmp_path / names[0], os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        seen.append(names[0])
        return real_write(file, entries, compress)

    monkeypatch.setattr(checkpoint, "_write_archive", probing_write)
    fastbn.save(tmp_path / "run.ckpt", {"w": 1})
    assert seen and not (tmp_path / seen[0]).exists()


def test_a_temporary_unlinked_between_creation_and_locking_is_replaced(tmp_path, monkeypatch):
    # A cleaner may win the race between os.open and flock: the writer notices
    # (link count 0) and writes to a new temporary instead.
    real_flock, calls = fcntl.flock, []

    def racing_flock(fd, operation):
        if not calls:
            calls.append(fd)
            os.unlink(os.readlink(f"/proc/self/fd/{fd}"))
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", racing_flock)
    fastbn.save(tmp_path / "run.ckpt", {"w": 2})
    monkeypatch.undo()
    assert calls and fastbn.load(tmp_path / "run.ckpt") == {"w": 2}
    assert [name for name in os.listdir(tmp_path) if name.endswith(".tmp")] == []


def test_without_file_locks_saves_work_and_leave_other_temporaries_alone(tmp_path, monkeypatch):
    # On a file system without flock a leftover cannot be told from a running
    # save's file: the save must succeed and delete nothing but its own.
    stale = make_stale(tmp_path, "run.ckpt", "0123abcd")

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    fastbn.save(tmp_path / "run.ckpt", {"w": 3})
    monkeypatch.undo()
    assert fastbn.load(tmp_path / "run.ckpt") == {"w": 3}
    assert [name for name in os.listdir(tmp_path) if name.endswith(".tmp")] == [stale.name]


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    import fastbn
    real = np.lib.format.write_array
    def crash(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    np.lib.format.write_array = crash
    fastbn.save(sys.argv[1], {"a": np.zeros(1000)})
""")


def test_temporaries_left_by_killed_saves_are_removed_by_the_next_save(tmp_path):
    path = tmp_path / "run.ckpt"
    fastbn.save(path, {"a": 1})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(fastbn.__file__)), os.environ.get("PYTHONPATH", "")]))
    for _ in range(3):
        result = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(path)], env=env,
                                capture_output=True, timeout=120, cwd=str(tmp_path))
        assert result.returncode == -9, result.stderr
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".tmp")]) == 3
    fastbn.save(path, {"a": 2})
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []
    assert fastbn.load(path) == {"a": 2}


# section: long names and cycles (issue 17.13) ------------------------------------------


@pytest.mark.parametrize("length", [200, 241, 242, 250, 255])
@pytest.mark.parametrize("char", ["x", "\u00e9"])
def test_names_up_to_the_file_system_limit_save_and_load(tmp_path, length, char, monkeypatch):
    name = (char * length).encode()[:length].decode("utf-8", "ignore")
    name += "y" * (length - len(name.encode()))
    assert len(name.encode()) == length
    temporaries = []
    real_replace = os.replace

    def recording_replace(src, dst):
        temporaries.append(os.path.basename(src))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    fastbn.save(tmp_path / name, {"w": np.arange(3.0)})
    monkeypatch.undo()
    assert len(os.fsencode(temporaries[0])) <= 255
    np.testing.assert_array_equal(fastbn.load(tmp_path / name)["w"], np.arange(3.0))
    # the stale-file cleanup recognizes the shortened temporary names too
    stale = make_stale(tmp_path, name, "0123abcd")
    assert len(os.fsencode(stale.name)) <= 255
    fastbn.save(tmp_path / name, {"w": 1})
    assert not stale.exists()


def test_long_names_sharing_a_beginning_get_distinct_temporary_prefixes(tmp_path):
    first, second = "a" * 250 + "1", "a" * 250 + "2"
    assert checkpoint._temp_prefix(str(tmp_path), first) != checkpoint._temp_prefix(str(tmp_path), second)
    stale_of_first = make_stale(tmp_path, first, "0123abcd")
    fastbn.save(tmp_path / second, {"w": 1})
    assert stale_of_first.exists()


def test_a_self_referencing_dict_raises_checkpoint_error_naming_the_cycle(tmp_path):
    loop = {"epoch": 1}
    loop["again"] = loop
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"fastbn.save: extra/again: the value contains itself \(it is extra, which holds it\)"):
        fastbn.save(tmp_path / "c", {"extra": loop})
    items = [1]
    items.append({"back": (items,)})
    with pytest.raises(checkpoint.CheckpointError, match=r"a/1/back/0: the value contains itself \(it is a,"):
        fastbn.save(tmp_path / "c", {"a": items})
    root = {}
    root["me"] = root
    with pytest.raises(checkpoint.CheckpointError, match=r"me: the value contains itself \(it is <root>"):
        fastbn.save(tmp_path / "c", root)
    assert not (tmp_path / "c").exists() and os.listdir(tmp_path) == []


def test_shared_but_acyclic_values_still_save(tmp_path):
    shared = [1, 2]
    fastbn.save(tmp_path / "s", {"a": shared, "b": shared, "c": (shared, shared)})
    assert fastbn.load(tmp_path / "s") == {"a": [1, 2], "b": [1, 2], "c": ([1, 2], [1, 2])}


def test_too_deeply_nested_values_raise_checkpoint_error(tmp_path):
    deep = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(checkpoint.CheckpointError, match="nested too deeply"):
        fastbn.save(tmp_path / "d", {"deep": deep})


# section: random corruption ---------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_randomly_corrupted_files_load_unchanged_or_raise_checkpoint_error(tmp_path, compress):
    # Bit flips, byte overwrites and truncations anywhere in the file: the
    # result is the saved content exactly (the damage hit a field the loader
    # does not need, such as a timestamp) or CheckpointError, never another
    # exception and never different values.
    rng = np.random.default_rng(1234 + compress)
    params = [Parameter(np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)), Parameter(np.ones(5))]
    opt = optim.Adam(params)
    for param in params:
        param.grad = np.ones_like(param.data)
    opt.step()
    path, bad = tmp_path / "good.ckpt", tmp_path / "bad.ckpt"
    fastbn.save(path, {"optimizer": opt, "epoch": 3, "extra": [1.5, "x", np.arange(4)]}, compress=compress)
    good = path.read_bytes()
    expected = pickle.dumps(fastbn.load(path))  # bytes: equal only for identical values
    outcomes = {"loaded": 0, "refused": 0}
    for trial in range(300):
        data = bytearray(good)
        where = int(rng.integers(len(data)))
        if trial % 3 == 0:
            data[where] ^= 1 << int(rng.integers(8))
        elif trial % 3 == 1:
            data[where] = int(rng.integers(256))
        else:
            del data[where:]
        bad.write_bytes(bytes(data))
        try:
            loaded = fastbn.load(bad)
        except checkpoint.CheckpointError:
            outcomes["refused"] += 1
            target = optim.Adam([Parameter(np.zeros((3, 4), np.float32)), Parameter(np.zeros(5))])
            with pytest.raises(checkpoint.CheckpointError):
                fastbn.load_into(bad, {"optimizer": target}, strict=False)
            assert len(target.state) == 0
        else:
            outcomes["loaded"] += 1
            assert pickle.dumps(loaded) == expected, (trial, where)
    assert outcomes["refused"] > 150, outcomes
