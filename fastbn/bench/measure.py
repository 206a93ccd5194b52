"""Timing and the memory-bandwidth probe used by `python -m fastbn bench`."""
from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List

import numpy as np


@dataclass
class Timing:
    """Wall-clock seconds of repeated calls, after warm-up."""
    runs: List[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def best(self) -> float:
        return min(self.runs)

    def as_dict(self) -> dict:
        return {"median_s": self.median, "min_s": self.best, "runs": len(self.runs)}


def time_callable(fn: Callable[[], object], *, min_time: float = 0.2, min_runs: int = 5,
                  max_runs: int = 200, warmup: int = 2) -> Timing:
    """Call `fn` `warmup` times, then until `min_time` seconds and `min_runs`
    calls have passed (at most `max_runs`); one timing per call."""
    for _ in range(warmup):
        fn()
    timing = Timing()
    total = 0.0
    while len(timing.runs) < max_runs and (len(timing.runs) < min_runs or total < min_time):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        timing.runs.append(elapsed)
        total += elapsed
    return timing


def time_per_call(fn: Callable[[], object], *, calls: int = 2000, repeats: int = 7) -> Timing:
    """For microsecond-scale calls: time batches of `calls` and report the
    per-call time of each batch (so timer resolution does not dominate)."""
    for _ in range(calls // 10 + 1):
        fn()
    timing = Timing()
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        timing.runs.append((time.perf_counter() - start) / calls)
    return timing


def copy_bandwidth(num_threads: int, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Memory bandwidth in GB/s (bytes read + written per second) of a plain
    copy of `nbytes` (far larger than the caches), split across `num_threads`
    Python threads (NumPy releases the GIL while copying).  This is the
    roofline every memory-bound kernel is compared with."""
    source = np.ones(nbytes // 8, dtype=np.float64)
    destination = np.empty_like(source)
    num_threads = max(1, int(num_threads))
    bounds = np.linspace(0, source.size, num_threads + 1).astype(np.int64)

    def copy_slice(i: int) -> None:
        np.copyto(destination[bounds[i]:bounds[i + 1]], source[bounds[i]:bounds[i + 1]])

    def copy_all() -> None:
        if num_threads == 1:
            copy_slice(0)
            return
        workers = [threading.Thread(target=copy_slice, args=(i,)) for i in range(num_threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    timing = time_callable(copy_all, min_time=0.0, min_runs=repeats, max_runs=repeats, warmup=1)
    return 2 * source.nbytes / timing.best / 1e9
