"""One Runner per backend (Polygraphy-style); parity, bench, demo and serve loop over runners.

`make_runner(name, ...)` is the only place that maps a backend name to a runner class, so callers
(verify, bench, serve) take backend names from the user and never import a backend themselves.
Backend modules are imported lazily: importing this package loads neither torch nor onnxruntime.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deploytool.errors import BadInput
from deploytool.runners.base import Runner, TensorMeta

#: tensor names every deploytool model uses, in every backend
INPUT_NAME = "x"
OUTPUT_NAMES = ("output", "index", "probs")

#: backend names as the CLI spells them; "torch" keeps the model's own dispatch
BACKENDS = ("torch", "torch-dense", "torch-sparse", "onnxruntime", "tensorrt")

_TORCH_DISPATCH = {"torch": None, "torch-dense": "dense", "torch-sparse": "sparse"}
_LIBRARY = {name: "torch" for name in _TORCH_DISPATCH}  # the module each backend imports


def make_runner(backend: str, *, run_dir: str | Path | Any = None, onnx_path: str | Path | None = None,
                engine_path: str | Path | None = None, **options: Any) -> Runner:
    """Build the runner for `backend` from the artifact it needs.

    torch*: `run_dir` (a run directory, or an nn.Module); onnxruntime: `onnx_path`; tensorrt:
    `engine_path`. `options` go to the runner class (e.g. checkpoint=, device=, threads=).
    Raises BadInput for an unknown name or a missing artifact, MissingDependency when the backend's
    library is not installed.
    """
    if backend not in BACKENDS:
        raise BadInput(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    from deploytool.deps import require

    require(_LIBRARY.get(backend, backend), f"the {backend} backend")
    if backend in _TORCH_DISPATCH:
        from deploytool.runners.torch import TorchRunner

        if run_dir is None:
            raise BadInput(f"backend {backend} needs the run directory (--checkpoint DIR) of the model")
        return TorchRunner(run_dir, dispatch=_TORCH_DISPATCH[backend], name=backend, **options)
    if backend == "onnxruntime":
        from deploytool.runners.ort import OnnxRuntimeRunner

        if onnx_path is None:
            raise BadInput("backend onnxruntime needs an ONNX model path")
        return OnnxRuntimeRunner(onnx_path, **options)
    from deploytool.runners.trt import TensorRTRunner

    if engine_path is None:
        raise BadInput("backend tensorrt needs an engine path (build one with `deploytool build-engine`)")
    return TensorRTRunner(engine_path, **options)


def parse_backends(value: str | Sequence[str], minimum: int = 1) -> list[str]:
    """Backend names from "a,b" or a list: known names, each once (a backend compared or timed against
    itself proves nothing), at least `minimum` of them."""
    names = [b.strip() for b in value.split(",")] if isinstance(value, str) else [str(b).strip() for b in value]
    names = [b for b in names if b]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown:
        raise BadInput(f"unknown backend {unknown[0]!r}; choose from {', '.join(BACKENDS)}")
    repeated = [b for i, b in enumerate(names) if b in names[:i]]
    if repeated:
        raise BadInput(f"backend {repeated[0]!r} is given twice; name each backend once")
    if len(names) < minimum:
        raise BadInput(f"give at least {minimum} backend(s) from {', '.join(BACKENDS)}, got {names}")
    return names


def check_routed_outputs(runner: Runner) -> None:
    """Refuse a model without deploytool's outputs: its results would read as None, not as an error."""
    have = {m.name for m in runner.outputs}
    missing = [n for n in OUTPUT_NAMES if n not in have]
    if missing:
        raise BadInput(f"{runner.name} model lacks output(s) {', '.join(missing)} (it has {', '.join(sorted(have))}); "
                       f"deploytool serves routed models with outputs {', '.join(OUTPUT_NAMES)}: "
                       "export one with `deploytool export`")


def static_batch(runner: Runner) -> int | None:
    """The batch the runner's input is fixed to (a static-batch export or engine), None when dynamic."""
    dim = runner.inputs[0].shape[0]
    return dim if isinstance(dim, int) and dim > 0 else None


__all__ = ["BACKENDS", "INPUT_NAME", "OUTPUT_NAMES", "Runner", "TensorMeta", "check_routed_outputs", "make_runner",
           "parse_backends", "static_batch"]
