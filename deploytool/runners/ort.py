"""ONNX Runtime runner: CPU everywhere, CUDA when onnxruntime-gpu and a GPU are present.

`infer` is one `InferenceSession.run` plus a dict: output names are fixed at activation so the
runner adds only microseconds over a bare session (benchmarks/bench_runners.py measures it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deploytool.artifacts import check_onnx_file
from deploytool.dtypes import ORT_DTYPES
from deploytool.errors import BadInput, MissingDependency, first_line
from deploytool.runners.base import Runner
from deploytool.signature import META_KEY, ModelSignature, TensorMeta, from_json, with_io

DEVICES = ("auto", "cpu", "cuda")
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"

def load_session(path: str | Path, providers: list[str], options=None):
    """An InferenceSession, with ORT's load errors (not ONNX, truncated, bad graph) as one-line BadInput."""
    ort = _ort()
    path = check_onnx_file(path)
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidProtobuf, ...)
        raise BadInput(f"{path} is not a loadable ONNX model: {first_line(exc)[:300]}") from exc


def _ort():
    from deploytool.deps import require

    return require("onnxruntime", "the onnxruntime backend")


class OnnxRuntimeRunner(Runner):
    """An InferenceSession behind the Runner interface.

    device: "auto" (CUDA when available, else CPU), "cpu", or "cuda" (MissingDependency without it).
    threads: intra-op threads (None: ORT's default); 1 is usually fastest at batch 1.
    """

    backend = "onnxruntime"

    def __init__(self, model_path: str | Path, *, device: str = "auto", threads: int | None = None,
                 name: str | None = None):
        super().__init__(name)
        if device not in DEVICES:
            raise BadInput(f"unknown device {device!r}; choose {', '.join(DEVICES)}")
        self.model_path = check_onnx_file(model_path)
        self.device = device
        self.threads = threads
        self.session = None

    def providers(self) -> list[str]:
        available = _ort().get_available_providers()
        if self.device == "cuda" and CUDA_EP not in available:
            raise MissingDependency('onnxruntime has no CUDA provider: pip install "deploytool[gpu]" on a GPU machine')
        if self.device != "cpu" and CUDA_EP in available:
            return [CUDA_EP, CPU_EP]
        return [CPU_EP]

    def _session(self):
        ort = _ort()
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = int(self.threads)
        session = load_session(self.model_path, self.providers(), options)
        if self.device == "cuda" and CUDA_EP not in session.get_providers():
            raise MissingDependency("onnxruntime could not start its CUDA provider (no usable GPU)")
        return session

    def _activate(self) -> None:
        self.session = self.session or self._session()  # the one `signature` opened, if it did
        self._output_names = [o.name for o in self.session.get_outputs()]
        self._run = self.session.run

    def _deactivate(self) -> None:
        self.session = None
        self._run = None

    @property
    def active_providers(self) -> list[str]:
        return self.session.get_providers() if self.session is not None else []

    def _signature(self) -> ModelSignature:
        """The session's inputs and outputs with the routers deploytool's metadata names (read from
        the session, so reading it needs only onnxruntime)."""
        if self.session is None:  # kept for `activate`: a session takes as long to open as the model to load
            self.session = self._session()
        session = self.session
        tensors = {k: [TensorMeta(t.name, ORT_DTYPES.get(t.type, t.type), tuple(t.shape))
                       for t in getattr(session, f"get_{k}")()] for k in ("inputs", "outputs")}
        stored = session.get_modelmeta().custom_metadata_map.get(META_KEY)
        return with_io(from_json(stored, str(self.model_path)) if stored else None,
                       tensors["inputs"], tensors["outputs"])

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return dict(zip(self._output_names, self._run(self._output_names, feed)))
        except Exception as exc:  # wrong name, dtype or shape: ORT's InvalidArgument
            if "INVALID_ARGUMENT" in str(exc) or type(exc).__name__ == "InvalidArgument":
                detail = " ".join(str(exc).split())  # ORT puts the offending index and dims on later lines
                raise BadInput(f"onnxruntime refused the feed: {detail[:500]}") from exc
            raise
