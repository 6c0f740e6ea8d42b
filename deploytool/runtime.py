"""Runtime API for embedding: `session = deploytool.load(path); outputs = session.run(x)`.

A Session wraps one Runner (torch for a run directory, onnxruntime for an ONNX file, tensorrt for an
engine) and the model's signature. It checks every input against the signature before it reaches a
backend, so a wrong name, dtype, rank or size or a NaN is one clear BadInput naming what the model
takes, instead of a backend's stack trace or a silent cast; it refuses outputs that come out non-finite
for finite inputs; and it serialises calls, so one session can be shared by threads (a torch module or
a TensorRT execution context is not safe to call concurrently). Loading an ONNX model needs only NumPy
and onnxruntime.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from deploytool.artifacts import Target, resolve_target
from deploytool.errors import BadInput, first_line
from deploytool.feeds import check_feed
from deploytool.io import check_path
from deploytool.runners import BACKENDS as RUNNER_BACKENDS
from deploytool.runners import artifact_of, backends_reading, make_runner, native_backend, reads
from deploytool.runners.base import Runner
from deploytool.signature import ModelSignature

BACKENDS = ("auto", *RUNNER_BACKENDS)


def resolve_backend(path: str | Path | Target, backend: str = "auto") -> tuple[str, str]:
    """(artifact kind, runtime backend) for `path`; "auto" picks the backend that reads it natively.

    Args:
        path: a run directory, Hugging Face folder, ONNX model or engine; or the Target resolved from it.
        backend: a backend name, or "auto".

    Returns:
        (its kind, the backend that runs it).

    Raises:
        BadInput: an unknown backend, a path that is no artifact, or a backend that cannot read it.
    """
    if backend not in BACKENDS:
        raise BadInput(f"unknown backend {backend!r}; choose {', '.join(BACKENDS)}")
    if isinstance(path, Target):
        path, kind = path.path, path.kind
    else:
        check_path(path)
        kind = resolve_target(path).kind
    chosen = native_backend(kind) if backend == "auto" else backend
    if not reads(chosen, kind):
        raise BadInput(f"backend {chosen} does not read {path} (a {kind}); use {', '.join(backends_reading(kind))}")
    return kind, chosen


def load(path: str | Path, *, backend: str = "auto", **runner_options: Any) -> Session:
    """A ready Session for a run directory, a Hugging Face MoE folder, an ONNX file or a TensorRT engine.

    Args:
        path: the artifact.
        backend: a backend name, or "auto" for the one that reads the artifact natively.
        **runner_options: options of the backend's runner (e.g. threads=1 for onnxruntime).

    Returns:
        The active Session (close it, or use it as a context manager).

    Raises:
        BadInput: a missing or broken artifact, or a model without deploytool routers.
        MissingDependency: the backend's library or hardware is missing.
    """
    if not isinstance(path, (str, Path)):
        raise BadInput(f"load takes the path of a run directory, ONNX model or engine, got {type(path).__name__}")
    if not isinstance(backend, str):
        raise BadInput(f"backend must be a name ({', '.join(BACKENDS)}), got {type(backend).__name__}")
    check_path(path)
    target = resolve_target(path)  # the kind alone: nothing is parsed here (ONNX Runtime reads the model)
    _, backend = resolve_backend(target, backend)
    check_runner_options(backend, runner_options)
    # a run directory or folder goes to the torch runner as read (its config.json is not read again)
    artifact = target.opened() if artifact_of(backend) == "run" else target.path
    return Session(make_runner(backend, artifact, **runner_options), source=Path(path))


def check_runner_options(backend: str, options: Mapping[str, Any]) -> None:
    """Refuse options the backend's runner does not take, naming those it does.

    Args:
        backend: a backend name.
        options: the keyword options given for its runner.

    Raises:
        BadInput: an option the runner does not take.
    """
    import importlib
    import inspect

    entry = RUNNER_BACKENDS[backend]
    module, cls = entry.runner.split(":")
    params = inspect.signature(getattr(importlib.import_module(module), cls).__init__).parameters
    known = sorted(n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n != "name")
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise BadInput(f"the {backend} backend takes no option {', '.join(map(repr, unknown))}; it takes "
                       f"{', '.join(known) or 'no options'}")


class Session:
    """One loaded model: `run(inputs)` -> {output name: array}, every router's index and probs included.

    Attributes:
        source: the artifact it was loaded from.
        signature: the model signature (inputs, outputs, routers).
    """

    def __init__(self, runner: Runner, source: Path | None = None):
        self.source = source
        self._runner = runner
        self._lock = threading.Lock()
        runner.activate()
        try:
            self.signature: ModelSignature = runner.signature
            self.signature.require_router(str(source or runner.name))
        except BaseException:
            runner.deactivate()
            raise

    @property
    def backend(self) -> str:
        """The name of the backend that runs the model."""
        return self._runner.backend

    def validate(self, inputs: Any) -> dict[str, np.ndarray]:
        """`inputs` as the feed the model takes, or BadInput saying what is wrong and what it takes.

        Args:
            inputs: an array (a single-input model) or a dict of arrays keyed by input name.

        Returns:
            The checked feed.

        Raises:
            BadInput: names, dtypes, ranks or sizes that do not fit the signature; NaN or inf.
        """
        if not isinstance(inputs, Mapping):
            if len(self.signature.inputs) != 1:
                raise BadInput(f"the model takes {len(self.signature.inputs)} inputs; pass a dict keyed by "
                               f"{self.signature.input_names} ({self.signature.describe()})")
            inputs = {self.signature.inputs[0].name: inputs}
        return check_feed(self.signature, inputs, bounds=self._runner.input_bounds)

    def run(self, inputs: Any = None, **named: Any) -> dict[str, np.ndarray]:
        """Outputs keyed by name for one batch, every router's `<path>.index` and `.probs` included.

        Args:
            inputs: an array (a single-input model) or a dict of arrays keyed by input name.
            **named: the inputs as keywords instead (`run(x=...)`).

        Returns:
            {output name: array}.

        Raises:
            BadInput: inputs that do not fit the signature, a closed session, or outputs that came
                out NaN or infinite (inputs beyond what the model computes in its dtype).
        """
        if inputs is not None and named:
            given = sorted(named) if isinstance(inputs, Mapping) else sorted(named)
            raise BadInput(f"inputs given twice: positionally and as {', '.join(given)}; pass them one way "
                           f"({self.signature.describe()})")
        feed = self.validate(named if inputs is None else inputs)
        with self._lock:
            if not self._runner.is_active:
                raise BadInput("this session is closed; load the model again")
            try:
                outputs = self._runner.infer(feed)
            except IndexError as exc:  # torch's embedding on an id past its table; only ids can cause it here
                if not any(v.dtype.kind in "iu" for v in feed.values()):
                    raise
                raise BadInput(f"the model cannot look up these ids ({first_line(exc)}): an id is beyond the size of "
                               "its embedding") from exc
        check_finite(outputs)
        check_decisions(outputs, self.signature)
        return outputs

    def close(self) -> None:
        """Release the runner; later calls to `run` are refused."""
        with self._lock:
            self._runner.deactivate()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Session({self.source}, backend={self.backend}, {self.signature.describe()})"


def check_finite(outputs: Mapping[str, np.ndarray]) -> None:
    """Refuse outputs with NaN or inf for finite inputs: the inputs overflowed the model's arithmetic
    (e.g. 3e38 in float32), and a decision read from such an output would be arbitrary."""
    for name, value in outputs.items():
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            bad = np.unique(np.nonzero(~np.isfinite(value))[0]) if value.ndim else np.array([0])
            listed = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
            raise BadInput(f"output {name!r} is NaN or infinite for sample(s) {listed}: those inputs are beyond "
                           "what the model computes in its dtype; scale them into the range it was trained on")


def check_decisions(outputs: Mapping[str, np.ndarray], signature: ModelSignature) -> None:
    """Refuse routing outputs outside what the signature says a router decides: an index outside
    0..n_experts-1 means the artifact's routing outputs are not what its signature names.

    Args:
        outputs: one run's outputs.
        signature: the model's signature.

    Raises:
        BadInput: naming the router and the index.
    """
    for router in signature.routers:
        index = outputs.get(router.index)
        if index is None or not index.size:
            continue
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= router.n_experts:
            raise BadInput(f"router {router.path!r} chose expert {low if low < 0 else high} of its {router.n_experts}: "
                           "the model's routing outputs do not match its signature; export it again")
