"""The timing loop: warm up by time, then time every call with `perf_counter_ns` until both the
duration and the minimum iteration count are reached.

Several callables are measured interleaved, in slices (each callable gets `rounds` slices of the
duration, in turn), so a load that drifts on a shared machine hits all of them alike and their ratios
stay meaningful. After switching, one untimed call re-warms the caches the previous callable evicted.
"""

from __future__ import annotations

import math
import time
from array import array
from collections.abc import Callable, Sequence

import numpy as np

ROUNDS = 4
#: enough for a p99 that rests on 10,000 samples, without holding a huge array for a no-op callable
MAX_ITERS = 1_000_000


def measure(fns: Sequence[Callable[[], object]], *, warmup_ms: float = 200.0, duration_s: float = 3.0,
            min_iters: int = 10, rounds: int = ROUNDS) -> list[np.ndarray]:
    """Host latency in nanoseconds of every timed call of each callable, interleaved in slices.

    Args:
        fns: the callables, each measured in every round.
        warmup_ms: warm-up per callable, before timing.
        duration_s: timed duration per callable.
        min_iters: at least this many timed calls per callable.
        rounds: slices each callable's time is spread over.

    Returns:
        Per callable, the latency of every timed call in nanoseconds.

    Raises:
        ValueError: a duration or warm-up that is not finite, or min_iters or rounds below 1.
    """
    if not (0 < duration_s < math.inf and 0 <= warmup_ms < math.inf) or min_iters < 1 or rounds < 1:
        raise ValueError("need a finite duration_s > 0, a finite warmup_ms >= 0, min_iters >= 1 and rounds >= 1")
    for fn in fns:
        _warmup(fn, warmup_ms * 1e6)
    samples = [array("q") for _ in fns]
    elapsed = [0] * len(fns)
    duration_ns = int(duration_s * 1e9)
    slice_ns = max(1, duration_ns // rounds)
    rewarm = len(fns) > 1

    def done(i: int) -> bool:
        return len(samples[i]) >= MAX_ITERS or (elapsed[i] >= duration_ns and len(samples[i]) >= min_iters)

    while pending := [i for i in range(len(fns)) if not done(i)]:
        for i in pending:
            elapsed[i] += _slice(fns[i], samples[i], slice_ns, rewarm)
    return [np.frombuffer(s, dtype=np.int64).copy() for s in samples]


def _warmup(fn: Callable[[], object], budget_ns: float) -> None:
    perf = time.perf_counter_ns
    end = perf() + budget_ns
    fn()
    while perf() < end:
        fn()


def _slice(fn: Callable[[], object], samples: array, budget_ns: int, rewarm: bool) -> int:
    """Time calls of `fn` for about `budget_ns`; returns the slice's wall time."""
    perf = time.perf_counter_ns
    append = samples.append
    if rewarm:
        fn()
    start = perf()
    end = start + budget_ns
    while True:
        t0 = perf()
        fn()
        t1 = perf()
        append(t1 - t0)
        if t1 >= end or len(samples) >= MAX_ITERS:
            return t1 - start
