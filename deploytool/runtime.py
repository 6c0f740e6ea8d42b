"""Runtime API for embedding: `session = deploytool.load(path); out = session.run(x)`.

A Session wraps one Runner (torch for a run directory, onnxruntime for an ONNX file, tensorrt for an
engine). It checks every input before it reaches a backend, so a wrong dtype, rank, feature count or a
NaN is one clear BadInput instead of a backend's stack trace or a silent cast, and it serialises calls,
so one session can be shared by threads (a torch module or a TensorRT execution context is not safe to
call concurrently).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from deploytool import io
from deploytool.errors import BadInput, first_line
from deploytool.runners import BACKENDS as RUNNER_BACKENDS
from deploytool.runners import check_routed_outputs
from deploytool.runners.base import Runner, TensorMeta

BACKENDS = ("auto", *RUNNER_BACKENDS)
ENGINE_SUFFIXES = (".plan", ".engine", ".trt")
# artifact kind -> (default backend, make_runner keyword)
_KINDS = {"run": ("torch", "run_dir"), "onnx": ("onnxruntime", "onnx_path"), "engine": ("tensorrt", "engine_path")}


def artifact_kind(path: str | Path) -> str:
    """"run", "onnx" or "engine"; anything else is refused with what was expected."""
    path = Path(path)
    if path.is_dir():
        if (path / io.CONFIG_FILE).is_file():
            return "run"
        raise BadInput(f"{path} is a directory without {io.CONFIG_FILE}; give a run directory from `deploytool train`")
    if not path.exists():
        raise BadInput(f"{path} does not exist")
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if path.suffix.lower() in ENGINE_SUFFIXES:
        return "engine"
    raise BadInput(f"{path} is neither a run directory, an .onnx file nor a TensorRT engine "
                   f"({', '.join(ENGINE_SUFFIXES)})")


def check_rows(x: np.ndarray, n_features: int | str | None, what: str = "inputs") -> np.ndarray:
    """`x` as a contiguous numeric [rows, features] array with at least one row, `n_features` features
    (when an int) and no NaN or inf: the router cannot choose an expert for such a row, and would silently."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise BadInput(f"{what} must be 2-D [rows, features], got shape {list(x.shape)}")
    if not np.issubdtype(x.dtype, np.number):
        raise BadInput(f"{what} must be numeric, got {x.dtype}")
    if not len(x):
        raise BadInput(f"{what} is an empty batch (shape {tuple(x.shape)}); give at least one row")
    if isinstance(n_features, int) and n_features >= 0 and x.shape[1] != n_features:
        raise BadInput(f"{what} has {x.shape[1]} features but the model expects {n_features} "
                       f"(shape {tuple(x.shape)})")
    if x.dtype.kind in "fc":
        bad = ~np.isfinite(x)
        if bad.any():
            rows = np.unique(np.nonzero(bad)[0])
            listed = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
            raise BadInput(f"{what} has NaN or inf in row(s) {listed}; the router cannot choose an expert "
                           "for them: clean or drop those rows")
    return np.ascontiguousarray(x)


def resolve_backend(path: str | Path, backend: str = "auto") -> tuple[str, str]:
    """(artifact kind, runtime backend) for `path`; "auto" picks the backend that reads it natively."""
    if backend not in BACKENDS:
        raise BadInput(f"unknown backend {backend!r}; choose {', '.join(BACKENDS)}")
    kind = artifact_kind(path)
    return kind, (_KINDS[kind][0] if backend == "auto" else backend)


def load(path: str | Path, backend: str = "auto", **runner_options: Any) -> "Session":
    """A ready Session for a run directory, an ONNX file or a TensorRT engine.

    `runner_options` go to the backend's runner (e.g. device="cpu", threads=1 for onnxruntime).
    """
    from deploytool.runners import make_runner

    kind, backend = resolve_backend(path, backend)
    runner = make_runner(backend, **{_KINDS[kind][1]: Path(path)}, **runner_options)
    return Session(runner, source=Path(path))


class Session:
    """One loaded model: `run(x)` -> RoutedOutput(output, index, probs) as NumPy arrays; thread-safe."""

    def __init__(self, runner: Runner, source: Path | None = None):
        self.source = source
        self._runner = runner
        self._lock = threading.Lock()
        runner.activate()
        try:
            self.inputs: list[TensorMeta] = list(runner.inputs)
            self.outputs: list[TensorMeta] = list(runner.outputs)
            if len(self.inputs) != 1:
                raise BadInput(f"{source or runner.name} has {len(self.inputs)} inputs; a Session serves "
                               "models with exactly one input (x)")
            check_routed_outputs(runner)
        except BaseException:
            runner.deactivate()
            raise
        self._input = self.inputs[0]
        self._dtype = _numpy_dtype(self._input.dtype)

    @property
    def backend(self) -> str:
        return self._runner.backend

    def validate(self, x: Any) -> np.ndarray:
        """`x` as the contiguous array the model takes, or BadInput saying what is wrong and how to fix it."""
        meta, want = self._input, self._dtype
        arr = _as_array(x, want, meta.name)
        if want is not None and arr.dtype != want:
            raise BadInput(f"input {meta.name!r} has dtype {arr.dtype}, the model takes {want}: "
                           f"convert with x.astype(np.{want})")
        expected = _shape_text(meta.shape)
        if arr.ndim != len(meta.shape):
            hint = " (for one row pass x[None, :])" if arr.ndim == len(meta.shape) - 1 else ""
            raise BadInput(f"input {meta.name!r} has shape {tuple(arr.shape)} (rank {arr.ndim}); "
                           f"the model takes rank {len(meta.shape)} {expected}{hint}")
        arr = check_rows(arr, meta.shape[-1], what=f"input {meta.name!r}")
        batch = meta.shape[0]
        if isinstance(batch, int) and batch > 0 and len(arr) != batch:
            raise BadInput(f"input {meta.name!r} has {len(arr)} rows (shape {tuple(arr.shape)}); "
                           f"the model takes {batch} rows (shape {expected})")
        return arr

    def infer(self, x: Any) -> dict[str, np.ndarray]:
        """Outputs keyed by name (output, index, probs) for a validated `x`."""
        feed = {self._input.name: self.validate(x)}
        with self._lock:
            if not self._runner.is_active:
                raise BadInput("this session is closed; load the model again")
            return self._runner.infer(feed)

    def run(self, x: Any):
        """RoutedOutput(output, index, probs) for a batch `x` of shape [batch, features]."""
        from deploytool.nn import RoutedOutput

        result = self.infer(x)
        return RoutedOutput(*(result[name] for name in RoutedOutput._fields))

    def close(self) -> None:
        with self._lock:
            self._runner.deactivate()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Session({self.source}, backend={self.backend}, "
                f"x: {self._input.dtype}{_shape_text(self._input.shape)})")


def _numpy_dtype(name: str) -> np.dtype | None:
    try:
        return np.dtype(name)
    except TypeError:  # bfloat16 and other dtypes NumPy does not name: left to the backend
        return None


def _as_array(x: Any, want: np.dtype | None, name: str) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    try:
        if isinstance(x, (list, tuple)):  # plain Python numbers take the model's dtype
            return np.asarray(x, dtype=want)
        return np.asarray(x)  # torch CPU tensors and other array-likes keep their own dtype
    except (TypeError, ValueError, RuntimeError) as exc:
        raise BadInput(f"input {name!r} cannot be read as an array ({type(x).__name__}): "
                       f"{first_line(exc)[:200]}") from exc


def _shape_text(shape: tuple) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) and d else "?")
                           for d in shape) + "]"
