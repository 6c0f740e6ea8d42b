"""The model signature: what a deployed routed model takes and returns, read by every part of the tool.

Inputs and outputs (name, dtype, shape; a str or None dim is dynamic) and, for every router, its module
path, expert count, temperature and the names of its `index` and `probs` outputs. Export builds it once
from the module and example inputs and writes it into the ONNX metadata (the engine manifest copies it);
runners, verify, bench, package, serve and load read it back instead of assuming tensor names or ranks.
Only NumPy here: serving an ONNX model reads a signature without torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deploytool.errors import BadInput

#: the ONNX metadata key (and manifest field) that holds the signature as JSON
META_KEY = "deploytool.signature"
#: the conventional name of a dynamic batch dim
BATCH = "batch"
#: the most input data one call may take (the NaN check alone would copy it)
MAX_FEED_BYTES = 4 << 30

Dim = int | str | None


@dataclass(frozen=True)
class TensorMeta:
    """Name, NumPy dtype name and shape of one input or output; a str or None dim is dynamic."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorMeta:
        return cls(str(data["name"]), str(data["dtype"]), tuple(data["shape"]))

    def text(self) -> str:
        """`name: dtype[d0, d1, ...]`, dynamic dims by name (or ?)."""
        return f"{self.name}: {self.dtype}{shape_text(self.shape)}"


@dataclass(frozen=True)
class RouterMeta:
    """One router of the model: where it sits, what it chooses among, and which outputs hold its decisions.

    `index` is int64 over the router's positions (the leading dims of its input: [B] per row,
    [B, T] per token), with a trailing dim of `k` for a router that picks k > 1 experts; `probs` is
    those positions by `n_experts`.
    """

    path: str
    n_experts: int
    temperature: float
    index: str
    probs: str
    k: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "n_experts": self.n_experts, "temperature": self.temperature,
                "index": self.index, "probs": self.probs, "k": self.k}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RouterMeta:
        return cls(str(data["path"]), int(data["n_experts"]), float(data["temperature"]), str(data["index"]),
                   str(data["probs"]), int(data.get("k", 1)))


def router_output_names(path: str) -> tuple[str, str]:
    """(index, probs) output names of the router at module path `path`."""
    return f"{path}.index", f"{path}.probs"


@dataclass(frozen=True)
class ModelSignature:
    """Inputs, outputs and routers of one model; `describe()` is how errors name what is expected."""

    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]
    routers: tuple[RouterMeta, ...] = field(default=())
    #: the size each named dynamic dim had in the example the model was exported from (what generated
    #: inputs and an engine's optimisation profile use when nothing else says)
    dim_examples: dict[str, int] = field(default_factory=dict)
    #: integer inputs that are ids into a table (token ids): {input name: table size}; an id must be in
    #: [0, size), and made-up inputs span that range
    vocab: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data: what `to_json` writes and `from_json` reads."""
        return {"inputs": [m.to_dict() for m in self.inputs], "outputs": [m.to_dict() for m in self.outputs],
                "routers": [r.to_dict() for r in self.routers], "dim_examples": dict(self.dim_examples),
                "vocab": dict(self.vocab)}

    # --- reading ------------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [m.name for m in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [m.name for m in self.outputs]

    @property
    def static_batch(self) -> int | None:
        """The batch every input is fixed to (a static-batch export or engine), None when dynamic."""
        dims = {m.shape[0] for m in self.inputs if m.shape}
        if len(dims) == 1 and is_static(dim := next(iter(dims))):
            return int(dim)
        return None

    def describe(self) -> str:
        """One line: `inputs x: float32[batch, 64] -> outputs output: float32[batch, 10], ...`."""
        return ("inputs " + ", ".join(m.text() for m in self.inputs) + " -> outputs "
                + ", ".join(m.text() for m in self.outputs))

    def require_router(self, source: str) -> None:
        """Refuse a model without routers: there is no decision to check, deploy or serve."""
        if not self.routers:
            raise BadInput(f"{source} has no deploytool router (no routing outputs in its signature); "
                           "export a model that routes through a deploytool router with `deploytool export`")
        names = set(self.output_names)
        missing = [n for r in self.routers for n in (r.index, r.probs) if n not in names]
        if missing:
            raise BadInput(f"{source} lacks the routing output(s) {', '.join(missing)} its signature names: "
                           "it was changed after export; export it again")

    # --- checking feeds ------------------------------------------------------------------------
    def check_feed(self, feed: Mapping[str, Any], *, what: str = "input") -> dict[str, np.ndarray]:
        """The feed as contiguous arrays the model takes, or BadInput naming the expected signature.

        Every input must be given, by name, with the model's dtype and rank, its static dims, one
        batch size shared by all inputs, at least one row, and no NaN or inf (a router cannot choose
        an expert for such a row, and would silently).
        """
        if not isinstance(feed, Mapping):
            raise BadInput(f"{what}s must be a dict of arrays keyed by input name; the model takes {self.describe()}")
        unknown = sorted(set(feed) - set(self.input_names))
        missing = [n for n in self.input_names if n not in feed]
        if unknown or missing:
            raise BadInput(f"{what}s {sorted(feed)} do not match the model's inputs {self.input_names} "
                           f"({self.describe()})")
        out: dict[str, np.ndarray] = {}
        batches: dict[int, str] = {}
        for meta in self.inputs:
            arr = _as_array(feed[meta.name], meta, what)
            out[meta.name] = arr
            if arr.ndim:
                batches.setdefault(int(arr.shape[0]), meta.name)
        if len(batches) > 1:
            raise BadInput(f"{what}s have different batch sizes ({', '.join(f'{n}: {b}' for b, n in batches.items())}); "
                           "every input of one call shares its batch")
        return out


def _as_array(value: Any, meta: TensorMeta, what: str) -> np.ndarray:
    label = f"{what} {meta.name!r}"
    want = numpy_dtype(meta.dtype)
    try:
        arr = np.asarray(value, dtype=want) if isinstance(value, (list, tuple)) else np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise BadInput(f"{label} cannot be read as an array ({type(value).__name__}): {str(exc)[:200]}") from exc
    expected = f"{meta.dtype}{shape_text(meta.shape)}"
    if want is not None and arr.dtype != want:
        raise BadInput(f"{label} has dtype {arr.dtype}, the model takes {expected}: convert with .astype(np.{want})")
    if arr.ndim != len(meta.shape):
        hint = " (for one sample add a batch dim: x[None])" if arr.ndim == len(meta.shape) - 1 else ""
        raise BadInput(f"{label} has shape {list(arr.shape)}; the model takes {expected}{hint}")
    wrong = [i for i, d in enumerate(meta.shape) if is_static(d) and arr.shape[i] != d]
    if wrong:
        raise BadInput(f"{label} has shape {list(arr.shape)}; the model takes {expected} (dim {wrong[0]} differs)")
    if arr.nbytes > MAX_FEED_BYTES:
        raise BadInput(f"{label} holds {arr.nbytes / 2**30:.1f} GiB; one call takes at most "
                       f"{MAX_FEED_BYTES / 2**30:.0f} GiB: split it into smaller batches")
    if arr.ndim and not arr.shape[0]:
        raise BadInput(f"{label} is an empty batch (shape {list(arr.shape)}); give at least one sample")
    if arr.dtype.kind in "fc":
        bad = ~np.isfinite(arr)
        if bad.any():
            rows = np.unique(np.nonzero(bad)[0])
            listed = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
            raise BadInput(f"{label} has NaN or inf in sample(s) {listed}; the router cannot choose an expert "
                           "for them: clean or drop those samples")
    return np.ascontiguousarray(arr)


def is_static(dim: Dim) -> bool:
    return isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0


def shape_text(shape: tuple[Dim, ...]) -> str:
    return "[" + ", ".join(str(d) if is_static(d) else (d if isinstance(d, str) and d else "?") for d in shape) + "]"


def numpy_dtype(name: str) -> np.dtype | None:
    """The NumPy dtype of a dtype name; None for those NumPy does not have (bfloat16)."""
    try:
        return np.dtype(name)
    except TypeError:
        return None


# --- (de)serialising --------------------------------------------------------------------------

def to_json(signature: ModelSignature) -> str:
    return json.dumps(signature.to_dict(), sort_keys=True)


def from_json(text: str | Mapping[str, Any], source: str) -> ModelSignature:
    """A signature from its JSON (or the parsed dict).

    Args:
        text: what `to_json` wrote, or that parsed.
        source: the file it came from, for messages.

    Returns:
        The ModelSignature.

    Raises:
        BadInput: anything malformed, naming `source`.
    """
    try:
        data = json.loads(text) if isinstance(text, str) else text
        return ModelSignature(tuple(TensorMeta.from_dict(m) for m in data["inputs"]),
                              tuple(TensorMeta.from_dict(m) for m in data["outputs"]),
                              tuple(RouterMeta.from_dict(r) for r in data.get("routers", ())),
                              {str(k): int(v) for k, v in data.get("dim_examples", {}).items()},
                              {str(k): int(v) for k, v in data.get("vocab", {}).items()})
    except (ValueError, TypeError, KeyError) as exc:
        raise BadInput(f"{source}: its deploytool signature is unreadable ({type(exc).__name__}: {exc}); "
                       "export the model again") from exc


def with_io(signature: ModelSignature | None, inputs: list[TensorMeta], outputs: list[TensorMeta]) -> ModelSignature:
    """The backend's own inputs/outputs (what it really takes) with the routers a stored signature names;
    a dim the backend leaves unnamed (an engine's -1) takes the stored signature's name for it."""
    if signature is None:
        return ModelSignature(tuple(inputs), tuple(outputs))
    return ModelSignature(_named(inputs, signature.inputs), _named(outputs, signature.outputs), signature.routers,
                          signature.dim_examples, signature.vocab)


def _named(metas: list[TensorMeta], stored: tuple[TensorMeta, ...]) -> tuple[TensorMeta, ...]:
    known = {m.name: m for m in stored}
    out = []
    for meta in metas:
        other = known.get(meta.name)
        if other is not None and len(other.shape) == len(meta.shape):
            meta = TensorMeta(meta.name, meta.dtype, tuple(
                named if dim is None and isinstance(named, str) else dim for dim, named in zip(meta.shape, other.shape)))
        out.append(meta)
    return tuple(out)
