"""Latency benchmarking: timing harness, statistics, routing patterns, plots; `run.bench` is the entry."""
