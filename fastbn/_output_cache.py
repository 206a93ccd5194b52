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
from typing import Dict, List, Tuple

import numpy as np

__all__ = ["DEFAULT_CACHE_BYTES", "MIN_CACHED_BYTES", "ENV_VAR", "LEGACY_ENV_VAR", "new_array",
           "set_output_cache_bytes", "get_output_cache_bytes", "output_cache_info",
           "clear_output_cache"]

DEFAULT_CACHE_BYTES = 256 * 2**20
# Smaller outputs come from malloc's heap, which reuses freed memory itself;
# a lease costs a few microseconds more than np.empty.
MIN_CACHED_BYTES = 2**20
# Cached buffers start PAGE_OFFSET bytes past a 4 KiB page boundary: on a
# cache-line boundary (see new_array) and half a page away from where
# NumPy's large arrays start (16 bytes past a page: glibc's mmap header).  A
# store whose address matches a later load's in its low 12 bits ("4K
# aliasing") holds that load back until the store is written, and the
# kernels load the input a few vectors ahead of the output they store: an
# output 48 bytes past its input modulo 4 KiB -- where the 64-byte-aligned
# buffers this cache handed out before sat against a NumPy input -- made
# the (64,128,56,56) float32 training forward into it 36.6 ms against 15.1
# ms half a page away (1 thread; 19.1 against 11.7 ms at 2 threads, eval
# forward 14.2 against 10.4; AMD EPYC Zen 3, min of 7 alternated calls).
# Two cached buffers (a forward's output feeding the next layer) sit at the
# same offset: the input's load of an element comes before the output's
# store of it, and both walk forward, so no later load matches a waiting
# store.
PAGE = 4096
PAGE_OFFSET = 2048
ENV_VAR = "FASTBN_OUTPUT_CACHE_BYTES"
# the name of the variable when only fastbn.torch had the cache (still read)
LEGACY_ENV_VAR = "FASTBN_TORCH_OUTPUT_CACHE_BYTES"

_Key = Tuple[int, str]


class _Cache:
    """The free buffers by (nbytes, dtype character), least recently given
    back first, and the bytes they hold (never more than `cap`).  A buffer
    is kept as an entry ``[array, address, shape, array interface]``: the
    raw uint8 allocation (up to `PAGE + PAGE_OFFSET` bytes longer than the
    buffer, which is not counted in the bytes held), the buffer's start in
    it (`PAGE_OFFSET` past a page boundary), and the shape and interface of
    its last hand-out (reused when the shape repeats)."""

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


def new_array(shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialized C-contiguous array, from the cache when it is at
    least `MIN_CACHED_BYTES` and the cache is on (else ``np.empty``).
    `dtype` may be any fixed-size NumPy dtype (ml_dtypes.bfloat16 too)."""
    nbytes = prod(shape) * dtype.itemsize
    cache = _cache
    if nbytes < MIN_CACHED_BYTES or cache.cap == 0:
        return np.empty(shape, dtype)
    key = (nbytes, dtype.char)
    entry = cache.take(key)
    if entry is None:
        # NumPy asks for transparent huge pages on arrays of 4 MiB and more.
        # The buffer starts on a 64-byte boundary (NumPy's start 16 bytes past
        # one; PAGE_OFFSET, above, says which one): the kernels' vector
        # stores then need no scalar head, and the bfloat16 channels-last
        # rewrite of the AVX-512 build, which starts every row at the
        # output's next 32-byte boundary, writes rows of a multiple of 16
        # channels as whole vectors with no masked head and tail -- (8192,
        # 64) bfloat16 training forward, 1 thread: 147 us into an aligned
        # output, 219 us 16 bytes off (p10 of 80 calls).
        raw = np.empty(nbytes + PAGE + PAGE_OFFSET, np.uint8)
        address = raw.__array_interface__["data"][0]
        entry = [raw, address + (PAGE_OFFSET - address) % PAGE, None, None]
    shape = tuple(shape)
    if entry[2] != shape:
        # a buffer is usually asked for with the same shape every time
        entry[2], entry[3] = shape, {"data": (entry[1], False), "shape": shape,
                                     "typestr": dtype.str, "version": 3}
    array = np.asarray(_Lease(entry, key, entry[3]))
    # a dtype outside NumPy's own (ml_dtypes.bfloat16: typestr '<V2') comes
    # back as raw bytes of its size; the view keeps the lease alive
    return array if array.dtype == dtype else array.view(dtype)


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
