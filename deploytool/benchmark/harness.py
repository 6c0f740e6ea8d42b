"""The timing loop: warm up by time, then time every call with `perf_counter_ns` until both the
duration and the minimum iteration count are reached.

Several callables are measured interleaved, in slices (each callable gets `rounds` slices of the
duration, in turn), so a load that drifts on a shared machine hits all of them alike and their ratios
stay meaningful. After switching, one untimed call re-warms the caches the previous callable evicted.
On a GPU, `CudaStages` adds device times from CUDA events: host-to-device copy, compute and
device-to-host copy, each on its own.
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

    A callable with a `reset()` method is told when its warmup is over (CudaStages drops the warmup
    events).
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


def measure_one(fn: Callable[[], object], **options) -> np.ndarray:
    return measure([fn], **options)[0]


def _warmup(fn: Callable[[], object], budget_ns: float) -> None:
    perf = time.perf_counter_ns
    end = perf() + budget_ns
    fn()
    while perf() < end:
        fn()
    reset = getattr(fn, "reset", None)
    if reset is not None:
        reset()


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


class CudaStages:
    """Calls to_device -> compute -> to_host and records CUDA events between the stages.

    The events go on `stream` (a torch.cuda.Stream; None: the current one), where the stages must
    enqueue their work; `to_host` returns host arrays, so it synchronizes and host timing covers the
    whole call.
    """

    STAGES = ("h2d", "compute", "d2h")

    def __init__(self, to_device: Callable, compute: Callable, to_host: Callable, feeds: Callable[[], object],
                 stream=None):
        from deploytool.deps import require

        self._torch = require("torch", "GPU device timing")
        self._stages = (to_device, compute, to_host)
        self._feeds = feeds
        self._stream = stream
        self._events: list[tuple] = []

    def __call__(self) -> object:
        event = self._torch.cuda.Event
        marks = tuple(event(enable_timing=True) for _ in range(4))
        to_device, compute, to_host = self._stages
        stream = self._stream
        marks[0].record(stream)
        dev = to_device(self._feeds())
        marks[1].record(stream)
        out = compute(dev)
        marks[2].record(stream)
        host = to_host(out)
        marks[3].record(stream)
        self._events.append(marks)
        return host

    def reset(self) -> None:
        self._events.clear()

    def stage_ns(self) -> dict[str, np.ndarray]:
        """Device time of each stage and of the whole call, in nanoseconds, for every recorded call."""
        self._torch.cuda.synchronize()
        ms = np.array([[a.elapsed_time(b) for a, b in zip(m[:-1], m[1:])] for m in self._events]).reshape(-1, 3)
        times = {name: ms[:, k] * 1e6 for k, name in enumerate(self.STAGES)}
        times["device"] = ms.sum(axis=1) * 1e6
        return times
