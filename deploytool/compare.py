"""Parity between two runners' outputs, routing-aware; knows nothing of backends.

Numbers are compared with NumPy's allclose rule, |cand - ref| <= atol + rtol * |ref|. Routing is
compared as decisions: a row whose `index` differs is a flip. A flip is a tie-break (reported, not a
failure) when the reference's top1-top2 probability margin is within what the tolerance lets two
correct backends disagree on: each prob may move by atol + rtol, so the ordering of the top two can
swap when the margin is below 2 * (atol + rtol). A flip at a larger margin is a real failure. Outputs
downstream of the decision (`output`) are compared only on rows where the decisions agree, since a
tie-broken row legitimately runs another expert.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from deploytool.errors import BadInput
from deploytool.ops.reference import top2_margin

#: default (atol, rtol) by the least precise dtype of the two outputs compared: the one table
TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-7, 1e-7),
    "float32": (1e-5, 1e-4),
    "float16": (1e-3, 1e-2),
    "bfloat16": (1e-2, 5e-2),
}
_PRECISION_ORDER = ("bfloat16", "float16", "float32", "float64")

#: edges of the reference-margin buckets that flips are counted in
MARGIN_EDGES = (0.0, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)

DECISION = "index"
PROBS = "probs"
#: outputs computed after the routing decision (compared on agreeing rows only)
ROUTED_OUTPUTS = ("output",)


def default_tolerance(*dtypes: str) -> tuple[float, float]:
    """(atol, rtol) for the least precise of `dtypes`; integer and unknown dtypes count as float32."""
    ranked = [d for d in _PRECISION_ORDER if d in dtypes]
    return TOLERANCES[ranked[0] if ranked else "float32"]


@dataclass
class OutputDiff:
    name: str
    dtype: str
    shape: list[int]
    rows: int            # rows compared (routed outputs: rows whose decisions agree)
    max_abs: float
    mean_abs: float
    p99_abs: float
    max_rel: float
    mean_rel: float
    p99_rel: float
    atol: float
    rtol: float
    min_atol: float      # the smallest atol that would pass at this rtol
    passed: bool
    note: str = ""


@dataclass
class RoutingDiff:
    rows: int
    agreement: float     # percent of rows with the same decision
    flips: int
    tie_breaks: int      # flips at a reference margin below tie_margin
    failures: int        # flips at a larger margin
    tie_margin: float
    buckets: list[dict[str, Any]]  # [{"lo", "hi", "flips"}] over MARGIN_EDGES
    min_flip_margin: float | None
    passed: bool


@dataclass
class Comparison:
    reference: str
    candidate: str
    inputs: str
    outputs: list[OutputDiff]
    routing: RoutingDiff | None
    passed: bool
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line: what failed, for error messages."""
        bad = [o.name for o in self.outputs if not o.passed]
        parts = [f"{self.candidate} vs {self.reference} on {self.inputs}"]
        if bad:
            parts.append("outputs out of tolerance: " + ", ".join(
                f"{o.name} (max abs {o.max_abs:.3g} > atol {o.atol:g})" for o in self.outputs if not o.passed))
        if self.routing is not None and not self.routing.passed:
            parts.append(f"{self.routing.failures} routing flips at margin >= {self.routing.tie_margin:.3g}")
        parts.extend(self.notes)
        return "; ".join(parts)


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], *, atol: float | None = None,
            rtol: float | None = None, reference_name: str = "reference", candidate_name: str = "candidate",
            inputs: str = "", compute_dtypes: tuple[str, ...] = ()) -> Comparison:
    """Compare every output the two dicts share; atol/rtol None take the defaults of the least precise
    of the outputs' dtypes and `compute_dtypes` (what either side computed in, when coarser)."""
    check_tolerances(atol, rtol)
    notes = [f"output {k!r} missing from {candidate_name}" for k in reference if k not in candidate]
    routing = None
    agree = None
    if DECISION in reference and DECISION in candidate and PROBS in reference:
        tol = _tolerance(reference[PROBS], candidate.get(PROBS, reference[PROBS]), atol, rtol, compute_dtypes)
        routing = compare_routing(reference[DECISION], candidate[DECISION], reference[PROBS], *tol)
        if reference[DECISION].shape == candidate[DECISION].shape:
            agree = reference[DECISION] == candidate[DECISION]
    diffs = []
    for name, ref in reference.items():
        if name == DECISION or name not in candidate:
            continue
        rows = agree if name in ROUTED_OUTPUTS else None
        diffs.append(compare_output(name, ref, candidate[name],
                                    *_tolerance(ref, candidate[name], atol, rtol, compute_dtypes), rows=rows))
    passed = not notes and all(d.passed for d in diffs) and (routing is None or routing.passed)
    return Comparison(reference_name, candidate_name, inputs, diffs, routing, passed, notes)


def check_tolerances(atol: float | None, rtol: float | None) -> None:
    """Refuse a negative, NaN or infinite tolerance: allclose with one would pass or fail meaninglessly."""
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise BadInput(f"--{name} must be a finite number >= 0, got {value}")


def _tolerance(ref: np.ndarray, cand: np.ndarray, atol: float | None, rtol: float | None,
               compute_dtypes: tuple[str, ...] = ()) -> tuple[float, float]:
    default_atol, default_rtol = default_tolerance(ref.dtype.name, cand.dtype.name, *compute_dtypes)
    return (default_atol if atol is None else float(atol), default_rtol if rtol is None else float(rtol))


def compare_output(name: str, ref: np.ndarray, cand: np.ndarray, atol: float, rtol: float,
                   rows: np.ndarray | None = None) -> OutputDiff:
    """Error statistics of one output; `rows` (bool mask) restricts the comparison to those rows."""
    dtype = min((ref.dtype.name, cand.dtype.name),
                key=lambda d: _PRECISION_ORDER.index(d) if d in _PRECISION_ORDER else 99)
    if ref.shape != cand.shape:
        nan = float("nan")
        return OutputDiff(name, dtype, list(cand.shape), 0, nan, nan, nan, nan, nan, nan, atol, rtol, nan, False,
                          f"shape {list(cand.shape)} != reference {list(ref.shape)}")
    if rows is not None and ref.ndim and rows.shape == ref.shape[:1]:
        ref, cand = ref[rows], cand[rows]
    r = ref.astype(np.float64)
    c = cand.astype(np.float64)
    if r.size == 0:
        return OutputDiff(name, dtype, list(cand.shape), 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, atol, rtol, 0.0, True,
                          "no rows to compare")
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        err = np.abs(c - r)
        err[(r == c) | (np.isnan(r) & np.isnan(c))] = 0.0  # equal infinities too: inf - inf is NaN
        err[np.isnan(err)] = np.inf  # NaN on one side only
        rel = np.where(err == 0, 0.0, err / np.abs(r))  # an error against an exact 0 is infinitely relative
        min_atol = float(np.max(np.maximum(err - rtol * np.abs(np.nan_to_num(r)), 0.0)))
        stats = [float(f(a)) for a in (err, rel) for f in (np.max, np.mean, lambda v: np.percentile(v, 99))]
    return OutputDiff(name, dtype, list(cand.shape), int(len(r)) if r.ndim else 1, *stats, atol, rtol, min_atol,
                      bool(min_atol <= atol))


def tie_margin(atol: float, rtol: float) -> float:
    """The largest top1-top2 margin at which two backends within tolerance may pick different experts."""
    return 2.0 * (atol + rtol)


def compare_routing(ref_index: np.ndarray, cand_index: np.ndarray, ref_probs: np.ndarray, atol: float,
                    rtol: float) -> RoutingDiff:
    """Decision agreement, and each flip judged by the reference's margin at that row."""
    limit = tie_margin(atol, rtol)
    if ref_index.shape != cand_index.shape:
        return RoutingDiff(0, 0.0, 0, 0, 0, limit, [], None, False)
    flipped = ref_index != cand_index
    margins = top2_margin(ref_probs)[flipped] if ref_probs.shape[-1] > 1 else np.zeros(int(flipped.sum()))
    margins = np.nan_to_num(margins, nan=1.0)  # a flip on a NaN row is never a tie
    counts, _ = np.histogram(margins, bins=MARGIN_EDGES)
    buckets = [{"lo": lo, "hi": hi, "flips": int(n)} for lo, hi, n in zip(MARGIN_EDGES, MARGIN_EDGES[1:], counts)]
    failures = int((margins >= limit).sum())
    n = int(flipped.size)
    return RoutingDiff(n, 100.0 * (1.0 - flipped.sum() / n) if n else 100.0, int(flipped.sum()),
                       int(flipped.sum()) - failures, failures, limit, buckets,
                       float(margins.min()) if margins.size else None, failures == 0)
