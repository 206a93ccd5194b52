"""Timing and the memory-bandwidth probe used by `python -m fastbn bench`."""
from __future__ import annotations

import random
import statistics
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


def time_interleaved(contenders: "dict[str, Callable[[], object]]", *, min_time: float = 0.2,
                     min_rounds: int = 5, max_rounds: int = 200,
                     max_rounds_for: "dict[str, int] | None" = None,
                     settle: float = 0.003, warmup: int = 2,
                     warmup_for: "dict[str, int] | None" = None,
                     order_seed: "int | None" = 0) -> "dict[str, Timing]":
    """Time several contenders in alternating rounds, so a change of machine
    load affects all of them alike.

    Each round runs the contenders in an order shuffled by a generator seeded
    with `order_seed` (the same orders on every run; None keeps the order of
    `contenders` in every round).  A fixed order makes each contender always
    follow the same one and pay, or gain, for what that one leaves in the
    caches.  Measured in `fastbn bench` (Xeon, 480 MiB of L3, 2 threads,
    (64, 128, 56, 56) bfloat16 rows, two runs of each order alternated):
    with the fixed order the out= column, timed right after the allocating
    call on the same values, read the eval forward at 2.06 and 1.91 ms
    against 2.84 and 2.71 allocating (timed after torch); shuffled, 2.52
    and 2.34 against 2.72 and 2.58, and the training forward 2.66 and 2.65
    against 2.77 and 2.70 (fixed: 2.50 and 2.56 against 2.77 and 2.96).
    Shuffled, every contender follows every other about equally often.

    In each round every contender gets `warmup` untimed calls (`warmup_for`
    sets it per contender), then one timed call.  Before a contender's
    untimed calls, `settle` seconds of sleep let the previous contender's
    idle OpenMP workers stop spinning: libgomp (fastbn's and the copy torch
    bundles) busy-waits for a while after each parallel region, which on a
    2-core machine would steal a core from whoever runs next.  Stops after
    `min_rounds` rounds once every contender has spent `min_time` seconds;
    `max_rounds_for` caps slow contenders (e.g. the reference).

    Why two untimed calls, not one: on a CPU whose last-level cache holds a
    good part of a large case (480 MiB of L3 on the Xeon of the README's
    bfloat16 tables) the contender timed after another one's large call was
    slowed for two calls, not one -- its data evicted by the other's,
    inferred from the times, not profiled.  Measured there, (64, 128, 56,
    56) bfloat16 training forward into one fixed buffer, 2 threads, medians
    of 25 rounds, rounds that also ran fastbn's float32 call on the same
    values: the bfloat16 call timed right after the float32 one took
    4.31-4.33 ms with one untimed call before it, against 3.45-3.55 for the
    same call timed elsewhere in the round; 3.58 against 3.31 with two
    untimed calls, 3.37 against 3.33 with three (not worth a fourth call
    per round).  In the bench the bfloat16 rows' allocating column (timed
    after torch) read 20 % above their out= column with one untimed call
    (4.07 against 3.29 ms), 9 % with two (3.48 against 3.18), as with
    three.

    Why 3 ms and not longer: after a longer sleep the timed calls of
    mid-size cases waited whole scheduler ticks (4 ms on the 250 Hz VM this
    was measured on; fastbn's and torch's alike).  Quiet, 2 threads,
    medians, 20 ms against 3 ms: bn1d_eval_777x1000 fastbn 4.08 ms against
    124 us, torch 4.13 ms against 178 us; bn1d_eval_64x64 torch 4.02 ms
    against 17 us; nine of the thirteen rows tried read 4 or 8 ms with 20
    ms, none with 3 ms, and the rows unaffected by ticks agree."""
    caps = max_rounds_for or {}
    warmups = warmup_for or {}
    timings = {name: Timing() for name in contenders}
    order = list(contenders)
    shuffler = None if order_seed is None else random.Random(order_seed)
    for round_index in range(max_rounds):
        if shuffler is not None:
            shuffler.shuffle(order)
        for name in order:
            if round_index >= caps.get(name, max_rounds):
                continue
            fn = contenders[name]
            time.sleep(settle)
            for _ in range(warmups.get(name, warmup)):
                fn()
            start = time.perf_counter()
            fn()
            timings[name].runs.append(time.perf_counter() - start)
        if round_index + 1 >= min_rounds and all(
                sum(t.runs) >= min_time or len(t.runs) >= caps.get(n, max_rounds)
                for n, t in timings.items()):
            break
    return timings


def time_per_call(fn: Callable[[], object], *, calls: int = 2000, repeats: int = 7) -> Timing:
    """For microsecond-scale calls: time batches of `calls` and report the
    per-call time of each batch (so timer resolution does not dominate)."""
    timing = Timing()
    for _ in range(repeats):
        time.sleep(0.02)            # see time_interleaved: let other OpenMP pools idle
        for _ in range(calls // 10 + 1):
            fn()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        timing.runs.append((time.perf_counter() - start) / calls)
    return timing


def stream_bandwidth(num_threads: int, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Memory bandwidth in GB/s of a parallel in-place stream update
    (dst += 0.5 * src over two arrays of `nbytes`, far larger than the caches)
    with `num_threads` threads, counting 3 x nbytes moved per pass: the
    roofline every memory-bound kernel is compared with (see
    src_c/common/bandwidth_probe.h)."""
    from fastbn import _core
    source = np.ones(nbytes // 8, dtype=np.float64)
    destination = np.zeros_like(source)
    destination += 1.0                      # touched: no page faults timed
    seconds = _core.stream_probe_seconds(destination, source, max(1, int(num_threads)), repeats)
    return 3 * source.nbytes / seconds / 1e9
