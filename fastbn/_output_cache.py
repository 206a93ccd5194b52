"""A size-capped cache of the fast path's large output buffers (forward y,
backward dx of the batch-norm kernels, for the NumPy API, the layers,
SyncBatchNorm and fastbn.torch alike) so that a training loop that produces
the same shapes every step reuses their memory.

Why: an output over 32 MB is freed back to the OS by glibc's ``free``, so a
fresh one is page-faulted in again on its first write at every call (the OS
maps and zeroes every new page: a full extra write).  For a (64, 128, 56, 56)
float32 output (103 MB) that first touch costs about as much as the
batch-norm kernel itself (the bench's allocating and ``out=`` columns).
Kept buffers are already mapped.

Safety: a buffer is handed out as the memory of a `_Lease` object, which
every view of it keeps alive: the NumPy array the kernel writes has the
lease as its base (NumPy stops collapsing a view's base at an object that
is not an array), so every NumPy view, slice or reshape of it keeps the
lease; ``torch.from_numpy`` keeps that array alive for as long as the
tensor's storage lives, and torch views, autograd's saved tensors,
``tensor.numpy()`` arrays, DLPack capsules and ``untyped_storage()`` objects
all keep the storage alive.  Only when the last of them is gone does the
lease's ``__del__`` run and give the buffer back, so a buffer is never
handed out while anything can still see it.  What users notice: such an
array does not own its memory (``flags.owndata`` is False, ``resize`` in
place is refused), as any view.

Threads: a lease may die in any thread, or inside the garbage collector
while this thread holds the cache's lock.  ``__del__`` therefore never
blocks: it queues the buffer (``deque.append`` is atomic) and files the
queue only if the lock is free; whoever holds the lock files the queue
after releasing it.  A forked child starts with an empty cache and a new
lock (the parent's lock may have been held by another thread at the fork).
"""
from __future__ import annotations

import collections
import os
import threading
import warnings
from math import prod
from typing import Dict, List, Sequence, Tuple

import numpy as np

__all__ = ["DEFAULT_CACHE_BYTES", "MIN_CACHED_BYTES", "ENV_VAR", "LEGACY_ENV_VAR", "new_array",
           "placed_array", "clear_of", "page_offset_for",
           "set_output_cache_bytes", "get_output_cache_bytes", "output_cache_info",
           "clear_output_cache"]

DEFAULT_CACHE_BYTES = 256 * 2**20
# Smaller outputs come from malloc's heap, which reuses freed memory itself;
# a lease costs a few microseconds more than np.empty.
MIN_CACHED_BYTES = 2**20
# Where an output starts within its 4 KiB page, against its inputs ("4K
# aliasing").  A load whose address matches an earlier, still pending store
# in its low 12 bits is held back until that store is written, and the
# kernels load their inputs a few vectors ahead of the outputs they store:
# an output that starts a little past an input, modulo 4 KiB, makes nearly
# every load wait (1.5-4x the time).  Measured (AMD EPYC Zen 3, float32
# (32,96,40,40), into out=, 1 thread, min of 7 alternated calls), time by
# (output - input) mod 4096 in bytes: training forward 2.54 ms at 0, 6.50 /
# 6.30 / 7.30 / 4.05 / 2.81 ms at 16 / 32 / 48 / 64 / 128, 2.46 at 192,
# 2.45-2.55 from 256 to 2048, and 3.77 ms at -16 (2.40-2.55 at -32 and
# below); eval forward 1.41 at 0, 5.71 at 48, 2.32 at -16; backward 3.11 at
# 0, 9.28 at 48, 4.87 at -16.  Every dtype and both layouts showed it
# (bfloat16 backward 2.2 against 5.0 ms).  So an output of at least
# MIN_CACHED_BYTES (smaller ones sit in L2, where it costs 0-14 %, see
# fastbn/_bn.pyx) is placed where every input it is read alongside is
# either at the same offset (each element loaded before it is stored) or at
# least ALIAS_AHEAD bytes behind it and ALIAS_BEHIND bytes ahead of it.  NumPy's large arrays start 16
# bytes past a page (its allocator's mmap header), so their outputs go to
# PAGE_OFFSETS[0], half a page away, on a cache-line boundary (see
# new_array); inputs from the heap (any 16-byte boundary; an array
# allocated right after another of whole pages lands 16 bytes past it) can
# sit near it, and then the next offset that is clear of them all is taken:
# each input rules out 318 bytes of the page around it, less than the 1
# KiB between two offsets below, so one of the four is clear of any three
# inputs.
PAGE = 4096
ALIAS_AHEAD = 256
ALIAS_BEHIND = 64
PAGE_OFFSETS = (2048, 3072, 1024, 0)


def clear_of(address: int, inputs: Sequence[int]) -> bool:
    """Whether an output at `address` is placed well against every input
    address in `inputs` (see ALIAS_AHEAD)."""
    for source in inputs:
        ahead = (address - source) % PAGE
        if ahead and not ALIAS_AHEAD <= ahead <= PAGE - ALIAS_BEHIND:
            return False
    return True


def page_offset_for(inputs: Sequence[int]) -> int:
    """The first of PAGE_OFFSETS at which an output is clear of `inputs`."""
    for offset in PAGE_OFFSETS:
        if clear_of(offset, inputs):
            return offset
    return PAGE_OFFSETS[0]  # not reached for up to three inputs


ENV_VAR = "FASTBN_OUTPUT_CACHE_BYTES"
# the name of the variable when only fastbn.torch had the cache (still read)
LEGACY_ENV_VAR = "FASTBN_TORCH_OUTPUT_CACHE_BYTES"

_Key = Tuple[int, str]


class _Cache:
    """The free buffers by (nbytes, dtype character), least recently given
    back first, and the bytes they hold (never more than `cap`).  A buffer
    is kept as an entry ``[array, page, shape, array interface, offset]``:
    the raw uint8 allocation (up to two pages longer than the buffer, which
    is not counted in the bytes held), the first page boundary in it, and
    the shape, array interface and page offset of its last hand-out (reused
    when they repeat)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._reset()

    def _reset(self) -> None:
        self.lock = threading.Lock()
        self.free: Dict[_Key, List[np.ndarray]] = {}
        self.retained = 0
        self.pending: collections.deque = collections.deque()
        self.hits = 0
        self.misses = 0

    # Both with the lock held.

    def _file_pending(self) -> None:
        pending, free = self.pending, self.free
        while pending:
            entry, key = pending.popleft()
            if key[0] > self.cap:
                continue
            # re-inserted last: the dict's order is the keys' eviction order
            buffers = free.pop(key, None) or []
            buffers.append(entry)
            free[key] = buffers
            self.retained += key[0]
        self._evict()

    def _evict(self) -> None:
        free = self.free
        while self.retained > self.cap:
            key = next(iter(free))
            buffers = free[key]
            del buffers[0]
            self.retained -= key[0]
            if not buffers:
                del free[key]

    # Any thread, lock not held.

    def file_pending(self) -> None:
        """File the queued buffers unless someone else holds the lock (then
        they do it after releasing it)."""
        while self.pending:
            if not self.lock.acquire(blocking=False):
                return
            try:
                self._file_pending()
            finally:
                self.lock.release()

    def take(self, key: _Key) -> "list | None":
        entry = None
        with self.lock:
            if self.pending:
                self._file_pending()
            buffers = self.free.get(key)
            if buffers:
                entry = buffers.pop()
                self.retained -= key[0]
                if not buffers:
                    del self.free[key]
                self.hits += 1
            else:
                self.misses += 1
        if self.pending:
            self.file_pending()
        return entry


_cache = _Cache(DEFAULT_CACHE_BYTES)


class _Lease:
    """The owner of a cached buffer while it is handed out (see the module
    docstring); NumPy reads the memory through ``__array_interface__``."""

    __slots__ = ("entry", "key", "__array_interface__")

    def __init__(self, entry: list, key: _Key, interface: dict) -> None:
        self.entry, self.key, self.__array_interface__ = entry, key, interface

    def __del__(self) -> None:
        cache = _Lease.cache
        cache.pending.append((self.entry, self.key))
        cache.file_pending()

    cache = _cache


def new_array(shape: Tuple[int, ...], dtype: np.dtype, inputs: Sequence[int] = ()) -> np.ndarray:
    """An uninitialized C-contiguous array: ``np.empty`` under
    `MIN_CACHED_BYTES`; from that size on, placed clear of `inputs` (the
    addresses of the arrays the kernel reads alongside it, see ALIAS_AHEAD),
    from the cache when it is on.  `dtype` may be any fixed-size NumPy dtype
    (ml_dtypes.bfloat16 too)."""
    nbytes = prod(shape) * dtype.itemsize
    cache = _cache
    if nbytes < MIN_CACHED_BYTES:
        # in L2, where the placement costs 0-14 % (see fastbn/_bn.pyx)
        return np.empty(shape, dtype)
    if cache.cap == 0:
        return placed_array(shape, dtype, inputs)
    key = (nbytes, dtype.char)
    entry = cache.take(key)
    if entry is None:
        # NumPy asks for transparent huge pages on arrays of 4 MiB and more.
        # The buffer starts on a 64-byte boundary (NumPy's start 16 bytes past
        # one; PAGE_OFFSETS, above, says which one): the kernels' vector
        # stores then need no scalar head, and the bfloat16 channels-last
        # rewrite of the AVX-512 build, which starts every row at the
        # output's next 32-byte boundary, writes rows of a multiple of 16
        # channels as whole vectors with no masked head and tail -- (8192,
        # 64) bfloat16 training forward, 1 thread: 147 us into an aligned
        # output, 219 us 16 bytes off (p10 of 80 calls).
        raw = np.empty(nbytes + 2 * PAGE, np.uint8)
        address = raw.__array_interface__["data"][0]
        entry = [raw, address + (-address) % PAGE, None, None, None]
    shape = tuple(shape)
    offset = page_offset_for(inputs)
    if entry[2] != shape or entry[4] != offset:
        # a buffer is usually asked for with the same shape (and inputs at
        # the same page offsets) every time
        entry[2], entry[4] = shape, offset
        entry[3] = {"data": (entry[1] + offset, False), "shape": shape,
                    "typestr": dtype.str, "version": 3}
    array = np.asarray(_Lease(entry, key, entry[3]))
    # a dtype outside NumPy's own (ml_dtypes.bfloat16: typestr '<V2') comes
    # back as raw bytes of its size; the view keeps the lease alive
    return array if array.dtype == dtype else array.view(dtype)


def placed_array(shape: Tuple[int, ...], dtype: np.dtype, inputs: Sequence[int]) -> np.ndarray:
    """An uninitialized C-contiguous array (not cached) that starts at
    ``page_offset_for(inputs)`` past a page boundary: the large outputs
    when the cache is off, and `out=` buffers of the benchmarks."""
    nbytes = prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + 2 * PAGE, np.uint8)
    address = raw.__array_interface__["data"][0]
    start = (-address) % PAGE + page_offset_for(inputs)
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _check_bytes(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n: expected an int number of bytes, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"n: expected a number of bytes >= 0, got {n}")
    return int(n)


def set_output_cache_bytes(n: int) -> None:
    """Keep at most `n` bytes of freed batch-norm output buffers for reuse.

    The batch-norm kernels (functional API, layers, SyncBatchNorm and
    fastbn.torch's modules) write the outputs they allocate (forward y,
    backward dx) into buffers of at least 1 MiB taken from this cache; a
    buffer goes back to it only when every array, view, tensor and saved
    tensor that can see it is gone, and buffers beyond `n` bytes are
    released to the allocator (least recently freed first).  Buffers still
    in use are not counted.  ``0`` turns the cache off and releases
    everything.  The default is 256 MiB, or the environment variable
    ``FASTBN_OUTPUT_CACHE_BYTES`` (formerly ``FASTBN_TORCH_OUTPUT_CACHE_BYTES``,
    still read when the new one is unset) read at import.

    Parameters
    ----------
    n : int
        Bytes to keep, >= 0.

    Raises
    ------
    TypeError
        `n` is not an int.
    ValueError
        `n` is negative.
    """
    n = _check_bytes(n)
    cache = _cache
    with cache.lock:
        cache.cap = n
        cache._file_pending()
        cache._evict()
    cache.file_pending()


def get_output_cache_bytes() -> int:
    """The cap set by `set_output_cache_bytes` (bytes; 0: cache off)."""
    return _cache.cap


def clear_output_cache() -> None:
    """Release every buffer the cache keeps (the cap stays)."""
    cache = _cache
    with cache.lock:
        cache._file_pending()
        cache.free.clear()
        cache.retained = 0
    cache.file_pending()


def output_cache_info() -> Dict[str, int]:
    """The cache's state: ``cap`` and ``retained`` bytes, ``buffers`` kept,
    and the ``hits`` and ``misses`` of calls that asked it for a buffer."""
    cache = _cache
    with cache.lock:
        cache._file_pending()
        info = {"cap": cache.cap, "retained": cache.retained,
                "buffers": sum(len(b) for b in cache.free.values()),
                "hits": cache.hits, "misses": cache.misses}
    cache.file_pending()
    return info


def _initial_cap() -> int:
    name = ENV_VAR if os.environ.get(ENV_VAR, "").strip() else LEGACY_ENV_VAR
    text = os.environ.get(name, "").strip()
    if not text:
        return DEFAULT_CACHE_BYTES
    try:
        return _check_bytes(int(text))
    except (TypeError, ValueError):
        warnings.warn(f"{name}={text!r} is not a number of bytes >= 0; using "
                      f"{DEFAULT_CACHE_BYTES}", RuntimeWarning, stacklevel=2)
        return DEFAULT_CACHE_BYTES


def _after_fork_in_child() -> None:
    # The parent's lock may have been held by another of its threads, and
    # the child has no use for the parent's free buffers (copy-on-write).
    # Leases alive at the fork give their buffers (the child's copies) to
    # the child's new free list.
    _cache._reset()


_cache.cap = _initial_cap()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
