"""The bench harness, statistics and routing patterns: checks of the measuring tool, not of the machine."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from deploytool.benchmark import harness, patterns
from deploytool.benchmark.stats import CV_WARN, nearest_rank, summarize


# --- harness -----------------------------------------------------------------------------------


def measure_one(fn, **options):
    """One callable through the harness: its timed samples in ns."""
    return harness.measure([fn], **options)[0]


def test_empty_callable_median_is_under_5_microseconds():
    ns = measure_one(lambda: None, warmup_ms=20, duration_s=0.1)
    assert summarize(ns).median_ms < 5e-3


def test_sleeping_1ms_is_never_reported_below_1ms_and_its_median_stays_under_3ms():
    stats = summarize(measure_one(lambda: time.sleep(1e-3), warmup_ms=10, duration_s=0.15))
    assert stats.min_ms >= 1.0
    assert stats.median_ms < 3.0


def test_measuring_runs_until_both_the_duration_and_the_minimum_iterations_are_reached():
    start = time.perf_counter()
    slow = measure_one(lambda: time.sleep(5e-3), warmup_ms=0, duration_s=1e-3, min_iters=7)
    assert len(slow) == 7
    fast = measure_one(lambda: None, warmup_ms=0, duration_s=0.05, min_iters=1)
    assert len(fast) > 1000
    assert time.perf_counter() - start >= 0.05


def test_warmup_calls_are_not_timed():
    """The first calls (slow: caches, lazy initialisation) fall in the warm-up and never reach the samples."""
    calls = []

    def cold_then_fast():
        calls.append(1)
        if len(calls) <= 3:
            time.sleep(5e-3)

    ns = measure_one(cold_then_fast, warmup_ms=20, duration_s=0.02)
    assert len(calls) - len(ns) >= 3
    assert ns.max() < 5e6


def test_several_callables_are_interleaved_in_slices():
    order = []
    harness.measure([lambda: order.append("a"), lambda: order.append("b")], warmup_ms=0, duration_s=0.02,
                    rounds=4)
    switches = sum(1 for x, y in zip(order, order[1:]) if x != y)
    assert switches >= 2 * 4 - 1  # warmups, then four slices each, in turn


def test_bad_harness_settings_are_refused():
    with pytest.raises(ValueError, match="duration_s"):
        measure_one(lambda: None, duration_s=0)


@pytest.mark.parametrize("setting", [{"warmup_ms": math.inf}, {"duration_s": math.inf}, {"duration_s": math.nan}])
def test_infinite_or_nan_durations_are_refused_before_any_call(setting):
    calls = []
    with pytest.raises(ValueError, match="finite"):
        measure_one(lambda: calls.append(1), **setting)
    assert not calls


# --- statistics --------------------------------------------------------------------------------

def test_stats_match_hand_computed_values():
    ns = np.array([7, 1, 10, 3, 5, 2, 9, 4, 6, 8]) * 1_000_000  # 1..10 ms, shuffled
    s = summarize(ns, batch_size=4)
    assert (s.iterations, s.min_ms, s.max_ms, s.mean_ms, s.median_ms) == (10, 1.0, 10.0, 5.5, 5.5)
    assert (s.p90_ms, s.p95_ms, s.p99_ms) == (9.0, 10.0, 10.0)  # nearest rank: ceil(p/100 * n)-th value
    assert s.std_ms == pytest.approx(math.sqrt(8.25))
    assert s.cv == pytest.approx(math.sqrt(8.25) / 5.5)
    assert s.queries_per_s == pytest.approx(1000 / 5.5)
    assert s.samples_per_s == pytest.approx(4000 / 5.5)
    assert s.unstable


def test_nearest_rank_percentiles_are_observed_values():
    values = np.arange(1.0, 201.0)
    assert nearest_rank(values, 99) == 198.0
    assert nearest_rank(values, 90) == 180.0
    assert nearest_rank(values[:1], 99) == 1.0


def test_cv_warning_threshold_is_2_5_percent():
    steady = summarize([1_000_000] * 50 + [1_040_000] * 50)  # cv = 2% -> stable
    noisy = summarize([1_000_000] * 50 + [1_060_000] * 50)   # cv = 2.9% -> unstable
    assert steady.cv < CV_WARN < noisy.cv
    assert not steady.unstable and noisy.unstable
    assert noisy.to_dict()["unstable"] is True


# --- routing patterns --------------------------------------------------------------------------

@pytest.fixture
def routes():
    return np.random.default_rng(0).integers(0, 4, 600)


@pytest.mark.parametrize("batch", [1, 8, 64])
def test_uniform_pattern_spreads_rows_evenly_over_the_cycle_and_each_feed(routes, batch):
    feeds = patterns.select_rows("uniform", routes, 4, batch)
    assert all(len(f) == batch for f in feeds)
    hist = patterns.histogram([routes[f] for f in feeds], 4)
    assert max(hist) - min(hist) <= 1 and sum(hist) == batch * len(feeds) >= 4 * patterns.ROWS_PER_EXPERT
    for f in feeds:  # each feed holds floor or ceil of its share of every expert
        counts = np.bincount(routes[f], minlength=4)
        assert counts.max() - counts.min() <= 1


def test_skewed_pattern_follows_a_zipf_law(routes):
    feeds = patterns.select_rows("skewed", routes, 4, 100)
    assert patterns.histogram([routes[f] for f in feeds], 4) == [48, 24, 16, 12]  # 100 * (1, 1/2, 1/3, 1/4) / 2.083
    assert patterns.counts_for(patterns.shares("skewed", np.ones(8, bool)), 64).tolist() == [23, 12, 8, 6, 5, 4, 3, 3]


def test_single_pattern_sends_every_row_to_the_most_used_expert():
    routes = np.array([0] * 10 + [2] * 30 + [3] * 5)
    feeds = patterns.select_rows("single", routes, 4, 16)
    assert patterns.histogram([routes[f] for f in feeds], 4) == [0, 0, 16 * len(feeds), 0]


def test_experts_absent_from_the_pool_get_no_rows_and_rows_repeat_when_the_pool_is_short():
    routes = np.array([0] * 3 + [1] * 50)
    feeds = patterns.select_rows("uniform", routes, 3, 64)
    assert patterns.histogram([routes[f] for f in feeds], 3) == [32, 32, 0]


def test_unknown_pattern_is_bad_input():
    from deploytool.errors import BadInput

    with pytest.raises(BadInput, match="unknown routing pattern 'zipf'|unknown routing pattern zipf"):
        patterns.check_patterns(["zipf"])


# --- machine and kernel benchmark --------------------------------------------------------------

def test_machine_info_names_the_gpu_the_machine_probe_sees(monkeypatch):
    from deploytool import machine
    from deploytool.machine import machine_info

    monkeypatch.setattr(machine, "gpu", lambda: {"name": "NVIDIA H100", "compute_capability": "9.0"})
    assert machine_info()["gpu"] == "NVIDIA H100 (sm_90)"
    monkeypatch.setattr(machine, "gpu", lambda: None)
    assert machine_info()["gpu"] is None


def test_kernel_benchmark_reports_nearest_rank_percentiles_like_every_other_table():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "bench_kernel.py"
    spec = importlib.util.spec_from_file_location("bench_kernel", path)
    bench_kernel = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_kernel)
    ms = [float(v) for v in range(1, 11)]
    stats = summarize(np.asarray(ms) * 1e6)
    assert bench_kernel._stats(ms) == pytest.approx((stats.median_ms, stats.p90_ms, stats.p99_ms))
    assert bench_kernel._stats(ms)[1] == 9.0  # an observed latency, not an interpolated 9.1


def test_a_token_routers_pattern_is_matched_by_the_mix_of_its_rows_decisions():
    from deploytool.benchmark import patterns

    rng = np.random.default_rng(0)
    # 400 rows of 16 tokens over 4 experts, each row leaning to one expert
    lean = rng.integers(0, 4, 400)
    counts = np.stack([np.bincount(np.where(rng.random(16) < 0.7, l, rng.integers(0, 4, 16)), minlength=4)
                       for l in lean])

    def mix(pattern):
        rows = np.concatenate(patterns.select_rows(pattern, counts, 4, batch_size=32, seed=1))
        total = counts[rows].sum(axis=0)
        return total / total.sum()

    assert np.abs(mix("uniform") - 0.25).max() < 0.02
    single = mix("single")
    assert single.max() > 0.6 and single.argmax() == counts.sum(axis=0).argmax()
    skewed = mix("skewed")
    assert skewed[0] > skewed[1] > skewed[3]
    assert patterns.pool_counts(counts, 4).tolist() == counts.sum(axis=0).tolist()
