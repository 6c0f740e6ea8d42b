"""`verify`: run the same inputs through several backends and compare every pair, routing-aware.

`verify` returns a ParityReport whether or not it passed (`report.passed`); the CLI renders it and
exits 1 on a failure, a Python caller decides for itself. Bad input (missing or broken files, a
checkpoint that does not match the model, inputs that do not fit its signature, NaN inputs, an unknown
backend, a model without routers) raises BadInput before anything runs. Export reuses
`compare_runners` for its validation right after export.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deploytool.artifacts import MODULE_KINDS, is_hf_folder, load_run, open_artifact, top_k_of
from deploytool.compare import ParityReport, Tolerance, check_tolerances, compare_runners
from deploytool.errors import BadInput
from deploytool.feeds import batch_of, sample_feed
from deploytool.io import WEIGHTS_FILE
from deploytool.runners import Runner, artifact_of, make_runner, parse_backends

DEFAULT_SAMPLES = 512


def resolve_checkpoint(checkpoint: str | Path) -> tuple[Path, Path | None]:
    """(run directory, weights file or None for the run's own): a run dir, or a weights file inside one."""
    path = Path(checkpoint)
    if path.is_dir():  # a run directory or a Hugging Face folder
        return path, None
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise BadInput(f"checkpoint {path} is neither a run directory nor its .safetensors weights")
        return path.parent, path
    raise BadInput(f"checkpoint {path} does not exist (give a run directory or its model.safetensors)")


def verify(model_path: str | Path | Sequence[str | Path], *, checkpoint: str | Path | None = None,
           backends: str | Sequence[str] = ("torch", "onnxruntime"), data: Any = None,
           samples: int = DEFAULT_SAMPLES, atol: Tolerance = None, rtol: Tolerance = None,
           seed: int = 0) -> ParityReport:
    """Compare `backends` pairwise on `samples` samples of `data`: every output, every router's decisions.

    Several models of one network (the sparse and the dense export, an engine and its ONNX model) are
    compared with each other too: every file backend runs on every model it reads.

    Args:
        model_path: the ONNX model or TensorRT engine, or several of them.
        checkpoint: the run directory (or its weights file) or Hugging Face folder the torch backends load.
        backends: backend names (see deploytool.runners.BACKENDS); two runners at least in all.
        data: a data set name, .npz, array or dict of arrays (see deploytool.feeds.load_feed); default the
            data set of the run (the checkpoint's, else the one the model was exported from), else
            made-up samples from the signature.
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
        if art.kind in MODULE_KINDS:
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
            runners.append(make_runner(name, run_dir, checkpoint=weights, **hf_options(run_dir, arts[0].signature)))
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
    source = run_dir or arts[0].source_run
    run_config = load_run(source).config if source is not None and data is None and not is_hf_folder(source) else None
    label, feed = sample_feed(arts[0].signature, data=data, run_config=run_config, samples=samples, seed=seed,
                              made_up=samples)
    comparisons = compare_runners(runners, {label: feed}, atol=atol, rtol=rtol)
    return ParityReport(", ".join(map(str, paths)), [r.name for r in runners], {label: batch_of(feed)}, comparisons,
                        str(checkpoint) if checkpoint else None, metadata, notes)


def hf_options(source: Path | None, signature) -> dict:
    """The torch runner's options for a Hugging Face folder: the top-k the exported model was made with."""
    if source is None or not is_hf_folder(source):
        return {}
    return {"top_k": top_k_of(signature)}


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
            cause = ("the checkpoint does not match the model" if any(r.backend.startswith("torch") for r in runners)
                     else "they are not exports of one model")
            raise BadInput(f"{runner.name} and {first.name} disagree on the model's signature (inputs {ins} vs "
                           f"{ref_in}; outputs {sorted(outs)} vs {sorted(ref_out)}): {cause}")
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
