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

from deploytool.artifacts import TARGET_KINDS, reader_of
from deploytool.deps import require
from deploytool.errors import BadInput
from deploytool.runners.base import Runner


@dataclass(frozen=True)
class Backend:
    """A backend, everything a command asks about it.

    Attributes:
        runner: its runner class, `module:Class` (imported only by `make_runner`).
        library: the library it imports.
        artifact: the artifact it reads: "run" (a module rebuilt from a run directory or Hugging Face
            folder, or a module given), "onnx" or "engine" (see `artifacts.TARGET_KINDS`).
        options: fixed runner options.
        summary: one line for doctor and --help.
        device: where it computes, "cpu" or "cuda" (a cuda backend's latency is host time, copies included).
        requires: what doctor must find besides `library` ("onnxruntime-cuda": ONNX Runtime's CUDA
            provider; "gpu": an NVIDIA GPU).
        native: the backend that reads its artifact when none is named (`runtime.load`'s "auto").
    """

    runner: str
    library: str
    artifact: str
    options: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    device: str = "cpu"
    requires: tuple[str, ...] = ()
    native: bool = False

    @property
    def needs(self) -> list[str]:
        """Everything it needs here: its library, then `requires`."""
        return [self.library, *self.requires]

    @property
    def on_gpu(self) -> bool:
        """Whether it computes on a GPU."""
        return self.device == "cuda"

    @property
    def runs_weights(self) -> bool:
        """Whether it runs the module's own weights (the torch backends), not an exported model."""
        return self.artifact == "run"


#: backend name as the CLI spells it -> how to run it; "torch" keeps the model's own dispatch
BACKENDS: dict[str, Backend] = {
    "torch": Backend("deploytool.runners.torch:TorchRunner", "torch", "run", {"dispatch": None},
                     "PyTorch eager, the model's own dispatch", native=True),
    "torch-dense": Backend("deploytool.runners.torch:TorchRunner", "torch", "run", {"dispatch": "dense"},
                           "PyTorch eager, every expert runs and a mask selects"),
    "torch-sparse": Backend("deploytool.runners.torch:TorchRunner", "torch", "run", {"dispatch": "sparse"},
                            "PyTorch eager, only the chosen expert runs"),
    "onnxruntime": Backend("deploytool.runners.ort:OnnxRuntimeRunner", "onnxruntime", "onnx", {"device": "cpu"},
                           "ONNX Runtime on the CPU", native=True),
    "onnxruntime-cuda": Backend("deploytool.runners.ort:OnnxRuntimeRunner", "onnxruntime", "onnx",
                                {"device": "cuda"}, "ONNX Runtime's CUDA provider (onnxruntime-gpu, a GPU)",
                                device="cuda", requires=("onnxruntime-cuda", "gpu")),
    "tensorrt": Backend("deploytool.runners.trt:TensorRTRunner", "tensorrt", "engine", {},
                        "a TensorRT engine (TensorRT >= 10.9, a GPU)", device="cuda", requires=("gpu",), native=True),
}


def native_backend(kind: str) -> str:
    """The backend that reads a target of `kind` when none is named.

    Args:
        kind: a target kind (`artifacts.TARGET_KINDS`: run, hf, onnx, engine).

    Returns:
        The backend's name.

    Raises:
        BadInput: an unknown kind.
    """
    reader = reader_of(kind)
    return next(name for name, entry in BACKENDS.items() if entry.native and entry.artifact == reader)


#: target kind -> the backend that reads it natively (derived: a kind added in artifacts appears here)
NATIVE = {kind: native_backend(kind) for kind in TARGET_KINDS}


def backends_reading(kind: str) -> list[str]:
    """The backends that read a target of `kind`, in registry order.

    Args:
        kind: a target kind (run, hf, onnx, engine).

    Returns:
        Their names.

    Raises:
        BadInput: an unknown kind.
    """
    reader = reader_of(kind)
    return [name for name, entry in BACKENDS.items() if entry.artifact == reader]


def entry_of(runner: Runner) -> Backend:
    """The registry entry of the backend a runner belongs to (its class's `backend`).

    Args:
        runner: a runner made by `make_runner` (or any Runner subclass of the registry's).

    Returns:
        The Backend.
    """
    return BACKENDS[runner.backend]


def runs_weights(runner: Runner) -> bool:
    """Whether `runner` runs a module's own weights (a torch runner), not an exported model.

    Args:
        runner: the runner.

    Returns:
        True for the torch backends.
    """
    return entry_of(runner).runs_weights


def runs_on_gpu(runner: Runner) -> bool:
    """Whether `runner` computes on a GPU: its backend does, or it was given a CUDA device, or ONNX
    Runtime put it on its CUDA provider.

    Args:
        runner: an active or inactive runner.

    Returns:
        True when its timings include copies to and from a GPU.
    """
    device = str(getattr(runner, "device", "cpu"))
    providers = getattr(runner, "active_providers", [])
    return entry_of(runner).on_gpu or device.startswith("cuda") or "CUDAExecutionProvider" in providers


def check_backend(name: str) -> Backend:
    """The registry entry of `name`.

    Args:
        name: a backend name as the CLI spells it.

    Returns:
        Its Backend.

    Raises:
        BadInput: an unknown name, listing the known backends.
    """
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
        raise BadInput(f"backend {backend} needs {TARGET_KINDS[entry.artifact].wanted}")

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
    itself proves nothing), at least `minimum` of them.

    Args:
        value: "a,b" or a sequence of names.
        minimum: the fewest backends accepted.

    Returns:
        The names.

    Raises:
        BadInput: an unknown or repeated name, or too few.
    """
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
    """The artifact kind `backend` reads.

    Args:
        backend: a backend name.

    Returns:
        "run", "onnx" or "engine".

    Raises:
        BadInput: an unknown backend.
    """
    return check_backend(backend).artifact


def reads(backend: str, kind: str) -> bool:
    """Whether `backend` reads a target of `kind` (the torch backends read run dirs and HF folders).

    Args:
        backend: a backend name.
        kind: a target kind (run, hf, onnx, engine).

    Returns:
        True when it does.

    Raises:
        BadInput: an unknown backend or kind.
    """
    return artifact_of(backend) == reader_of(kind)


__all__ = ["BACKENDS", "NATIVE", "Backend", "Runner", "artifact_of", "backends_reading", "check_backend",
           "entry_of", "make_runner", "native_backend", "parse_backends", "reads", "runs_on_gpu", "runs_weights"]
