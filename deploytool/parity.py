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

from deploytool.artifacts import MODULE_KINDS, resolve_target
from deploytool.comparator import ParityReport, check_runners_match, compare_runners
from deploytool.compare import Tolerance, check_tolerances
from deploytool.errors import BadInput
from deploytool.feeds import batch_of, sample_feed
from deploytool.runners import artifact_of, make_runner, parse_backends

DEFAULT_SAMPLES = 512


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
    # the checkpoint matters to the torch backends only
    checkpoint_used = checkpoint if any(artifact_of(n) == "run" for n in names) else None
    # every model is run by the backends that read it: an engine's recorded ONNX model is not looked up
    arts = [resolve_target(p, checkpoint=checkpoint_used, find_onnx=False) for p in paths]
    for art in arts:
        if art.kind in MODULE_KINDS:
            raise BadInput(f"{art.path} is a run directory, not a model; export it first: "
                           f"deploytool export {art.path} --out model.onnx")
        art.signature.require_router(str(art.path))
    if checkpoint_used is None and any(artifact_of(n) == "run" for n in names):
        raise BadInput("the torch backends need the model's weights: give the checkpoint (its run directory)")
    target = arts[0]
    runners = []
    for name in names:
        reader = artifact_of(name)
        if reader == "run":
            runners.append(make_runner(name, target.opened(), checkpoint=target.weights,
                                       **target.module_options()))
            continue
        readable = [a for a in arts if a.reader == reader]
        if not readable:
            raise BadInput(f"backend {name} needs {'an engine' if reader == 'engine' else 'an ONNX model'}; "
                           f"{', '.join(str(p) for p in paths)} {'is' if len(paths) == 1 else 'are'} not one")
        for art in readable:
            runners.append(make_runner(name, art.path))
            if len(paths) > 1:
                runners[-1].name = f"{name} {art.path.name}"
    if len(runners) < 2:
        raise BadInput(f"{len(runners)} runner to compare; give two backends, or several models")
    metadata = target.metadata
    notes = check_runners_match(runners, metadata, target.source_weights if checkpoint_used is not None else None)
    run_config = target.run_config() if data is None else None
    label, feed = sample_feed(target.signature, data=data, run_config=run_config, samples=samples, seed=seed,
                              made_up=samples, tokenizer=target.source)
    comparisons = compare_runners(runners, {label: feed}, atol=atol, rtol=rtol)
    return ParityReport(model=", ".join(map(str, paths)), backends=[r.name for r in runners],
                        inputs={label: batch_of(feed)}, comparisons=comparisons,
                        checkpoint=str(checkpoint) if checkpoint else None, metadata=metadata, notes=notes)


