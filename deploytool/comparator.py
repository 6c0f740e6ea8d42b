"""Runners compared: every pair of runners on the same inputs, as verify and export's validation run them.

`compare_runners` activates the runners, feeds each input set through every one of them (in chunks,
`run_batched`) and compares every pair's outputs with `deploytool.compare.compare`; `ParityReport`
holds the result; `check_runners_match` refuses runners that do not run one model. The comparison of
two sets of outputs knows nothing of runners (`deploytool.compare`), as Polygraphy keeps its comparator
apart from its runners.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deploytool.compare import Comparison, Tolerance, compare
from deploytool.errors import BadInput
from deploytool.feeds import Feed, batch_of, take
from deploytool.io import sha256_file
from deploytool.runners import runs_weights
from deploytool.runners.base import Runner

#: samples per call when a runner's batch is not fixed
DEFAULT_BATCH = 256


@dataclass
class ParityReport:
    """Every pair of backends compared on every input set.

    Attributes:
        model: the model (ONNX or engine) verified.
        backends: the backends, in order (the earlier of a pair is its reference).
        inputs: input set label -> samples.
        comparisons: one Comparison per pair and input set.
        checkpoint: the run directory the torch backends loaded, if any.
        metadata: the model's deploytool metadata.
        notes: remarks (a checkpoint that is not the exported one).
    """

    model: str
    backends: list[str]
    inputs: dict[str, int]
    comparisons: list[Comparison]
    checkpoint: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Whether every comparison passed."""
        return all(c.passed for c in self.comparisons)

    def failures(self) -> list[str]:
        """One line per failed comparison (Comparison.summary)."""
        return [c.summary() for c in self.comparisons if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "failures": self.failures()}


def run_batched(runner: Runner, feed: Feed, batch_size: int = DEFAULT_BATCH) -> dict[str, np.ndarray]:
    """Outputs for every sample of `feed`, fed in chunks (engines have a maximum batch), concatenated.

    A static-batch runner takes exactly its batch: chunks are that size, the last one padded by
    repeating its final sample, and the padded samples are dropped from the outputs (routing is per sample).

    Args:
        runner: an active runner.
        feed: inputs by name.
        batch_size: samples per call for a runner whose batch is not fixed.

    Returns:
        Outputs by name, every sample of `feed`.

    Raises:
        BadInput: an empty feed.
    """
    total = batch_of(feed)
    if not total:
        raise BadInput("no samples to run: give at least one")
    fixed = runner.signature.static_batch
    step = fixed or batch_size
    parts = []
    for i in range(0, total, step):
        chunk = take(feed, slice(i, i + step))
        rows = batch_of(chunk)
        if fixed and rows < fixed:
            chunk = {k: np.pad(v, [(0, fixed - rows)] + [(0, 0)] * (v.ndim - 1), mode="edge") for k, v in chunk.items()}
        parts.append({k: v[:rows] for k, v in runner.infer(chunk).items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def compare_runners(runners: Sequence[Runner], inputs: Mapping[str, Feed], *, atol: Tolerance = None,
                    rtol: Tolerance = None, batch_size: int = DEFAULT_BATCH) -> list[Comparison]:
    """Every pair of runners on every input set; the earlier runner of a pair is the reference.

    Args:
        runners: the runners (activated and deactivated here).
        inputs: input sets by label.
        atol: absolute tolerance, or per output name.
        rtol: relative tolerance, likewise.
        batch_size: samples per call.

    Returns:
        One Comparison per pair and input set; the routers judged are those of the first runner that
        names any (torch and ONNX both do).
    """
    comparisons = []
    with contextlib.ExitStack() as stack:
        for runner in runners:
            stack.enter_context(runner)
        routers = next((r.signature.routers for r in runners if r.signature.routers), ())
        for label, feed in inputs.items():
            results = [run_batched(r, feed, batch_size) for r in runners]
            for (i, ref), (j, cand) in itertools.combinations(enumerate(results), 2):
                computes = tuple(r.compute_dtype for r in (runners[i], runners[j]) if r.compute_dtype)
                comparisons.append(compare(ref, cand, routers=routers, atol=atol, rtol=rtol,
                                           reference_name=runners[i].name, candidate_name=runners[j].name,
                                           inputs=label, compute_dtypes=computes))
    return comparisons


def check_runners_match(runners: Sequence[Runner], metadata: dict[str, str], weights: Path | None) -> list[str]:
    """Refuse runners whose signatures disagree (a checkpoint for another model); note a `weights` file
    whose sha256 differs from the one the ONNX `metadata` records (when a torch runner is among them).

    Args:
        runners: the runners to compare (two or more).
        metadata: the exported model's deploytool metadata ({} when there is none).
        weights: the weights file the torch runners loaded, or None.

    Returns:
        Notes (a checkpoint other than the exported one); [] when there is nothing to say.

    Raises:
        BadInput: runners whose inputs or outputs disagree, naming the likely cause.
    """
    def shapes(r: Runner):
        return ({m.name: m.shape[1:] for m in r.inputs}, {m.name: m.shape[1:] for m in r.outputs})

    first, *rest = runners
    ref_in, ref_out = shapes(first)
    for runner in rest:
        ins, outs = shapes(runner)
        if set(ins) != set(ref_in) or any(not _dims_match(ins[k], ref_in[k]) for k in ins) or \
                any(k in ref_out and not _dims_match(v, ref_out[k]) for k, v in outs.items()) or \
                set(outs) != set(ref_out):
            cause = ("the checkpoint does not match the model" if any(map(runs_weights, runners))
                     else "they are not exports of one model")
            raise BadInput(f"{runner.name} and {first.name} disagree on the model's signature (inputs {ins} vs "
                           f"{ref_in}; outputs {sorted(outs)} vs {sorted(ref_out)}): {cause}")
    notes = []
    recorded = metadata.get("deploytool.checkpoint_sha256")
    if recorded and weights and any(map(runs_weights, runners)):
        if Path(weights).is_file() and sha256_file(weights) != recorded:
            notes.append(f"checkpoint {weights} is not the one the model was exported from (sha256 differs)")
    return notes


def _dims_match(a: tuple, b: tuple) -> bool:
    """Same rank, and the same size wherever both are static."""
    return len(a) == len(b) and all(not (isinstance(x, int) and isinstance(y, int)) or x == y for x, y in zip(a, b))
