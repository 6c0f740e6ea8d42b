"""One Runner per backend (Polygraphy-style) and the one registry that maps backend names to them.

`BACKENDS` says, for every backend name the CLI takes, which runner class runs it (imported lazily:
importing this package loads neither torch nor onnxruntime), which library it needs and which
artifact kind it reads. verify, bench, serve and load take backend names and call `make_runner`;
none of them imports a backend itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from deploytool.errors import BadInput
from deploytool.runners.base import Runner


@dataclass(frozen=True)
class Backend:
    """A backend: its runner class (`module:Class`), the library it imports, the artifact it reads."""

    runner: str
    library: str
    artifact: str                      # "run" (a run directory or module), "onnx" or "engine"
    options: dict[str, Any] = field(default_factory=dict)  # fixed runner options
    summary: str = ""


#: backend name as the CLI spells it -> how to run it; "torch" keeps the model's own dispatch
BACKENDS: dict[str, Backend] = {
    "torch": Backend("deploytool.runners.torch:TorchRunner", "torch", "run", {"dispatch": None},
                     "PyTorch eager, the model's own dispatch"),
    "torch-dense": Backend("deploytool.runners.torch:TorchRunner", "torch", "run", {"dispatch": "dense"},
                           "PyTorch eager, every expert runs and a mask selects"),
    "torch-sparse": Backend("deploytool.runners.torch:TorchRunner", "torch", "run", {"dispatch": "sparse"},
                            "PyTorch eager, only the chosen expert runs"),
    "onnxruntime": Backend("deploytool.runners.ort:OnnxRuntimeRunner", "onnxruntime", "onnx", {"device": "cpu"},
                           "ONNX Runtime on the CPU"),
    "onnxruntime-cuda": Backend("deploytool.runners.ort:OnnxRuntimeRunner", "onnxruntime", "onnx",
                                {"device": "cuda"}, "ONNX Runtime's CUDA provider (onnxruntime-gpu, a GPU)"),
    "tensorrt": Backend("deploytool.runners.trt:TensorRTRunner", "tensorrt", "engine", {},
                        "a TensorRT engine (TensorRT >= 10.9, a GPU)"),
}
#: artifact kind -> the backend that reads it natively (a Hugging Face folder is rebuilt like a run)
NATIVE = {"run": "torch", "hf": "torch", "onnx": "onnxruntime", "engine": "tensorrt"}
_ARTIFACT_WORDS = {"run": "the run directory of the model (its checkpoint)", "onnx": "an ONNX model path",
                   "engine": "an engine path (build one with `deploytool build-engine`)"}


def check_backend(name: str) -> Backend:
    """The registry entry of `name`, or BadInput listing the known backends."""
    if name not in BACKENDS:
        raise BadInput(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return BACKENDS[name]


def make_runner(backend: str, artifact: Any, **options: Any) -> Runner:
    """The runner for `backend` over `artifact`.

    Args:
        backend: a name in BACKENDS.
        artifact: the path (or, for the torch backends, an nn.Module) of the kind the backend reads.
        **options: options of the runner class (e.g. checkpoint=, threads=).

    Returns:
        The runner, not yet active.

    Raises:
        BadInput: an unknown backend name or no artifact.
        MissingDependency: the backend's library is not installed.
    """
    entry = check_backend(backend)
    if artifact is None:
        raise BadInput(f"backend {backend} needs {_ARTIFACT_WORDS[entry.artifact]}")
    from deploytool.deps import require

    clash = next((k for k, v in options.items() if k in entry.options and v != entry.options[k]), None)
    if clash is not None:
        raise BadInput(f"backend {backend} runs with {clash}={entry.options[clash]!r}, not {options[clash]!r}; "
                       f"choose the backend that does ({', '.join(BACKENDS)})")
    require(entry.library, f"the {backend} backend")
    module, cls = entry.runner.split(":")
    runner_class = getattr(importlib.import_module(module), cls)
    return runner_class(artifact, name=backend, **{**options, **entry.options})


def parse_backends(value: str | Sequence[str], minimum: int = 1) -> list[str]:
    """Backend names from "a,b" or a list: known names, each once (a backend compared or timed against
    itself proves nothing), at least `minimum` of them."""
    names = [b.strip() for b in value.split(",")] if isinstance(value, str) else [str(b).strip() for b in value]
    names = [b for b in names if b]
    for name in names:
        check_backend(name)
    repeated = [b for i, b in enumerate(names) if b in names[:i]]
    if repeated:
        raise BadInput(f"backend {repeated[0]!r} is given twice; name each backend once")
    if len(names) < minimum:
        raise BadInput(f"give at least {minimum} backend(s) from {', '.join(BACKENDS)}, got {names}")
    return names


def artifact_of(backend: str) -> str:
    """The artifact kind `backend` reads: "run", "onnx" or "engine"."""
    return check_backend(backend).artifact


def reads(backend: str, kind: str) -> bool:
    """Whether `backend` reads an artifact of `kind` (the torch backends read run dirs and HF folders)."""
    from deploytool.artifacts import MODULE_KINDS

    return artifact_of(backend) == ("run" if kind in MODULE_KINDS else kind)


__all__ = ["BACKENDS", "NATIVE", "Backend", "Runner", "artifact_of", "check_backend", "make_runner",
           "parse_backends", "reads"]
