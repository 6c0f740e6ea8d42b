"""Parity between two sets of outputs, routing-aware; knows nothing of runners or backends.

The runners are compared in `deploytool.comparator`, on top of this module.

Numbers are compared with NumPy's allclose rule, |cand - ref| <= atol + rtol * |ref|; NaN never
matches (not even NaN), equal infinities do. Routing is compared per router, as decisions: a position
(row, token) whose index differs is a flip. A flip is a tie-break (reported, not a failure) when the
reference's top1-top2 probability margin there is within what the tolerance lets two correct backends
disagree on: each prob may move by atol + rtol, so the top two can swap when the margin is below
2 * (atol + rtol). A flip at a larger margin is a real failure, except in a sample where some router
tie-broke: everything after a tie legitimately differs. Every other output is compared on the samples
where every router agrees, since a tie-broken sample runs another expert.

A router's probs are softmax(logits / T): an error e in its logits (from anything upstream: attention,
an earlier layer) moves a prob by up to e / (4T), so at T = 0.02 by 12.5 e. The default atol of a
router's probs (and so its tie margin) is scaled by that gain, max(1, 1 / (4T)); a tolerance the caller
gives is taken as given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from deploytool.errors import BadInput
from deploytool.ops.reference import top2_margin
from deploytool.signature import RouterMeta

#: a tolerance for every output, or per output name (the others take the dtype default)
Tolerance = float | Mapping[str, float] | None

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



def default_tolerance(*dtypes: str) -> tuple[float, float]:
    """(atol, rtol) for the least precise of `dtypes`; integer and unknown dtypes count as float32."""
    ranked = [d for d in _PRECISION_ORDER if d in dtypes]
    return TOLERANCES[ranked[0] if ranked else "float32"]


@dataclass
class OutputDiff:
    """One output compared: error statistics over the rows compared, and whether they pass.

    Attributes:
        name: the output's name.
        dtype: the coarser dtype of the two.
        shape: the candidate's shape.
        rows: rows compared (routed outputs: rows whose decisions agree).
        max_abs: largest absolute error (inf where NaN meets a number).
        mean_abs: mean absolute error.
        p99_abs: 99th percentile of the absolute error.
        max_rel: largest relative error.
        mean_rel: mean relative error.
        p99_rel: 99th percentile of the relative error.
        atol: the absolute tolerance applied.
        rtol: the relative tolerance applied.
        min_atol: the smallest atol that would pass at this rtol.
        passed: every element within atol + rtol * |reference|.
        note: why nothing was compared (shapes differ, no rows).
    """

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
    """One router's decisions compared: flips, and each flip judged by the reference's margin."""

    router: str          # module path
    rows: int            # decisions compared (positions: rows x tokens)
    agreement: float     # percent of decisions that are the same
    flips: int
    tie_breaks: int      # flips at a reference margin below tie_margin
    failures: int        # flips at a larger margin, in samples without a tie-break
    tie_margin: float
    buckets: list[dict[str, Any]]  # [{"lo", "hi", "flips"}] over MARGIN_EDGES
    min_flip_margin: float | None
    passed: bool


@dataclass
class Comparison:
    """Two runners' outputs on one input set.

    Attributes:
        reference: the reference runner's name.
        candidate: the candidate runner's name.
        inputs: the input set's label.
        outputs: every compared output but the routers' indices.
        routing: one RoutingDiff per router.
        passed: every output within tolerance, no routing failure, no note.
        notes: what else failed (an output missing).
    """

    reference: str
    candidate: str
    inputs: str
    outputs: list[OutputDiff]
    routing: list[RoutingDiff]
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
        for r in self.routing:
            if not r.passed:
                parts.append(f"router {r.router}: {r.failures} decision flips at margin >= {r.tie_margin:.3g}")
        parts.extend(self.notes)
        return "; ".join(parts)


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], *,
            routers: Sequence[RouterMeta] = (), atol: Tolerance = None, rtol: Tolerance = None,
            reference_name: str = "reference", candidate_name: str = "candidate", inputs: str = "",
            compute_dtypes: tuple[str, ...] = ()) -> Comparison:
    """Compare every output the reference has, routing-aware for every router in `routers`.

    Args:
        reference: outputs of the reference runner, by name.
        candidate: the candidate's outputs.
        routers: the model's routers (their index/probs outputs are compared as decisions).
        atol: absolute tolerance, or {output name: tolerance} (others take the default); None: the
            default of the least precise of the outputs' dtypes and `compute_dtypes`.
        rtol: relative tolerance, likewise.
        reference_name: label of the reference.
        candidate_name: label of the candidate.
        inputs: label of the input set.
        compute_dtypes: what either side computed in, when coarser than its outputs.

    Returns:
        The Comparison.

    Raises:
        BadInput: a negative, NaN or infinite tolerance.
    """
    check_tolerances(atol, rtol)
    notes = [f"output {k!r} missing from {candidate_name}" for k in reference if k not in candidate]
    judged = [r for r in routers if r.index in reference and r.index in candidate and r.probs in reference]
    gains = {r.probs: temperature_gain(r.temperature) for r in routers}
    routing: list[RoutingDiff] = []
    agree = None
    if judged:
        n = len(reference[judged[0].index])
        limits = {r.path: tie_margin(*_tolerance(r.probs, reference[r.probs], candidate.get(r.probs, reference[r.probs]),
                                                 atol, rtol, compute_dtypes, gains.get(r.probs, 1.0)))
                  for r in judged}
        flips = {r.path: _flips(reference[r.index], candidate[r.index], reference[r.probs], limits[r.path])
                 for r in judged}
        agree, tied = np.ones(n, bool), np.zeros(n, bool)
        for flipped, ties, _ in flips.values():
            if flipped is not None:
                agree &= ~_per_sample(flipped, n)
                tied |= _per_sample(ties, n)
        routing = [_routing_diff(r.path, *flips[r.path], limits[r.path], tied) for r in judged]
    decisions = {r.index for r in judged}
    diffs = []
    for name, ref in reference.items():
        if name in decisions or name not in candidate:
            continue
        diffs.append(compare_output(name, ref, candidate[name], *_tolerance(name, ref, candidate[name], atol, rtol,
                                                                             compute_dtypes, gains.get(name, 1.0)),
                                    rows=agree))
    passed = not notes and all(d.passed for d in diffs) and all(r.passed for r in routing)
    return Comparison(reference=reference_name, candidate=candidate_name, inputs=inputs, outputs=diffs,
                      routing=routing, passed=passed, notes=notes)


def _flips(ref_index: np.ndarray, cand_index: np.ndarray, ref_probs: np.ndarray, limit: float):
    """(flipped positions, tie-break positions, the reference's top1-top2 margins) of one router;
    (None, None, None) when the shapes differ."""
    if ref_index.shape != cand_index.shape:
        return None, None, None
    if ref_index.ndim == ref_probs.ndim:  # a top-k router: a position flips when its set of k experts differs
        k = ref_index.shape[-1]
        flipped = (np.sort(ref_index, axis=-1) != np.sort(cand_index, axis=-1)).any(axis=-1)
        ranked = -np.sort(-ref_probs, axis=-1)
        gap = ranked[..., k - 1] - ranked[..., k] if ref_probs.shape[-1] > k else np.ones(flipped.shape)
        margins = np.nan_to_num(gap, nan=1.0)
    else:
        flipped = ref_index != cand_index
        margins = (np.nan_to_num(top2_margin(ref_probs), nan=1.0).reshape(flipped.shape) if ref_probs.shape[-1] > 1
                   else np.zeros(flipped.shape))  # a flip on a NaN row is never a tie
    return flipped, flipped & (margins < limit), margins


def _per_sample(mask: np.ndarray, n: int) -> np.ndarray:
    """Positions -> samples: True where any position of the sample is True."""
    return mask.reshape(n, -1).any(axis=1) if mask.ndim else np.full(n, bool(mask))


def check_tolerances(atol: Tolerance, rtol: Tolerance) -> None:
    """Refuse a negative, NaN or infinite tolerance: allclose with one would pass or fail meaninglessly.

    Args:
        atol: absolute tolerance, per output name or for all, or None.
        rtol: relative tolerance, likewise.

    Raises:
        BadInput: a tolerance that is not a finite number >= 0.
    """
    for name, value in (("atol", atol), ("rtol", rtol)):
        values = value.values() if isinstance(value, Mapping) else [value]
        for v in values:
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise BadInput(f"{name} must be a finite number >= 0, got {v!r}")


def temperature_gain(temperature: float) -> float:
    """How much a tempered softmax can amplify an error in its logits: max(1, 1 / (4T))."""
    return max(1.0, 0.25 / temperature) if temperature > 0 else 1.0


def _tolerance(name: str, ref: np.ndarray, cand: np.ndarray, atol: Tolerance, rtol: Tolerance,
               compute_dtypes: tuple[str, ...] = (), gain: float = 1.0) -> tuple[float, float]:
    default_atol, default_rtol = default_tolerance(ref.dtype.name, cand.dtype.name, *compute_dtypes)
    default_atol *= gain
    a = atol.get(name) if isinstance(atol, Mapping) else atol
    r = rtol.get(name) if isinstance(rtol, Mapping) else rtol
    return (default_atol if a is None else float(a), default_rtol if r is None else float(r))


def compare_output(name: str, ref: np.ndarray, cand: np.ndarray, atol: float, rtol: float,
                   rows: np.ndarray | None = None) -> OutputDiff:
    """Error statistics of one output; `rows` (bool mask) restricts the comparison to those rows.

    Args:
        name: the output's name.
        ref: the reference's values.
        cand: the candidate's values.
        atol: absolute tolerance.
        rtol: relative tolerance.
        rows: which rows to compare (None: all).

    Returns:
        The OutputDiff (failed, with a note, when the shapes differ).
    """
    dtype = min((ref.dtype.name, cand.dtype.name),
                key=lambda d: _PRECISION_ORDER.index(d) if d in _PRECISION_ORDER else 99)
    if ref.shape != cand.shape:
        nan = float("nan")
        return OutputDiff(name=name, dtype=dtype, shape=list(cand.shape), rows=0, **dict.fromkeys(_ERROR_STATS, nan),
                          atol=atol, rtol=rtol, min_atol=nan, passed=False,
                          note=f"shape {list(cand.shape)} != reference {list(ref.shape)}")
    if rows is not None and ref.ndim and rows.shape == ref.shape[:1]:
        ref, cand = ref[rows], cand[rows]
    r = ref.astype(np.float64)
    c = cand.astype(np.float64)
    if r.size == 0:
        return OutputDiff(name=name, dtype=dtype, shape=list(cand.shape), rows=0, **dict.fromkeys(_ERROR_STATS, 0.0),
                          atol=atol, rtol=rtol, min_atol=0.0, passed=True, note="no rows to compare")
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        err = np.abs(c - r)
        err[r == c] = 0.0  # equal infinities too (inf - inf is NaN); NaN equals nothing
        err[np.isnan(err)] = np.inf  # NaN on either side fails
        rel = np.where(err == 0, 0.0, err / np.abs(r))  # an error against an exact 0 is infinitely relative
        min_atol = float(np.max(np.maximum(err - rtol * np.abs(np.nan_to_num(r)), 0.0)))
        stats = [float(f(a)) for a in (err, rel) for f in (np.max, np.mean, lambda v: np.percentile(v, 99))]
    return OutputDiff(name=name, dtype=dtype, shape=list(cand.shape), rows=int(len(r)) if r.ndim else 1,
                      **dict(zip(_ERROR_STATS, stats)), atol=atol, rtol=rtol, min_atol=min_atol,
                      passed=bool(min_atol <= atol))


#: OutputDiff's error statistics, in the order compare_output computes them
_ERROR_STATS = ("max_abs", "mean_abs", "p99_abs", "max_rel", "mean_rel", "p99_rel")


def tie_margin(atol: float, rtol: float) -> float:
    """The largest top1-top2 margin at which two backends within tolerance may pick different experts.

    Args:
        atol: absolute tolerance of the probs.
        rtol: relative tolerance of the probs.

    Returns:
        2 * (atol + rtol).
    """
    return 2.0 * (atol + rtol)


def compare_routing(ref_index: np.ndarray, cand_index: np.ndarray, ref_probs: np.ndarray, atol: float,
                    rtol: float, *, router: str = "router", tied_samples: np.ndarray | None = None) -> RoutingDiff:
    """One router's decision agreement, each flip judged by the reference's margin at that position;
    a large-margin flip in a sample listed in `tied_samples` (where some router tie-broke) is not a failure.

    Args:
        ref_index: the reference's decisions.
        cand_index: the candidate's decisions.
        ref_probs: the reference's probs (margins are read from them).
        atol: absolute tolerance of the probs.
        rtol: relative tolerance of the probs.
        router: the router's module path (named in the result).
        tied_samples: samples where some router tie-broke, or None.

    Returns:
        The RoutingDiff (failed when the shapes differ).
    """
    limit = tie_margin(atol, rtol)
    return _routing_diff(router, *_flips(ref_index, cand_index, ref_probs, limit), limit, tied_samples)


def _routing_diff(router: str, flipped: np.ndarray | None, ties: np.ndarray | None, margins: np.ndarray | None,
                  limit: float, tied_samples: np.ndarray | None) -> RoutingDiff:
    if flipped is None:  # shapes differ: nothing compared, a failure
        return RoutingDiff(router=router, rows=0, agreement=0.0, flips=0, tie_breaks=0, failures=0, tie_margin=limit,
                           buckets=[], min_flip_margin=None, passed=False)
    failing = flipped & ~ties
    if tied_samples is not None and flipped.ndim:
        failing &= ~tied_samples.reshape(-1, *([1] * (flipped.ndim - 1)))
    counts, _ = np.histogram(margins[flipped], bins=MARGIN_EDGES)
    buckets = [{"lo": lo, "hi": hi, "flips": int(k)} for lo, hi, k in zip(MARGIN_EDGES, MARGIN_EDGES[1:], counts)]
    n, n_flips, failures = int(flipped.size), int(flipped.sum()), int(failing.sum())
    return RoutingDiff(router=router, rows=n, agreement=100.0 * (1.0 - n_flips / n) if n else 100.0, flips=n_flips,
                       tie_breaks=n_flips - failures, failures=failures, tie_margin=limit, buckets=buckets,
                       min_flip_margin=float(margins[flipped].min()) if n_flips else None, passed=failures == 0)
