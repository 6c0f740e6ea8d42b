"""Triton model configuration built from a model's tensor signature, rendered as config.pbtxt.

The config is a plain dict keyed by the protobuf field names, rendered to protobuf text format by hand
(so the text is the same with or without tritonclient), then parsed back with Triton's own schema
(tritonclient's model_config_pb2) when it is installed: a field or enum Triton does not know fails
here, not at server start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from deploytool.deps import require
from deploytool.dtypes import TRITON_DTYPES
from deploytool.errors import BadInput, CheckFailed
from deploytool.signature import TensorMeta, is_static

# deploytool backend -> how config.pbtxt names it, and where its instances run
_BACKEND_FIELDS = {
    "tensorrt": ({"platform": "tensorrt_plan"}, "KIND_GPU"),
    "onnxruntime": ({"backend": "onnxruntime"}, "KIND_AUTO"),
    "python": ({"backend": "python"}, "KIND_CPU"),
}
#: Triton backends package writes (each config.pbtxt names one); "python" serves any target through model.py
TRITON_BACKENDS = tuple(_BACKEND_FIELDS)
#: what a Triton backend other than python serves, by the artifact the deploytool backend of its name reads
SERVES = {"engine": "a TensorRT engine (deploytool build-engine)", "onnx": "an ONNX file (deploytool export)"}


def triton_backend(runtime_backend: str) -> str:
    """The Triton backend that serves what a deploytool backend reads: its namesake where Triton has one
    (tensorrt, onnxruntime), else python (model.py runs the deploytool runtime).

    Args:
        runtime_backend: a deploytool backend name (deploytool.runners.BACKENDS).

    Returns:
        A name in TRITON_BACKENDS.
    """
    return runtime_backend if runtime_backend in _BACKEND_FIELDS else "python"


#: the largest max_batch_size a config may declare: beyond it one request's tensors outgrow a server
MAX_BATCH = 65536
#: the most model instances, and the longest queue delay, a config may declare
MAX_INSTANCES = 1024
MAX_QUEUE_DELAY_US = 60_000_000
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class Symbol(str):
    """An enum value (TYPE_FP32, KIND_GPU): rendered bare, not quoted."""


@dataclass(frozen=True)
class Batching:
    """max_batch_size and the dynamic batcher; 0 turns batching off (dims then carry the full shape)."""

    max_batch: int = 64
    dynamic: bool = False
    preferred: tuple[int, ...] = (8, 32)
    max_queue_delay_us: int = 100

    def __post_init__(self):
        if not 0 <= self.max_batch <= MAX_BATCH:
            raise BadInput(f"max batch must be between 0 (batching off) and {MAX_BATCH}, got {self.max_batch}")
        if not 0 <= self.max_queue_delay_us <= MAX_QUEUE_DELAY_US:
            raise BadInput(f"max queue delay must be between 0 and {MAX_QUEUE_DELAY_US} us (one minute), "
                           f"got {self.max_queue_delay_us}")
        if not self.dynamic:
            return
        if self.max_batch == 0:
            raise BadInput("dynamic batching needs a max batch > 0")
        for size in self.preferred:
            if not 1 <= size <= self.max_batch:
                raise BadInput(f"preferred batch size {size} must be between 1 and the max batch {self.max_batch}")

    @classmethod
    def choose(cls, batching: Batching | None, *, max_batch: int = 64, dynamic: bool = False,
               preferred: tuple[int, ...] = (8, 32), max_queue_delay_us: int = 100) -> Batching:
        """`batching` when given (and none of the single settings differs from its default), else the
        Batching the single settings make: how package and serve take either.

        Args:
            batching: a Batching, or None.
            max_batch: as the field.
            dynamic: as the field.
            preferred: as the field.
            max_queue_delay_us: as the field.

        Returns:
            The Batching.

        Raises:
            BadInput: both `batching` and a single setting given, or settings out of range.
        """
        given = dict(max_batch=max_batch, dynamic=dynamic, preferred=tuple(preferred),
                     max_queue_delay_us=max_queue_delay_us)
        if batching is None:
            return cls(**given)
        if not isinstance(batching, cls):
            raise BadInput(f"batching must be a deploytool.serving.config.Batching, got {type(batching).__name__}")
        defaults = cls()
        also = [k for k, v in given.items() if v != getattr(defaults, k)]
        if also:
            raise BadInput(f"give batching= or {', '.join(also)}, not both")
        return batching

    def section(self) -> dict[str, Any] | None:
        """config.pbtxt's dynamic_batching section; None when the dynamic batcher is off."""
        if not self.dynamic:
            return None
        section: dict[str, Any] = {"max_queue_delay_microseconds": self.max_queue_delay_us}
        if self.preferred:
            section["preferred_batch_size"] = sorted(set(self.preferred))
        return section


def check_name(name: str) -> str:
    """A model name Triton accepts as a directory name: no path separators, spaces or leading dot."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):  # match's $ would let a trailing newline by
        raise BadInput(f"model name {name!r} is not valid: use letters, digits, '.', '_' or '-' "
                       "(no path separators or spaces, not starting with '.')")
    return name


def tensor_config(meta: TensorMeta, max_batch: int, reshape: bool) -> dict[str, Any]:
    """One input/output entry: Triton's dims leave out the batch dim when max_batch_size > 0.

    A tensor whose only dim is the batch (the routing index, [batch]) gets dims [1]; with `reshape`
    the backend still sees [batch] (`reshape { shape: [] }`), without it the model returns [batch, 1].

    Args:
        meta: the tensor.
        max_batch: the config's max_batch_size.
        reshape: let the backend see a batch-only tensor as [batch].

    Returns:
        The entry, as protobuf field names.

    Raises:
        BadInput: a dtype Triton cannot serve, or a fixed batch dim with batching on.
    """
    dtype = TRITON_DTYPES.get(meta.dtype)
    if dtype is None:
        raise BadInput(f"tensor {meta.name!r} has dtype {meta.dtype}, which Triton cannot serve")
    dims = list(meta.shape)
    if max_batch > 0:
        if not dims or is_static(dims[0]):
            fixed = dims[0] if dims else "none"
            raise BadInput(f"tensor {meta.name!r} has a fixed batch dimension ({fixed}): export it with a dynamic "
                           "batch, or set the max batch to 0 to turn Triton's batching off")
        dims = dims[1:]
    entry: dict[str, Any] = {"name": meta.name, "data_type": Symbol(dtype),
                             "dims": [int(d) if is_static(d) else -1 for d in dims] or [1]}
    if not dims and reshape:
        entry["reshape"] = {"shape": []}
    return entry


def model_config(name: str, inputs: list[TensorMeta], outputs: list[TensorMeta], *, backend: str,
                 batching: Batching, instances: int = 1, parameters: dict[str, str] | None = None) -> dict[str, Any]:
    """The ModelConfig for one model, as a dict of protobuf field names.

    Args:
        name: the model's name.
        inputs: its inputs.
        outputs: its outputs.
        backend: tensorrt, onnxruntime or python.
        batching: max batch and the dynamic batcher.
        instances: model instances.
        parameters: the python backend's parameters, or None.

    Returns:
        The config.

    Raises:
        BadInput: an unknown backend, instances out of range, or a tensor Triton cannot serve.
    """
    if backend not in _BACKEND_FIELDS:
        raise BadInput(f"unknown Triton backend {backend!r}; choose {', '.join(_BACKEND_FIELDS)}")
    if not 1 <= instances <= MAX_INSTANCES:
        raise BadInput(f"instances must be between 1 and {MAX_INSTANCES}, got {instances}")
    fields, kind = _BACKEND_FIELDS[backend]
    reshape = backend != "python"
    config: dict[str, Any] = {
        "name": check_name(name), **fields, "max_batch_size": batching.max_batch,
        "input": [tensor_config(t, batching.max_batch, reshape) for t in inputs],
        "output": [tensor_config(t, batching.max_batch, reshape) for t in outputs],
        "instance_group": [{"count": instances, "kind": Symbol(kind)}],
    }
    if batching.section() is not None:
        config["dynamic_batching"] = batching.section()
    if parameters:
        config["parameters"] = [{"key": k, "value": {"string_value": v}} for k, v in sorted(parameters.items())]
    return config


# --- protobuf text format ----------------------------------------------------------------------

def render(config: dict[str, Any]) -> str:
    """config.pbtxt text for a config dict (messages in braces, repeated fields in brackets)."""
    return "\n".join(_fields(config, 0)) + "\n"


def _fields(message: dict[str, Any], depth: int) -> list[str]:
    pad = "  " * depth
    lines: list[str] = []
    for key, value in message.items():
        if isinstance(value, dict):
            lines += [f"{pad}{key} {{", *_fields(value, depth + 1), f"{pad}}}"]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines.append(f"{pad}{key} [")
            for i, item in enumerate(value):
                close = "}," if i < len(value) - 1 else "}"
                lines += [f"{pad}  {{", *_fields(item, depth + 2), f"{pad}  {close}"]
            lines.append(f"{pad}]")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]" if value else f"{pad}{key}: [ ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return lines


def _scalar(value: Any) -> str:
    if isinstance(value, Symbol):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if any(ord(c) < 32 for c in value):
            raise BadInput(f"config value {value!r} contains control characters")
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"cannot render {type(value).__name__} in config.pbtxt")


def validate(text: str) -> bool:
    """Parse config.pbtxt with Triton's ModelConfig schema (tritonclient, a base dependency); True when it parses.

    A parse failure is a bug in the generator (the inputs were already checked): CheckFailed.
    """

    text_format = require("google.protobuf.text_format", "checking config.pbtxt against Triton's schema")
    model_config_pb2 = require("tritonclient.grpc.model_config_pb2", "checking config.pbtxt against Triton's schema")
    try:
        text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise CheckFailed(f"generated config.pbtxt does not match Triton's ModelConfig schema: {exc}") from exc
    return True
