"""Latency statistics as trtexec reports them: throughput, min/mean/median/p90/p95/p99/max, CV.

Percentiles use the nearest-rank rule (the smallest observed latency with at least p% of the samples at
or below it), so every reported percentile is a latency that actually happened; the median is the
usual middle value (the mean of the two middle samples for an even count).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: trtexec's threshold: above this coefficient of variation the numbers are called unstable
CV_WARN = 0.025
PERCENTILES = (90, 95, 99)


def nearest_rank(sorted_values: np.ndarray, p: float) -> float:
    """The p-th percentile (0 < p <= 100) of ascending values by the nearest-rank rule.

    Args:
        sorted_values: the values, ascending.
        p: the percentile, 0 < p <= 100.

    Returns:
        The value at that rank.
    """
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return float(sorted_values[rank - 1])


@dataclass(frozen=True)
class LatencyStats:
    """One measured configuration; latencies in milliseconds."""

    iterations: int
    batch_size: int
    min_ms: float
    mean_ms: float
    median_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    std_ms: float

    @property
    def cv(self) -> float:
        """Coefficient of variation: population standard deviation over mean."""
        return self.std_ms / self.mean_ms if self.mean_ms > 0 else 0.0

    @property
    def unstable(self) -> bool:
        """Whether the coefficient of variation is above CV_WARN (a noisy measurement)."""
        return self.cv > CV_WARN

    @property
    def queries_per_s(self) -> float:
        """Calls per second when calls run back to back (1 / mean latency)."""
        return 1e3 / self.mean_ms if self.mean_ms > 0 else math.inf

    @property
    def samples_per_s(self) -> float:
        """Samples per second when calls run back to back (batch size over the mean latency)."""
        return self.batch_size * self.queries_per_s

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cv": self.cv, "unstable": self.unstable, "queries_per_s": self.queries_per_s,
                "samples_per_s": self.samples_per_s}


def summarize(latencies_ns: np.ndarray | list[int], batch_size: int = 1) -> LatencyStats:
    """Statistics of per-call latencies given in nanoseconds.

    Args:
        latencies_ns: latency of each call, in nanoseconds.
        batch_size: samples per call (for the throughput).

    Returns:
        The LatencyStats, in milliseconds.

    Raises:
        ValueError: no latencies.
    """
    values = np.sort(np.asarray(latencies_ns, dtype=np.float64)) / 1e6
    if values.size == 0:
        raise ValueError("no latency samples to summarize")
    p90, p95, p99 = (nearest_rank(values, p) for p in PERCENTILES)
    return LatencyStats(iterations=int(values.size), batch_size=int(batch_size), min_ms=float(values[0]),
                        mean_ms=float(values.mean()), median_ms=float(np.median(values)), p90_ms=p90, p95_ms=p95,
                        p99_ms=p99, max_ms=float(values[-1]), std_ms=float(values.std()))
