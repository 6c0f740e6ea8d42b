"""`verify`: run the same inputs through several backends and compare every pair, routing-aware.

`verify` returns a ParityReport whether or not it passed (`report.passed`); the CLI renders it and
exits 1 on a failure, a Python caller decides for itself. Bad input (missing or broken files, a
checkpoint that does not match the model, inputs that do not fit its signature, NaN inputs, an unknown
backend, a model without routers) raises BadInput before anything runs. Export reuses
`compare_runners` for its validation right after export.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deploytool.artifacts import open_artifact
from deploytool.compare import Comparison, Tolerance, check_tolerances, compare
from deploytool.errors import BadInput
from deploytool.feeds import Feed, batch_of, load_feed, take
from deploytool.io import WEIGHTS_FILE
from deploytool.runners import Runner, artifact_of, make_runner, parse_backends

DEFAULT_SAMPLES = 512
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
        return all(c.passed for c in self.comparisons)

    def failures(self) -> list[str]:
        return [c.summary() for c in self.comparisons if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "failures": self.failures()}


def run_batched(runner: Runner, feed: Feed, batch_size: int = DEFAULT_BATCH) -> dict[str, np.ndarray]:
    """Outputs for every sample of `feed`, fed in chunks (engines have a maximum batch), concatenated.

    A static-batch runner takes exactly its batch: chunks are that size, the last one padded by
    repeating its final sample, and the padded samples are dropped from the outputs (routing is per sample).
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
    """Every pair of runners on every input set; the earlier runner of a pair is the reference. The
    routers judged are those of the first runner that names any (torch and ONNX both do)."""
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


def resolve_checkpoint(checkpoint: str | Path) -> tuple[Path, Path | None]:
    """(run directory, weights file or None for the run's own): a run dir, or a weights file inside one."""
    path = Path(checkpoint)
    if path.is_dir():
        return path, None
    if path.is_file():
        return path.parent, path
    raise BadInput(f"checkpoint {path} does not exist (give a run directory or its model.safetensors)")


def verify(model_path: str | Path | Sequence[str | Path], *, checkpoint: str | Path | None = None,
           backends: str | Sequence[str] = ("torch", "onnxruntime"), data: Any = "digits",
           samples: int = DEFAULT_SAMPLES, atol: Tolerance = None, rtol: Tolerance = None,
           seed: int = 0) -> ParityReport:
    """Compare `backends` pairwise on `samples` samples of `data`: every output, every router's decisions.

    Several models of one network (the sparse and the dense export, an engine and its ONNX model) are
    compared with each other too: every file backend runs on every model it reads.

    Args:
        model_path: the ONNX model or TensorRT engine, or several of them.
        checkpoint: the run directory (or its weights file) the torch backends load.
        backends: backend names (see deploytool.runners.BACKENDS); two runners at least in all.
        data: a data set name, .npz, array or dict of arrays (see deploytool.feeds.load_feed).
        samples: how many samples to compare.
        atol: absolute tolerance, or per output name (default: by dtype).
        rtol: relative tolerance, likewise.
        seed: the data split's seed.

    Returns:
        The ParityReport (see `.passed`).

    Raises:
        BadInput: bad files, backends, tolerances or data; a model without routers; models or a
            checkpoint that do not match each other.
        MissingDependency: a backend's library or hardware is missing.
    """
    paths = [Path(model_path)] if isinstance(model_path, (str, Path)) else [Path(p) for p in model_path]
    if not paths or len({p.resolve() for p in paths}) != len(paths):
        raise BadInput("give one or more distinct models")
    names = parse_backends(backends, minimum=1 if len(paths) > 1 else 2)
    check_tolerances(atol, rtol)
    arts = [open_artifact(p) for p in paths]
    for art in arts:
        if art.kind == "run":
            raise BadInput(f"{art.path} is a run directory, not a model; export it first: "
                           f"deploytool export {art.path} --out model.onnx")
        art.signature.require_router(str(art.path))
    run_dir = weights = None
    if any(artifact_of(n) == "run" for n in names):
        if checkpoint is None:
            raise BadInput("the torch backends need the model's weights: give the checkpoint (its run directory)")
        run_dir, weights = resolve_checkpoint(checkpoint)
    runners = []
    for name in names:
        kind = artifact_of(name)
        if kind == "run":
            runners.append(make_runner(name, run_dir, checkpoint=weights))
            continue
        readable = [a for a in arts if a.kind == kind]
        if not readable:
            raise BadInput(f"backend {name} needs {'an engine' if kind == 'engine' else 'an ONNX model'}; "
                           f"{', '.join(str(p) for p in paths)} {'is' if len(paths) == 1 else 'are'} not one")
        for art in readable:
            runners.append(make_runner(name, art.path))
            if len(paths) > 1:
                runners[-1].name = f"{name} {art.path.name}"
    if len(runners) < 2:
        raise BadInput(f"{len(runners)} runner to compare; give two backends, or several models")
    metadata = arts[0].metadata
    notes = check_runners_match(runners, metadata, weights or (run_dir and run_dir / WEIGHTS_FILE))
    label, feed = load_feed(data, arts[0].signature, samples=samples, seed=seed)
    comparisons = compare_runners(runners, {label: feed}, atol=atol, rtol=rtol)
    return ParityReport(", ".join(map(str, paths)), [r.name for r in runners], {label: batch_of(feed)}, comparisons,
                        str(checkpoint) if checkpoint else None, metadata, notes)


def check_runners_match(runners: Sequence[Runner], metadata: dict[str, str], weights: Path | None) -> list[str]:
    """Refuse runners whose signatures disagree (a checkpoint for another model); note a `weights` file
    whose sha256 differs from the one the ONNX `metadata` records (when a torch runner is among them)."""
    def shapes(r: Runner):
        return ({m.name: m.shape[1:] for m in r.inputs}, {m.name: m.shape[1:] for m in r.outputs})

    first, *rest = runners
    ref_in, ref_out = shapes(first)
    for runner in rest:
        ins, outs = shapes(runner)
        if set(ins) != set(ref_in) or any(not _dims_match(ins[k], ref_in[k]) for k in ins) or \
                any(k in ref_out and not _dims_match(v, ref_out[k]) for k, v in outs.items()) or \
                set(outs) != set(ref_out):
            raise BadInput(f"{runner.name} and {first.name} disagree on the model's signature (inputs {ins} vs "
                           f"{ref_in}; outputs {sorted(outs)} vs {sorted(ref_out)}): the checkpoint does not "
                           "match the model")
    notes = []
    recorded = metadata.get("deploytool.checkpoint_sha256")
    if recorded and weights and any(r.backend == "torch" for r in runners):
        from deploytool.io import sha256_file

        if Path(weights).is_file() and sha256_file(weights) != recorded:
            notes.append(f"checkpoint {weights} is not the one the model was exported from (sha256 differs)")
    return notes


def _dims_match(a: tuple, b: tuple) -> bool:
    """Same rank, and the same size wherever both are static."""
    return len(a) == len(b) and all(not (isinstance(x, int) and isinstance(y, int)) or x == y for x, y in zip(a, b))
