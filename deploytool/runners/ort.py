"""ONNX Runtime runner: CPU everywhere, CUDA when onnxruntime-gpu and a GPU are present.

`infer` is one `InferenceSession.run` plus a dict: output names are fixed at activation so the
runner adds only microseconds over a bare session (benchmarks/bench_runners.py measures it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deploytool.artifacts import check_onnx_file, load_onnx
from deploytool.deps import require
from deploytool.dtypes import ORT_DTYPES
from deploytool.errors import BadInput, MissingDependency, first_line
from deploytool.runners.base import Runner
from deploytool.signature import META_KEY, ModelSignature, TensorMeta, from_json, with_io

DEVICES = ("auto", "cpu", "cuda")
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
MAX_THREADS = 1024
#: ONNX Runtime's log level for deploytool's sessions and runs (4: fatal only): its errors come back as
#: exceptions that deploytool reports in one line, so ORT's own (red) log lines stay out of the output
LOG_SEVERITY = 4

def load_session(path: str | Path, providers: list[str], options=None):
    """An InferenceSession, with ORT's load errors (not ONNX, truncated, bad graph) as one-line BadInput.

    Args:
        path: the .onnx file.
        providers: ONNX Runtime execution providers, in order of preference.
        options: an onnxruntime.SessionOptions (default: new ones).

    Returns:
        The onnxruntime.InferenceSession.

    Raises:
        BadInput: a path that is no ONNX file, or a file ONNX Runtime cannot load.
    """
    ort = _ort()
    path = check_onnx_file(path)
    if options is None:
        options = ort.SessionOptions()
    options.log_severity_level = LOG_SEVERITY
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidProtobuf, ...)
        raise BadInput(f"{path} is not a loadable ONNX model: {first_line(exc)[:300]}") from exc


def _ort():
    ort = require("onnxruntime", "the onnxruntime backend")
    ort.set_default_logger_severity(LOG_SEVERITY)  # a failing run logs through the default logger
    return ort


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
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool)
                                    or not 0 <= threads <= MAX_THREADS):
            raise BadInput(f"threads must be a whole number 0..{MAX_THREADS} (0: ONNX Runtime's default), "
                           f"got {threads!r}")
        self.model_path = check_onnx_file(model_path)
        self.device = device
        self.threads = threads
        self.session = None

    def providers(self) -> list[str]:
        """The execution providers to ask for, in order of preference.

        Returns:
            CUDA then CPU where CUDA is wanted and available, else CPU.

        Raises:
            MissingDependency: device "cuda" without ONNX Runtime's CUDA provider.
        """
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
        self._run_options = _ort().RunOptions()
        self._run_options.log_severity_level = LOG_SEVERITY

    def _deactivate(self) -> None:
        self.session = None
        self._run = None

    @property
    def active_providers(self) -> list[str]:
        """The providers the open session runs on ([] when none is open)."""
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

    @property
    def input_bounds(self) -> dict[str, int]:
        """{integer input: rows of the table it indexes} for inputs that feed a Gather over an initializer
        (an embedding): ONNX Runtime would wrap a negative id and fail on one past the end."""
        if getattr(self, "_bounds", None) is None:
            self._bounds = {**gather_bounds(self.model_path, [m.name for m in self.inputs
                                                              if m.dtype.startswith(("int", "uint"))]),
                            **super().input_bounds}
        return self._bounds

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, bound in self.input_bounds.items():
            ids = feed.get(name)
            if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= bound):
                raise BadInput(f"input {name!r} holds the id {ids.min() if ids.min() < 0 else ids.max()}; the model "
                               f"takes ids 0..{bound - 1}")
        try:
            return dict(zip(self._output_names, self._run(self._output_names, feed, self._run_options)))
        except Exception as exc:  # wrong name, dtype or shape: ORT's InvalidArgument
            if "INVALID_ARGUMENT" in str(exc) or type(exc).__name__ == "InvalidArgument":
                detail = " ".join(str(exc).split())  # ORT puts the offending index and dims on later lines
                raise BadInput(f"onnxruntime refused the feed: {detail[:500]}") from exc
            raise


def gather_bounds(model_path: str | Path, names: list[str]) -> dict[str, int]:
    """{input name: rows of the initializer it indexes} for each of `names` that a Gather (axis 0) uses
    as its indices over an initializer, directly or through a Cast; {} when the graph cannot be read.

    Args:
        model_path: the .onnx file.
        names: integer input names.

    Returns:
        {input name: rows it may index}.
    """
    if not names:
        return {}
    try:
        graph = load_onnx(model_path).graph
    except Exception:  # noqa: BLE001 - a bound is a refinement: no bound when the graph is unreadable here
        return {}
    rows = {t.name: int(t.dims[0]) for t in graph.initializer if len(t.dims)}
    alias = {n: n for n in names}
    for node in graph.node:  # ids cast to another integer type still index the same table
        if node.op_type == "Cast" and node.input and node.input[0] in alias:
            alias[node.output[0]] = alias[node.input[0]]
    bounds: dict[str, int] = {}
    for node in graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if node.op_type == "Gather" and axis == 0 and len(node.input) == 2 and node.input[1] in alias \
                and node.input[0] in rows:
            name = alias[node.input[1]]
            bounds[name] = min(bounds.get(name, rows[node.input[0]]), rows[node.input[0]])
    return bounds
