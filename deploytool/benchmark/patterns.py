"""Routing patterns: feeds whose rows the router sends uniformly, Zipf-skewed, or all to one expert.

Rows are picked from a pool by the routing decision a backend made on them, so each batch carries the
wanted expert mix. A router that decides per token (an MoE language model) cannot be steered row by
row: there the rows are picked greedily so that the mix of all their tokens' decisions comes as close
to the pattern's as the pool allows, and the bench reports the mix each backend measured.

A batch smaller than the number of experts cannot hold the mix, so a pattern is a cycle of feeds: over
the cycle the mix is exact, and each feed is as close to it as its size allows (rows are dealt to the
feeds by stride, so every feed gets floor or ceil of its share of each expert).
"""

from __future__ import annotations

import math

import numpy as np

from deploytool.errors import BadInput

PATTERNS = ("uniform", "skewed", "single")
#: exponent of the Zipf law of the skewed pattern: expert k (by rank) gets a share proportional to 1/k^s
ZIPF_S = 1.0
#: a cycle holds at least this many rows per expert, so batch 1 still visits the whole mix
ROWS_PER_EXPERT = 8


def check_patterns(patterns: list[str] | tuple[str, ...]) -> list[str]:
    """The routing pattern names, each known (uniform, skewed, single).

    Args:
        patterns: the names given.

    Returns:
        The names, each once (a repeat dropped), in the order given.

    Raises:
        BadInput: an unknown name, or none.
    """
    unknown = [p for p in patterns if p not in PATTERNS]
    if unknown or not patterns:
        raise BadInput(f"unknown routing pattern {', '.join(unknown) or '(none)'}; choose from {', '.join(PATTERNS)}")
    return list(dict.fromkeys(patterns))


def shares(pattern: str, present: np.ndarray) -> np.ndarray:
    """Wanted fraction of rows per expert; experts absent from the pool (`present` False) get none.

    Args:
        pattern: uniform, skewed or single.
        present: per expert, whether the pool routes any row to it.

    Returns:
        The fraction of rows each expert should get, summing to 1.

    Raises:
        BadInput: no expert present.
    """
    present = np.asarray(present, dtype=bool)
    ranked = np.flatnonzero(present)
    if ranked.size == 0:
        raise BadInput("no row of the data routes to any expert")
    out = np.zeros(present.size)
    if pattern == "uniform":
        out[ranked] = 1.0
    elif pattern == "skewed":
        out[ranked] = 1.0 / np.arange(1, ranked.size + 1) ** ZIPF_S
    elif pattern == "single":
        out[ranked[0]] = 1.0
    else:
        check_patterns([pattern])
    return out / out.sum()


def counts_for(share: np.ndarray, n_rows: int) -> np.ndarray:
    """Integer counts summing to n_rows, by largest remainder (ties to the lower expert).

    Args:
        share: fraction per expert.
        n_rows: rows to distribute.

    Returns:
        Rows per expert (int64).
    """
    exact = np.asarray(share, dtype=np.float64) * n_rows
    counts = np.floor(exact).astype(np.int64)
    order = np.lexsort((np.arange(exact.size), -(exact - counts)))
    counts[order[: n_rows - int(counts.sum())]] += 1
    return counts


def cycle_length(batch_size: int, n_experts: int) -> int:
    """Feeds in a pattern's cycle: enough rows for ROWS_PER_EXPERT per expert, at least one feed.

    Args:
        batch_size: rows per feed.
        n_experts: the steered router's expert count.

    Returns:
        The number of feeds.
    """
    return max(1, math.ceil(ROWS_PER_EXPERT * n_experts / batch_size))


def pool_counts(routes: np.ndarray, n_experts: int) -> np.ndarray:
    """Decisions per expert over the pool: `routes` is one expert per row, or [rows, n_experts] counts.

    Args:
        routes: the pool's routing, as select_rows takes it.
        n_experts: the router's expert count.

    Returns:
        [n_experts] int64 counts.
    """
    routes = np.asarray(routes, dtype=np.int64)
    if routes.ndim == 2:
        return routes.sum(axis=0)[:n_experts]
    return np.bincount(routes, minlength=n_experts)[:n_experts]


#: rows a greedy pick compares at each step (bounded work whatever the pool's size)
MIX_CANDIDATES = 256


def select_rows(pattern: str, routes: np.ndarray, n_experts: int, batch_size: int,
                seed: int = 0) -> list[np.ndarray]:
    """Pool row indices for each feed of the cycle, given the pool's routing decisions `routes`.

    uniform and skewed rank the experts that appear in the pool by index; single takes the expert the
    pool routes to most often. Rows are drawn without replacement while the pool has enough of them.

    Args:
        pattern: uniform, skewed or single.
        routes: each pool row's expert; or, for a router deciding per token, [rows, n_experts] decision
            counts, matched by the mix of the picked rows' decisions (_by_mix).
        n_experts: the router's expert count.
        batch_size: rows per feed.
        seed: seed of the draw.

    Returns:
        One array of pool row indices per feed.
    """
    routes = np.asarray(routes, dtype=np.int64)
    if routes.ndim == 2:
        return _by_mix(pattern, routes, n_experts, batch_size, seed)
    in_pool = np.bincount(routes, minlength=n_experts)[:n_experts]
    present = in_pool > 0
    if pattern == "single":
        present = np.zeros(n_experts, dtype=bool)
        present[int(np.argmax(in_pool))] = True
    n_feeds = cycle_length(batch_size, n_experts)
    counts = counts_for(shares(pattern, present), n_feeds * batch_size)
    rng = np.random.default_rng(seed)
    grouped = np.concatenate([
        rng.choice(np.flatnonzero(routes == e), size=int(c), replace=int(c) > in_pool[e])
        for e, c in enumerate(counts) if c
    ])
    feeds = [grouped[f::n_feeds] for f in range(n_feeds)]
    return [rng.permutation(rows) for rows in feeds]


def _by_mix(pattern: str, counts: np.ndarray, n_experts: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """Rows picked one at a time, each the candidate that brings the cycle's mix of decisions closest
    (L1) to the pattern's shares; candidates are the unpicked rows (all rows once every row is picked),
    at most MIX_CANDIDATES of them drawn at random per step."""
    totals = counts.sum(axis=0)[:n_experts]
    present = totals > 0
    if pattern == "single":
        present = np.zeros(n_experts, dtype=bool)
        present[int(np.argmax(totals))] = True
    target = shares(pattern, present)
    n_feeds = cycle_length(batch_size, n_experts)
    rng = np.random.default_rng(seed)
    mix = np.zeros(n_experts)
    unpicked = np.ones(len(counts), dtype=bool)
    picked = []
    for _ in range(n_feeds * batch_size):
        candidates = np.flatnonzero(unpicked) if unpicked.any() else np.arange(len(counts))
        if len(candidates) > MIX_CANDIDATES:
            candidates = rng.choice(candidates, MIX_CANDIDATES, replace=False)
        after = mix + counts[candidates, :n_experts]
        error = np.abs(after / np.maximum(after.sum(axis=1, keepdims=True), 1) - target).sum(axis=1)
        best = int(candidates[np.argmin(error)])
        picked.append(best)
        mix += counts[best, :n_experts]
        unpicked[best] = False
    picked = np.asarray(picked, dtype=np.int64)
    return [rng.permutation(picked[f::n_feeds]) for f in range(n_feeds)]


def histogram(indices: list[np.ndarray] | np.ndarray, n_experts: int) -> list[int]:
    """Rows per expert over all feeds of a cycle.

    Args:
        indices: the routing index of each feed, or one array.
        n_experts: the router's expert count.

    Returns:
        Rows per expert.
    """
    flat = np.concatenate([np.asarray(i).reshape(-1) for i in indices]) if isinstance(indices, list) \
        else np.asarray(indices).reshape(-1)
    return np.bincount(flat.astype(np.int64), minlength=n_experts)[:n_experts].tolist()
