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


def verify(model_path: str | Path, *, checkpoint: str | Path | None = None,
           backends: str | Sequence[str] = ("torch", "onnxruntime"), data: Any = "digits",
           samples: int = DEFAULT_SAMPLES, atol: Tolerance = None, rtol: Tolerance = None,
           seed: int = 0) -> ParityReport:
    """Compare `backends` pairwise on `samples` samples of `data`: every output, every router's decisions.

    Args:
        model_path: the ONNX model, or a TensorRT engine (then tensorrt is the only file-based backend).
        checkpoint: the run directory (or its weights file) the torch backends load.
        backends: two or more backend names (see deploytool.runners.BACKENDS).
        data: a data set name, .npz, array or dict of arrays (see deploytool.feeds.load_feed).
        samples: how many samples to compare.
        atol: absolute tolerance, or per output name (default: by dtype).
        rtol: relative tolerance, likewise.
        seed: the data split's seed.

    Returns:
        The ParityReport (see `.passed`).

    Raises:
        BadInput: bad files, backends, tolerances or data; a model without routers; a checkpoint that
            does not match the model.
        MissingDependency: a backend's library or hardware is missing.
    """
    names = parse_backends(backends, minimum=2)
    check_tolerances(atol, rtol)
    art = open_artifact(model_path)
    if art.kind == "run":
        raise BadInput(f"{model_path} is a run directory, not a model; export it first: "
                       f"deploytool export {model_path} --out model.onnx")
    files = {art.kind: art.path}
    run_dir = weights = None
    if any(artifact_of(n) == "run" for n in names):
        if checkpoint is None:
            raise BadInput("the torch backends need the model's weights: give the checkpoint (its run directory)")
        run_dir, weights = resolve_checkpoint(checkpoint)
        files["run"] = run_dir
    missing = [n for n in names if artifact_of(n) not in files]
    if missing:
        raise BadInput(f"backend {missing[0]} needs {'an engine' if artifact_of(missing[0]) == 'engine' else 'an ONNX model'}"
                       f", and {model_path} is {'an engine' if art.kind == 'engine' else 'an ONNX model'}")
    runners = [make_runner(n, files[artifact_of(n)], **({"checkpoint": weights} if artifact_of(n) == "run" else {}))
               for n in names]
    art.signature.require_router(str(model_path))
    notes = check_runners_match(runners, art.metadata, weights or (run_dir and run_dir / WEIGHTS_FILE))
    label, feed = load_feed(data, art.signature, samples=samples, seed=seed)
    comparisons = compare_runners(runners, {label: feed}, atol=atol, rtol=rtol)
    return ParityReport(str(model_path), names, {label: batch_of(feed)}, comparisons,
                        str(checkpoint) if checkpoint else None, art.metadata, notes)


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
