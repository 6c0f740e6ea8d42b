"""`verify`: run the same inputs through several backends and compare every pair, routing-aware.

`verify` returns a ParityReport whether or not it passed (`report.passed`); the CLI renders it and
exits 1 on a failure, a Python caller decides for itself. Bad input (missing or broken files, a
checkpoint that does not match the model, a feature mismatch, NaN inputs, an unknown backend) raises
BadInput before anything runs. Export reuses `compare_runners` for its validation right after export.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deploytool.compare import Comparison, check_tolerances, compare
from deploytool.errors import BadInput
from deploytool.io import WEIGHTS_FILE
from deploytool.runners import INPUT_NAME, Runner, make_runner, parse_backends, static_batch
from deploytool.runtime import artifact_kind, check_rows

DEFAULT_SAMPLES = 512
DEFAULT_BATCH = 256


@dataclass
class ParityReport:
    model: str
    backends: list[str]
    inputs: dict[str, int]             # input set name -> rows
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


def check_inputs(x: np.ndarray, n_features: int | str | None, what: str = "inputs") -> np.ndarray:
    """Rows as runtime.check_rows accepts them, in float32 (what every fp32 runner takes)."""
    return check_rows(x, n_features, what).astype(np.float32, copy=False)


def run_batched(runner: Runner, x: np.ndarray, batch_size: int = DEFAULT_BATCH) -> dict[str, np.ndarray]:
    """Outputs for every row of `x`, fed in chunks (engines have a maximum batch), concatenated.

    A static-batch runner takes exactly its batch: chunks are that size, the last one padded by
    repeating its final row, and the padded rows are dropped from the outputs (routing is per row).
    """
    if not len(x):
        raise BadInput("no rows to run: give at least one")
    fixed = static_batch(runner)
    step = fixed or batch_size
    parts = []
    for i in range(0, len(x), step):
        chunk = x[i:i + step]
        rows = len(chunk)
        if fixed and rows < fixed:
            chunk = np.pad(chunk, [(0, fixed - rows)] + [(0, 0)] * (chunk.ndim - 1), mode="edge")
        parts.append({k: v[:rows] for k, v in runner.infer({INPUT_NAME: chunk}).items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def compare_runners(runners: Sequence[Runner], inputs: Mapping[str, np.ndarray], *, atol: float | None = None,
                    rtol: float | None = None, batch_size: int = DEFAULT_BATCH) -> list[Comparison]:
    """Every pair of runners on every input set; the earlier runner of a pair is the reference."""
    comparisons = []
    with contextlib.ExitStack() as stack:
        for runner in runners:
            stack.enter_context(runner)
        for label, x in inputs.items():
            results = [run_batched(r, x, batch_size) for r in runners]
            for (i, ref), (j, cand) in itertools.combinations(enumerate(results), 2):
                computes = tuple(r.compute_dtype for r in (runners[i], runners[j]) if r.compute_dtype)
                comparisons.append(compare(ref, cand, atol=atol, rtol=rtol, reference_name=runners[i].name,
                                           candidate_name=runners[j].name, inputs=label, compute_dtypes=computes))
    return comparisons


def resolve_checkpoint(checkpoint: str | Path) -> tuple[Path, Path | None]:
    """(run directory, weights file or None for the run's own): a run dir, or a weights file inside one."""
    path = Path(checkpoint)
    if path.is_dir():
        return path, None
    if path.is_file():
        return path.parent, path
    raise BadInput(f"checkpoint {path} does not exist (give a run directory or its model.safetensors)")


def load_inputs(data: str | Path | np.ndarray, samples: int | None = None, seed: int = 0,
                **data_options: Any) -> tuple[str, np.ndarray]:
    """(label, rows): a data set's held-out rows (all of them for samples=None), training rows after
    them when more are asked for; an array is taken as given."""
    if samples is not None and samples < 1:
        raise BadInput(f"samples must be >= 1, got {samples}")
    if isinstance(data, np.ndarray):
        return "array", data[:samples]
    from deploytool.data import load_dataset

    ds = load_dataset(str(data), seed, **data_options)
    if samples is None or samples <= len(ds.x_test):
        return f"{ds.name} held-out", ds.x_test[:samples]
    return f"{ds.name} held-out + train", np.concatenate([ds.x_test, ds.x_train])[:samples]


def verify(model_path: str | Path, checkpoint: str | Path | None = None,
           backends: str | Sequence[str] = ("torch", "onnxruntime"), data: str | Path | np.ndarray = "digits",
           samples: int = DEFAULT_SAMPLES, atol: float | None = None, rtol: float | None = None, *,
           seed: int = 0) -> ParityReport:
    """Compare `backends` pairwise on `samples` rows of `data`; returns the report (see `.passed`).

    `model_path` is the ONNX model (or a TensorRT engine when only tensorrt needs a file);
    `checkpoint` is the run directory (or its weights file) the torch backends load.
    """
    from deploytool.export.onnx import read_onnx_metadata
    from deploytool.runners.ort import check_onnx_file

    names = parse_backends(backends, minimum=2)
    check_tolerances(atol, rtol)
    model_path = check_onnx_file(model_path, "model")
    is_engine = artifact_kind(model_path) == "engine"
    engine_path = model_path if is_engine else None
    onnx_path = None if is_engine else model_path
    metadata = read_onnx_metadata(onnx_path) if onnx_path else {}
    run_dir = weights = None
    if any(n.startswith("torch") for n in names):
        if checkpoint is None:
            raise BadInput("the torch backends need the model's weights: give --checkpoint RUN_DIR")
        run_dir, weights = resolve_checkpoint(checkpoint)
    runners = [make_runner(n, run_dir=run_dir, onnx_path=onnx_path, engine_path=engine_path,
                           **({"checkpoint": weights} if n.startswith("torch") else {})) for n in names]
    notes = check_runners_match(runners, metadata, weights or (run_dir and run_dir / WEIGHTS_FILE))
    n_features = runners[0].inputs[0].shape[-1]
    label, x = load_inputs(data, samples, seed)
    x = check_inputs(x, n_features, what=f"{label} rows")
    comparisons = compare_runners(runners, {label: x}, atol=atol, rtol=rtol)
    return ParityReport(str(model_path), names, {label: len(x)}, comparisons,
                        str(checkpoint) if checkpoint else None, metadata, notes)


def check_runners_match(runners: Sequence[Runner], metadata: dict[str, str], weights: Path | None) -> list[str]:
    """Refuse runners whose shapes disagree (a checkpoint for another model); note a `weights` file
    whose sha256 differs from the one the ONNX `metadata` records (when a torch runner is among them)."""
    from deploytool.runners.torch import TorchRunner

    shapes = [(r.name, ([m.shape[-1] for m in r.inputs], {m.name: m.shape[1:] for m in r.outputs}))
              for r in runners]  # a list: two runners may share a name
    (first, ref), *rest = shapes
    for name, other in rest:
        if other[0] != ref[0] or any(other[1].get(k, v) != v for k, v in ref[1].items()):
            raise BadInput(f"{name} and {first} disagree on shapes (inputs {other[0]} vs {ref[0]}, outputs "
                           f"{other[1]} vs {ref[1]}): the checkpoint does not match the model")
    notes = []
    recorded = metadata.get("deploytool.checkpoint_sha256")
    if recorded and weights and any(isinstance(r, TorchRunner) for r in runners):
        from deploytool.io import sha256_file

        if Path(weights).is_file() and sha256_file(weights) != recorded:
            notes.append(f"checkpoint {weights} is not the one the model was exported from (sha256 differs)")
    return notes
