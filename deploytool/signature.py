"""The model signature: what a deployed routed model takes and returns, read by every part of the tool.

Inputs and outputs (name, dtype, shape; a str or None dim is dynamic) and, for every router, its module
path, expert count, temperature and the names of its `index` and `probs` outputs. Export builds it once
from the module and example inputs and writes it into the ONNX metadata (the engine manifest copies it);
runners, verify, bench, package, serve and load read it back instead of assuming tensor names or ranks.
Only NumPy here: serving an ONNX model reads a signature without torch.
"""

from __future__ import annotations

import json
import math
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
        """The inputs' names, in order."""
        return [m.name for m in self.inputs]

    @property
    def output_names(self) -> list[str]:
        """The outputs' names, in order, every router's included."""
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
        check_router_outputs(self, source)

    # --- checking feeds ------------------------------------------------------------------------
    def check_feed(self, feed: Mapping[str, Any], *, what: str = "input") -> dict[str, np.ndarray]:
        """The feed as contiguous arrays the model takes, or BadInput naming the expected signature.

        Every input must be given, by name, with the model's dtype and rank, its static dims, one
        batch size shared by all inputs, at least one row, and no NaN or inf (a router cannot choose
        an expert for such a row, and would silently).

        Args:
            feed: arrays (or array-likes) keyed by input name.
            what: how messages name the feed's entries ("input").

        Returns:
            {input name: array}.

        Raises:
            BadInput: a feed that does not fit the signature, saying what the model takes.
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
    """Whether a dim is a fixed size, not a named or unknown one.

    Args:
        dim: an int, a dim name, or None.

    Returns:
        True for an int >= 0 (not a bool).
    """
    return isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0


def shape_text(shape: tuple[Dim, ...]) -> str:
    """A shape as messages write it: [batch, 8].

    Args:
        shape: the dims.

    Returns:
        The text.
    """
    return "[" + ", ".join(str(d) if is_static(d) else (d if isinstance(d, str) and d else "?") for d in shape) + "]"


def numpy_dtype(name: str) -> np.dtype | None:
    """The NumPy dtype of a dtype name; None for those NumPy does not have (bfloat16)."""
    try:
        return np.dtype(name)
    except TypeError:
        return None


# --- (de)serialising --------------------------------------------------------------------------

def to_json(signature: ModelSignature) -> str:
    """The signature as the JSON stored under META_KEY (from_json reads it back).

    Args:
        signature: the ModelSignature.

    Returns:
        The JSON text.
    """
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
        check_signature_data(data, source)
        return ModelSignature(tuple(TensorMeta.from_dict(m) for m in data["inputs"]),
                              tuple(TensorMeta.from_dict(m) for m in data["outputs"]),
                              tuple(RouterMeta.from_dict(r) for r in data.get("routers", ())),
                              {str(k): int(v) for k, v in data.get("dim_examples", {}).items()},
                              {str(k): int(v) for k, v in data.get("vocab", {}).items()})
    except BadInput:
        raise
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise BadInput(f"{source}: its deploytool signature is unreadable ({type(exc).__name__}: {exc}); "
                       "export the model again") from exc


def with_io(signature: ModelSignature | None, inputs: list[TensorMeta], outputs: list[TensorMeta]) -> ModelSignature:
    """The backend's own inputs/outputs (what it really takes) with the routers a stored signature names;
    a dim the backend leaves unnamed (an engine's -1) takes the stored signature's name for it.

    Args:
        signature: the stored signature, or None.
        inputs: the backend's inputs.
        outputs: the backend's outputs.

    Returns:
        The ModelSignature.
    """
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


# --- checking a stored signature (it may have been edited) ---------------------------------------

#: bounds on the numbers a stored signature holds: beyond them it was not written by an export
MAX_STORED_DIM = 2**31 - 1
MAX_EXAMPLE_DIM = 1 << 20
#: the largest vocabulary a stored signature may name (ids are int64; no model has 2^31 tokens)
MAX_VOCAB = 1 << 31
MAX_ROUTER_EXPERTS = 4096


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_signature_data(data: Any, source: str) -> None:
    """Refuse a parsed signature whose numbers or types no export writes (a tampered file).

    Args:
        data: the parsed JSON of a signature.
        source: the file it came from, for messages.

    Raises:
        BadInput: naming the entry and what it must be.
    """
    def bad(what: str) -> BadInput:
        return BadInput(f"{source}: its deploytool signature is unreadable (it has {what}); export the model again")

    if not isinstance(data, Mapping):
        raise bad("no JSON object")
    for kind in ("inputs", "outputs"):
        tensors = data.get(kind)
        if not isinstance(tensors, list) or not tensors:
            raise bad(f"no {kind}")
        for t in tensors:
            if not isinstance(t, Mapping) or not isinstance(t.get("name"), str) or not isinstance(t.get("dtype"), str) \
                    or not isinstance(t.get("shape"), list):
                raise bad(f"an entry of {kind} that is not a tensor (name, dtype, shape): {str(t)[:80]}")
            for d in t["shape"]:
                if not (d is None or isinstance(d, str) or (_whole(d) and -1 <= d <= MAX_STORED_DIM)):
                    raise bad(f"the dim {d!r} in {t['name']!r}: a dim is a whole number 0..{MAX_STORED_DIM}, "
                              "or a name (or -1) for a dynamic one")
    for field_name, what, most in (("dim_examples", "example size", MAX_EXAMPLE_DIM),
                                   ("vocab", "vocabulary size", MAX_VOCAB)):
        table = data.get(field_name, {})
        if not isinstance(table, Mapping):
            raise bad(f"{field_name} that is not a table")
        for key, value in table.items():
            if not (_whole(value) and 1 <= value <= most):
                raise bad(f"the {what} {key}={value!r}: it is a whole number 1..{most}")
    routers = data.get("routers", [])
    if not isinstance(routers, list):
        raise bad("routers that are not a list")
    for r in routers:
        if not isinstance(r, Mapping) or not all(isinstance(r.get(k), str) for k in ("path", "index", "probs")):
            raise bad(f"a router entry without path, index and probs names: {str(r)[:80]}")
        n, temperature, k = r.get("n_experts"), r.get("temperature"), r.get("k", 1)
        if not (_whole(n) and 2 <= n <= MAX_ROUTER_EXPERTS):
            raise bad(f"n_experts={n!r} for router {r['path']!r}: a whole number 2..{MAX_ROUTER_EXPERTS}")
        if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
                and math.isfinite(temperature) and temperature > 0):
            raise bad(f"temperature={temperature!r} for router {r['path']!r}: a finite number > 0")
        if not (_whole(k) and 1 <= k <= n):
            raise bad(f"k={k!r} for router {r['path']!r}: a whole number 1..n_experts")
        if r["index"] == r["probs"]:
            raise bad(f"one output {r['index']!r} as both index and probs of router {r['path']!r}")


def check_router_outputs(signature: ModelSignature, source: str) -> None:
    """Every router's outputs are what its entry says: `index` an integer tensor over the router's
    positions (one more trailing dim of size k for a top-k router), `probs` a floating tensor whose
    last dim is n_experts; and the model has inputs.

    Args:
        signature: the model's signature (the graph's own tensors with the stored routers).
        source: the artifact, for messages.

    Raises:
        BadInput: naming the router and the output that does not fit.
    """
    if not signature.inputs:
        raise BadInput(f"{source} has no inputs: a model that routes nothing cannot be loaded, verified or served")
    outputs = {m.name: m for m in signature.outputs}
    for r in signature.routers:
        index, probs, k = outputs[r.index], outputs[r.probs], getattr(r, "k", 1)
        where = f"{source}: router {r.path!r}"
        if not _whole(r.n_experts) or r.n_experts < 2:
            raise BadInput(f"{where} has n_experts={r.n_experts!r}; a router chooses among >= 2 experts")
        if not (math.isfinite(r.temperature) and r.temperature > 0):
            raise BadInput(f"{where} has temperature {r.temperature!r}; it must be a finite number > 0")
        index_dtype, probs_dtype = numpy_dtype(index.dtype), numpy_dtype(probs.dtype)
        if index_dtype is None or index_dtype.kind not in "iu":
            raise BadInput(f"{where}: its index output {r.index!r} is {index.dtype}, not an integer tensor")
        if probs.dtype != "bfloat16" and (probs_dtype is None or probs_dtype.kind != "f"):
            raise BadInput(f"{where}: its probs output {r.probs!r} is {probs.dtype}, not a floating tensor")
        if not probs.shape:
            raise BadInput(f"{where}: its probs output {r.probs!r} is a scalar, not positions by experts")
        last = probs.shape[-1]
        if is_static(last) and last != r.n_experts:
            raise BadInput(f"{where} has n_experts={r.n_experts} but its probs output {r.probs!r} holds {last} "
                           "per position")
        rank = len(probs.shape) - (1 if k == 1 else 0)
        if len(index.shape) != rank or (k > 1 and is_static(index.shape[-1]) and index.shape[-1] != k):
            want = shape_text(probs.shape[:-1] + ((k,) if k > 1 else ()))
            raise BadInput(f"{where}: its index output {r.index!r} has shape {shape_text(index.shape)}, its "
                           f"probs {shape_text(probs.shape)}: the index should be {want}")
