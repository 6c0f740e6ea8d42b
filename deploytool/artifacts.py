"""Open any target the commands take: a run directory, a Hugging Face folder, an ONNX model or an engine.

`TARGET_KINDS` is the one table of target kinds: for each, what a message asks for and which artifact
a backend reads it as (`reader`: a module rebuilt from weights, an ONNX model or an engine); the backend
registry (`deploytool.runners`) derives from it which backends read a kind. `resolve_target(path,
checkpoint=)` is the one resolver every command uses: the kind, the signature (ONNX: from the metadata
deploytool wrote; engine: from its manifest; a module kind: None, the torch runner traces it), the
deploytool metadata, the source of the module's weights (the target itself, the checkpoint, or the run an
export records), the ONNX model and engine the other backends read, and the source run's config, read and
checked once. The readers of ONNX files and engine manifests live here too. Only NumPy and (lazily) onnx:
no torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploytool import io
from deploytool.choices import BUILTIN_MODELS, DISPATCHES, ROUTER_KINDS
from deploytool.deps import require
from deploytool.dtypes import ONNX_DTYPES
from deploytool.errors import BadInput, first_line
from deploytool.signature import META_KEY, ModelSignature, TensorMeta, from_json, with_io

ENGINE_SUFFIXES = (".plan", ".engine", ".trt")
#: prefix of every deploytool key in an ONNX model's metadata props
META_PREFIX = "deploytool."

@dataclass(frozen=True)
class TargetKind:
    """One kind of target.

    Attributes:
        name: the kind, as `artifact_kind` returns it.
        reader: the artifact a backend reads it as: "run" (a module rebuilt from its weights by
            `checkpoints.open_module`), "onnx" or "engine" (`runners.Backend.artifact`).
        wanted: how a message asks for one.
    """

    name: str
    reader: str
    wanted: str

    @property
    def holds_module(self) -> bool:
        """Whether the torch backends rebuild a module from it (a run directory, a Hugging Face folder)."""
        return self.reader == "run"


#: every kind of target, in the order `artifact_kind` tells them apart: adding a kind is an entry here,
#: its test in `artifact_kind`, and its module in `checkpoints.open_module` if it holds one
TARGET_KINDS: dict[str, TargetKind] = {k.name: k for k in (
    TargetKind("run", "run", "the run directory of the model (its checkpoint)"),
    TargetKind("hf", "run", "a Hugging Face save_pretrained folder"),
    TargetKind("onnx", "onnx", "an ONNX model path"),
    TargetKind("engine", "engine", "an engine path (build one with `deploytool build-engine`)"),
)}


def reader_of(kind: str) -> str:
    """The artifact a backend reads a target of `kind` as.

    Args:
        kind: a key of TARGET_KINDS.

    Returns:
        "run", "onnx" or "engine".

    Raises:
        BadInput: an unknown kind.
    """
    if kind not in TARGET_KINDS:
        raise BadInput(f"unknown target kind {kind!r}; the kinds are {', '.join(TARGET_KINDS)}")
    return TARGET_KINDS[kind].reader


@dataclass
class Artifact:
    """What a path holds: `kind` is a key of TARGET_KINDS ("run", "hf", "onnx" or "engine")."""

    path: Path
    kind: str
    signature: ModelSignature | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    source_run: Path | None = None

    @property
    def reader(self) -> str:
        """The artifact a backend reads it as: "run", "onnx" or "engine"."""
        return reader_of(self.kind)


#: config.json's "model" of a run trained by `fit` from a user's own module: "module:<ClassName>"
MODULE_PREFIX = "module:"


@dataclass
class RunDir:
    """A run directory as read: its path, config.json and metrics.json.

    Built by `load_run` (which checks config.json with `check_run_config`), and returned by `train`,
    `fit` and `commit`.

    Attributes:
        path: the directory.
        config: config.json (architecture + recipe, or a `fit` run's settings).
        metrics: metrics.json ({} when absent).
    """

    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]

    @property
    def weights(self) -> Path:
        """The run's safetensors weights, model.safetensors."""
        return self.path / io.WEIGHTS_FILE

    @property
    def plot(self) -> Path:
        """The routing plot, routing.png (it may be absent)."""
        return self.path / io.ROUTING_PLOT


def read_config(folder: str | Path, what: str = "run config") -> Any:
    """THE reader of a folder's config.json (a run directory's or a Hugging Face folder's): every command
    reads it through here, once (tests count the calls).

    Args:
        folder: the run directory or folder.
        what: how messages name the file.

    Returns:
        The parsed JSON.

    Raises:
        BadInput: a missing or unreadable file, or text that is not JSON.
    """
    return io.read_json(Path(folder) / io.CONFIG_FILE, what)


def load_run(path: str | Path, *, config: Any = None) -> RunDir:
    """Read a run directory's config and metrics (weights are loaded by checkpoints.load_model).

    Args:
        path: the run directory.
        config: its config.json as already read (read_config), so that it is not read again.

    Returns:
        The RunDir.

    Raises:
        BadInput: not a directory, a config.json that is not a deploytool run's (check_run_config), a
            config whose expert count does not match its weights, or a metrics.json that is not an object.
    """
    path = io.check_path(path, "run directory")  # a symlink loop is named as one, not as missing
    if not path.is_dir():
        raise BadInput(f"run directory {path} does not exist or is not a directory")
    config = read_config(path) if config is None else config
    check_run_config(config, path / io.CONFIG_FILE)
    if not is_module_run(config) and not is_hf_run(config):
        _check_expert_count(config, path)
    metrics_path = path / io.METRICS_FILE
    metrics = io.read_json(metrics_path, "metrics") if metrics_path.exists() else {}
    if not isinstance(metrics, dict):
        raise BadInput(f"{metrics_path} is not a deploytool metrics file (expected a JSON object)")
    return RunDir(path, config, metrics)


# config.json entries whose meaning the rest of the tool takes for granted
RUN_CONFIG_INTS = ("in_features", "n_classes", "n_experts")
#: architecture sizes a built-in run's config.json may hold, with their least value
RUN_CONFIG_SIZES = {"expert_hidden": 1, "width": 1, "channels": 1, "d_model": 1, "layers": 1, "heads": 1,
                    "router_hidden": 0, "trunk": 0}
#: the most experts a router may have (train refuses more too); a larger count is a typo, not a model
MAX_EXPERTS = 4096
#: config.json entries that are names, with the values they may take, the first the default (None: any
#: string); "model" may name a built-in model (deploytool.models.MODELS) unless "module:<ClassName>"
RUN_CONFIG_NAMES = {"model": BUILTIN_MODELS, "router": ROUTER_KINDS, "dispatch": DISPATCHES,
                    "penalty": None, "balance": None}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A real int or float, not a bool, not NaN or infinite (what a JSON figure must be)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_run_config(config: Any, source: str | Path) -> None:
    """What every consumer of a run dir (load_model, runners, export, package, serve) relies on, checked once.

    Args:
        config: config.json as read.
        source: the file it came from, named in every message.

    Raises:
        BadInput: not a JSON object, a missing architecture key, a size that is not a whole number in
            range, a temperature that is not a finite number > 0, a loss weight that is not a finite
            number >= 0, a name of the wrong kind, or experts/n_experts that disagree.
    """
    if not isinstance(config, dict):
        raise BadInput(f"{source} is not a deploytool run config (expected a JSON object)")
    for key in ("temperature", "temperature_start"):
        if key in config and (not is_finite_number(config[key]) or config[key] <= 0):
            raise BadInput(f"{source}: {key}={config[key]!r} must be a finite number > 0")
    if is_hf_run(config):
        hf_config, top_k = config.get("hf_config"), config.get("top_k")
        if not (isinstance(hf_config, dict) and isinstance(hf_config.get("model_type"), str)):
            raise BadInput(f"{source}: hf_config must be a transformers config (a JSON object with a model_type)")
        if not _is_int(top_k) or not 1 <= top_k <= MAX_EXPERTS:
            raise BadInput(f"{source}: top_k={top_k!r} must be a whole number from 1 to {MAX_EXPERTS}")
        return
    if is_module_run(config):
        shape = config.get("input_shape")
        if shape is not None and not (isinstance(shape, list) and all(_is_int(d) and d >= 1 for d in shape)):
            raise BadInput(f"{source}: input_shape={shape!r} must be a list of whole numbers >= 1")
        routers = config.get("routers")
        if routers is not None and not (isinstance(routers, dict)
                                        and all(_is_int(n) and n >= 1 for n in routers.values())):
            raise BadInput(f"{source}: routers={routers!r} must map router paths to expert counts")
        return
    missing = [k for k in RUN_CONFIG_INTS if k not in config]
    if missing or "model" not in config:
        raise BadInput(f"{source} lacks {', '.join(missing or ['model'])}: is it a deploytool run's config.json?")
    bad = [k for k in RUN_CONFIG_INTS if not _is_int(config[k]) or config[k] < 1]
    if bad:
        raise BadInput(f"{source}: {', '.join(f'{k}={config[k]!r}' for k in bad)} must be whole numbers >= 1")
    for key, least in RUN_CONFIG_SIZES.items():
        if key in config and (not _is_int(config[key]) or config[key] < least):
            raise BadInput(f"{source}: {key}={config[key]!r} must be a whole number >= {least}")
    for key, allowed in RUN_CONFIG_NAMES.items():
        value = config.get(key, allowed[0] if allowed else "")
        if not isinstance(value, str) or (allowed and value not in allowed):
            wanted = ", ".join(allowed) if allowed else "a name"
            wanted = f"one of {wanted}" if allowed else wanted
            raise BadInput(f"{source}: {key}={value!r} must be {wanted}")
    for key in ("alpha", "beta"):
        if key in config and (not is_finite_number(config[key]) or config[key] < 0):
            raise BadInput(f"{source}: {key}={config[key]!r} must be a finite number >= 0")
    n_experts = config["n_experts"]
    if "experts" in config and config["experts"] != n_experts:
        raise BadInput(f"{source}: n_experts={n_experts!r} disagrees with experts={config['experts']!r}")
    if n_experts > MAX_EXPERTS:
        raise BadInput(f"{source}: n_experts={n_experts} is more than the {MAX_EXPERTS} a router may have")
    if config.get("router", "softmax") == "sigmoid" and n_experts != 2:
        raise BadInput(f"{source}: a sigmoid router routes between exactly 2 experts, got n_experts={n_experts}")
    if n_experts < 2:
        raise BadInput(f"{source}: n_experts={n_experts} must be >= 2 (one expert is no routing)")


def _check_expert_count(config: dict[str, Any], path: Path) -> None:
    """The weights' expert modules (`<module>.experts.<i>.`) number n_experts in every routed module.

    Reads only the safetensors header; weights that are absent or unreadable are left to the loader.
    """
    names = io.safetensors_names(path / io.WEIGHTS_FILE)
    counts: dict[str, set[int]] = {}
    for name in names:
        match = re.match(r"(.*?)experts\.(\d+)\.", name)
        if match:
            counts.setdefault(match.group(1), set()).add(int(match.group(2)))
    for module, indices in counts.items():
        if len(indices) != config["n_experts"]:
            raise BadInput(f"{path / io.CONFIG_FILE}: n_experts={config['n_experts']} but {io.WEIGHTS_FILE} holds "
                           f"{len(indices)} experts in {module.rstrip('.') or 'the model'}")


def is_module_run(config: dict[str, Any]) -> bool:
    """A run trained by `fit` from a user's own module (its class is not deploytool's to rebuild).

    Args:
        config: a run's config.json.

    Returns:
        True when its "model" is "module:<ClassName>".
    """
    return str(config.get("model", "")).startswith(MODULE_PREFIX)


#: the "model" of a run of a transformers model (fit or commit of a language model): "hf:<class name>"
HF_PREFIX = "hf:"


def is_hf_run(config: dict[str, Any]) -> bool:
    """A run of a transformers model: config.json records its hf_config and top_k (checkpoints rebuilds it).

    Args:
        config: a run's config.json.

    Returns:
        Whether its "model" is "hf:<class name>".
    """
    return str(config.get("model", "")).startswith(HF_PREFIX)


def builtin_run(path: str | Path | RunDir) -> RunDir:
    """`load_run` of a run of a built-in model: a run of your own module (from `fit`) is refused, since
    nothing here can rebuild its class.

    Args:
        path: the run directory, or the RunDir already read.

    Returns:
        The RunDir.

    Raises:
        BadInput: not a run directory, or a run of your own module.
    """
    run = path if isinstance(path, RunDir) else load_run(path)
    if is_module_run(run.config):
        raise BadInput(f"{run.path} holds a {run.config['model'].removeprefix(MODULE_PREFIX)} trained with "
                       "deploytool.fit: build that module yourself, load the weights with "
                       "deploytool.load_weights_into(module, run_dir), and pass the module (with example inputs)")
    return run


#: artifact kinds that hold weights the torch backends rebuild a module from: a run directory and a
#: Hugging Face `save_pretrained` folder
MODULE_KINDS = tuple(name for name, kind in TARGET_KINDS.items() if kind.holds_module)


def is_hf_config(config: Any) -> bool:
    """A transformers config.json: it names a `model_type` and no deploytool model."""
    return isinstance(config, dict) and isinstance(config.get("model_type"), str) and "model" not in config


def _folder_config(path: Path) -> tuple[bool, Any]:
    """(whether `path` is a directory with a config.json, that config or None when it cannot be read)."""
    if not (path.is_dir() and (path / io.CONFIG_FILE).is_file()):
        return False, None
    try:
        return True, read_config(path, "config")
    except BadInput:
        return True, None


def folder_config(path: str | Path) -> Any:
    """A directory's config.json, read once; None when there is none or it cannot be read (whoever
    needs it then says why, reading it again on that error path only).

    Args:
        path: a run directory or Hugging Face folder (anything else gives None).

    Returns:
        The parsed config.json, or None.
    """
    return _folder_config(Path(path))[1]


def is_hf_folder(path: str | Path) -> bool:
    """A transformers `save_pretrained` folder: config.json names a `model_type` and no deploytool model."""
    return is_hf_config(_folder_config(Path(path))[1])


@dataclass
class HFFolder:
    """A Hugging Face `save_pretrained` folder as read: its path and config.json.

    Attributes:
        path: the folder.
        config: its config.json (transformers').
    """

    path: Path
    config: dict[str, Any]


def run_or_hf_folder(path: str | Path | RunDir | HFFolder) -> RunDir | HFFolder:
    """A run directory or a Hugging Face folder, its config.json read once (what open_module, commit and
    report take instead of reading it again).

    Args:
        path: the directory (a RunDir or HFFolder is returned as it is).

    Returns:
        The HFFolder, or the RunDir (checked as load_run checks it).

    Raises:
        BadInput: not a directory, no config.json, or a run directory load_run refuses.
    """
    if isinstance(path, (RunDir, HFFolder)):
        return path
    path = io.check_path(path, "run directory")
    if not path.is_dir():
        raise BadInput(f"{path} does not exist or is not a directory: give a run directory or a Hugging Face "
                       "save_pretrained folder")
    config = read_config(path)
    return HFFolder(path, config) if is_hf_config(config) else load_run(path, config=config)


def artifact_kind(path: str | Path) -> str:
    """The kind of target at `path`.

    Args:
        path: a run directory, a Hugging Face save_pretrained folder, an ONNX model or an engine.

    Returns:
        A key of TARGET_KINDS: "run", "hf", "onnx" or "engine".

    Raises:
        BadInput: anything else, saying what was expected.
    """
    return kind_and_config(Path(path))[0]


def kind_and_config(path: str | Path) -> tuple[str, Any]:
    """artifact_kind's answer, and a directory's config.json as it read it, so that it is not read again.

    Args:
        path: a run directory, a Hugging Face save_pretrained folder, an ONNX model or an engine.

    Returns:
        (a key of TARGET_KINDS, the parsed config.json or None when none was read).

    Raises:
        BadInput: a path that is none of those, saying what was expected.
    """
    path = Path(path)
    if path.is_dir():
        has_config, config = _folder_config(path)
        if has_config:
            return ("hf" if is_hf_config(config) else "run"), config
        raise BadInput(f"{path} is a directory without {io.CONFIG_FILE}; give a run directory from `deploytool train` "
                       "or a Hugging Face save_pretrained folder")
    if not path.exists():
        raise BadInput(f"{path} does not exist")
    if path.suffix.lower() == ".onnx":
        return "onnx", None
    if path.suffix.lower() in ENGINE_SUFFIXES:
        return "engine", None
    raise BadInput(f"{path} is neither a run directory, an .onnx file nor a TensorRT engine "
                   f"({', '.join(ENGINE_SUFFIXES)})")


def open_artifact(path: str | Path) -> Artifact:
    """The kind, signature, metadata and source run of `path`.

    Args:
        path: a run directory, an ONNX model or a TensorRT engine (with its manifest).

    Returns:
        The Artifact (a run directory's signature is None: the torch runner traces it).

    Raises:
        BadInput: a path that is none of those, or a broken file, manifest or signature.
    """
    path = Path(path)
    return _read_artifact(path, artifact_kind(path))


def _read_artifact(path: Path, kind: str, onnx_model: Any = None) -> Artifact:
    """open_artifact of a path whose kind is known (an ONNX model already parsed given as `onnx_model`)."""
    if kind in MODULE_KINDS:
        return Artifact(path, kind, source_run=path)
    if kind == "onnx":
        model = load_onnx(path) if onnx_model is None else onnx_model
        metadata = {p.key: p.value for p in model.metadata_props}
        inputs, outputs = graph_signature(model)
        stored = from_json(metadata[META_KEY], str(path)) if META_KEY in metadata else None
        return Artifact(path, kind, with_io(stored, inputs, outputs), metadata, _source_run(metadata))
    manifest = read_manifest(path)
    return Artifact(path, kind, manifest_signature(manifest, path), manifest.get("metadata", {}),
                    _source_run(manifest.get("metadata", {})))


def resolve_checkpoint(checkpoint: str | Path) -> tuple[Path, Path | None]:
    """Where the torch backends take a module's weights from, as the user gave it.

    Args:
        checkpoint: a run directory, a Hugging Face folder, or a .safetensors weights file inside a run.

    Returns:
        (run directory or folder, weights file or None for its own).

    Raises:
        BadInput: a path that is none of those.
    """
    path = Path(checkpoint)
    if path.is_dir():  # a run directory or a Hugging Face folder
        return path, None
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise BadInput(f"checkpoint {path} is neither a run directory nor its .safetensors weights")
        return path.parent, path
    raise BadInput(f"checkpoint {path} does not exist (give a run directory or its model.safetensors)")


class Target:
    """A target resolved for a command: its kind at once; the rest read on first use, once.

    Only the kind is known when it is made (a directory's config.json read to tell a run from a Hugging
    Face folder, and kept): the ONNX model is parsed, the manifest read and the source run opened when
    something asks for them, so `load` of an ONNX model parses nothing with the onnx package (ONNX
    Runtime reads it) and `package` parses it once.

    Attributes:
        path: the target.
        kind: a key of TARGET_KINDS.
        weights: a weights file given as the checkpoint instead of the source's own.
        signature: the model signature (None for a module kind: the torch runner traces it).
        metadata: deploytool's metadata ({} for a module kind).
        source_run: the run directory the target is or records.
        source: the run directory or Hugging Face folder that holds the module's weights: the
            checkpoint given, else the target itself (a module kind), else the run an export records
            while it still exists; None when none is known.
        source_found: the source came from the model's metadata, not from the user.
        onnx_path: the ONNX model the onnxruntime backends read (the target, a run's model.onnx, or
            the ONNX model an engine was built from while that file is unchanged); None when none.
        engine_path: the engine the tensorrt backend reads; None when the target is no engine.
    """

    def __init__(self, path: Path, kind: str, *, config: Any = None, checkpoint: str | Path | None = None,
                 find_onnx: bool = True):
        self.path, self.kind, self._config, self._find_onnx = path, kind, config, find_onnx
        self._given, self.weights = resolve_checkpoint(checkpoint) if checkpoint is not None else (None, None)
        self._artifact: Artifact | None = None
        self._onnx_model: Any = None
        self._opened: RunDir | HFFolder | None = None
        self._onnx_path: Any = _UNSET

    @property
    def reader(self) -> str:
        """The artifact a backend reads it as: "run", "onnx" or "engine"."""
        return reader_of(self.kind)

    def onnx_model(self) -> Any:
        """The ONNX target's onnx.ModelProto (external data not loaded), parsed once.

        Raises:
            BadInput: not an ONNX target, or a file that is not an ONNX model.
        """
        if self.kind != "onnx":
            raise BadInput(f"{self.path} is a {self.kind}, not an ONNX model")
        if self._onnx_model is None:
            self._onnx_model = load_onnx(self.path)
        return self._onnx_model

    def artifact(self) -> Artifact:
        """The artifact as open_artifact reads it (signature, metadata, source run), read once."""
        if self._artifact is None:
            self._artifact = _read_artifact(self.path, self.kind,
                                            self.onnx_model() if self.kind == "onnx" else None)
        return self._artifact

    @property
    def signature(self) -> ModelSignature | None:
        return self.artifact().signature

    @property
    def metadata(self) -> dict[str, str]:
        return self.artifact().metadata

    @property
    def source_run(self) -> Path | None:
        return self.path if self.kind in MODULE_KINDS else self.artifact().source_run

    @property
    def source(self) -> Path | None:
        if self._given is not None:
            return self._given
        return self.path if self.kind in MODULE_KINDS else self.source_run

    @property
    def source_found(self) -> bool:
        return self._given is None and self.kind not in MODULE_KINDS and self.source_run is not None

    @property
    def onnx_path(self) -> Path | None:
        if self._onnx_path is _UNSET:
            if self.kind in MODULE_KINDS:
                onnx = self.path / "model.onnx"
                self._onnx_path = onnx if onnx.is_file() else None
            elif self.kind == "onnx":
                self._onnx_path = self.path
            else:
                self._onnx_path = engine_onnx(self.path) if self._find_onnx else None
        return self._onnx_path

    @onnx_path.setter
    def onnx_path(self, value: Path | None) -> None:  # bench's temporary export of a run
        self._onnx_path = value

    @property
    def engine_path(self) -> Path | None:
        return self.path if self.kind == "engine" else None

    def file_for(self, reader: str) -> Path | None:
        """The path a backend reading `reader` ("run", "onnx", "engine") takes; None when there is none."""
        return {"run": self.source, "onnx": self.onnx_path, "engine": self.engine_path}[reader]

    @property
    def source_weights(self) -> Path | None:
        """The weights file the torch backends load: the checkpoint file given, else the source run's own."""
        if self.weights is not None:
            return self.weights
        return self.source / io.WEIGHTS_FILE if self.source is not None else None

    def module_options(self) -> dict[str, Any]:
        """Options of the torch runner over `source`: a Hugging Face folder is rebuilt at the top-k the
        exported model (the target) was made with; {} otherwise."""
        if not self.source_is_hf or self.signature is None:
            return {}
        return {"top_k": top_k_of(self.signature)}

    @property
    def source_is_hf(self) -> bool:
        """Whether the source is a Hugging Face folder (no run config, no data set)."""
        if self.source is None:
            return False
        try:
            return isinstance(self.opened(), HFFolder)
        except BadInput:  # a broken source run: `run()` says what is wrong with it
            return False

    def opened(self) -> RunDir | HFFolder | None:
        """The source as run_or_hf_folder reads it (its config.json read once per command: the one
        artifact_kind read for the target itself); None when there is no source.

        Raises:
            BadInput: a source that is not a readable run directory or folder.
        """
        if self._opened is None and self.source is not None:
            if self._given is None and self.kind in MODULE_KINDS and self._config is not None:
                self._opened = (HFFolder(self.path, self._config) if self.kind == "hf"
                                else load_run(self.path, config=self._config))
            else:
                self._opened = run_or_hf_folder(self.source)
        return self._opened

    def run(self) -> RunDir | None:
        """The source run directory, read and checked once (None for a Hugging Face folder or no source).

        Raises:
            BadInput: a source that is not a readable run directory (see load_run).
        """
        opened = self.opened()
        return opened if isinstance(opened, RunDir) else None

    def run_config(self) -> dict[str, Any] | None:
        """The source run's config.json (None for a Hugging Face folder or no source)."""
        run = self.run()
        return run.config if run is not None else None


#: a lazily computed attribute not computed yet
_UNSET = object()


def resolve_target(path: str | Path, *, checkpoint: str | Path | None = None, find_onnx: bool = True) -> Target:
    """Resolve a command's target: its kind now; its signature, metadata, source of weights and readers'
    files when first asked (see Target).

    Args:
        path: a run directory, a Hugging Face folder, an ONNX model or a TensorRT engine.
        checkpoint: the run directory, its weights file or the Hugging Face folder the torch backends
            load instead of the target's own source.
        find_onnx: look for the ONNX model an engine was built from (it is hashed to be sure it is
            unchanged); a command that runs no ONNX backend on an engine skips it.

    Returns:
        The Target (a module kind's signature is None: the torch runner traces it).

    Raises:
        BadInput: a path or checkpoint that is none of those; a broken file, manifest or signature when
            it is read.
    """
    path = Path(path)
    kind, config = kind_and_config(path)
    return Target(path, kind, config=config, checkpoint=checkpoint, find_onnx=find_onnx)


def engine_onnx(engine: Path) -> Path | None:
    """The ONNX model an engine was built from, as its manifest records it, while that file is unchanged.

    Args:
        engine: the engine (its manifest beside it).

    Returns:
        The ONNX model's path, or None when none is recorded or it changed.
    """
    recorded = read_manifest(engine).get("onnx") or {}
    onnx = Path(recorded.get("path") or "")
    if recorded.get("path") and onnx.is_file() and io.sha256_file(onnx) == recorded.get("sha256"):
        return onnx
    return None


def _source_run(metadata: dict[str, str]) -> Path | None:
    """The run directory the metadata records as the model's source, while it still exists. A relative
    source (older exports) meant the exporter's working directory, unknown here: not guessed."""
    source = Path(metadata.get(META_PREFIX + "source", ""))
    return source if source.is_absolute() and (source / io.CONFIG_FILE).is_file() else None


def top_k_of(signature: ModelSignature | None) -> int | None:
    """The k every top-k router of an exported model picks (what its torch reference must pick too), or
    None when it has none or they differ."""
    ks = {r.k for r in signature.routers} if signature is not None else set()
    return ks.pop() if len(ks) == 1 else None


# --- ONNX ------------------------------------------------------------------------------------

def check_onnx_file(path: str | Path, what: str = "ONNX model") -> Path:
    """Refuse a missing path or a directory (a run directory in particular) before any backend reads it.

    Args:
        path: the path given as an ONNX model.
        what: how messages name it.

    Returns:
        The path, an existing file.

    Raises:
        BadInput: a run directory, another directory, or a missing path.
    """
    path = Path(path)
    if (path / io.CONFIG_FILE).is_file():
        raise BadInput(f"{path} is a run directory, not a model; export it first: "
                       f"deploytool export {path} --out model.onnx")
    if path.is_dir():
        raise BadInput(f"{path} is a directory; give an ONNX file")
    return io.check_file(path, what)


def load_onnx(path: str | Path):
    """The ModelProto at `path`, external data not loaded.

    Args:
        path: the .onnx file.

    Returns:
        The onnx.ModelProto.

    Raises:
        BadInput: a missing path, a directory, a run directory, or an empty, truncated or non-ONNX file.
        MissingDependency: onnx is not installed.
    """
    onnx = _onnx()
    path = check_onnx_file(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise BadInput(f"{path} is not an ONNX model (or is truncated): {type(exc).__name__}") from exc
    if not proto.graph.node:  # an empty file parses as an empty model
        raise BadInput(f"{path} is not an ONNX model (or is truncated): it has no graph")
    return proto


def read_external_weights(model, onnx_path: str | Path):
    """`model` (from load_onnx) with its external data, if any, read in from beside `onnx_path`;
    a missing or short weights file is BadInput.

    Args:
        model: the onnx.ModelProto as load_onnx read it.
        onnx_path: the .onnx file it was read from.

    Returns:
        `model`, its external tensors read in.

    Raises:
        BadInput: an external weights file that is missing, short or unreadable.
    """
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    if any(uses_external_data(t) for t in model.graph.initializer):
        onnx = _onnx()
        try:
            load_external_data_for_model(model, str(Path(onnx_path).resolve().parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise BadInput(f"{onnx_path}: its external weights cannot be read ({first_line(exc)})") from exc
    return model


def graph_signature(model) -> tuple[list[TensorMeta], list[TensorMeta]]:
    """(inputs, outputs) of a ModelProto's graph; initializers listed as inputs are not inputs."""
    onnx = _onnx()
    graph = model.graph
    initializers = {t.name for t in graph.initializer}

    def meta(value) -> TensorMeta:
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
        dtype = ONNX_DTYPES.get(tensor.elem_type) or onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
        return TensorMeta(value.name, dtype, dims)

    return [meta(v) for v in graph.input if v.name not in initializers], [meta(v) for v in graph.output]


def _onnx():
    return require("onnx", "reading ONNX models")


# --- engine manifests ------------------------------------------------------------------------

def manifest_path(engine_path: str | Path) -> Path:
    """Where an engine's manifest lives: beside it, `<engine>.json`."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def read_manifest(engine_path: str | Path) -> dict[str, Any]:
    """The manifest of the engine at `engine_path`, checked for what its readers rely on.

    Args:
        engine_path: the engine; its manifest is `<engine>.json` beside it.

    Returns:
        The manifest as a dict.

    Raises:
        BadInput: no engine, no manifest, or a manifest that lacks what readers need.
    """
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise BadInput(f"engine {engine_path} does not exist")
    if engine_path.suffix.lower() not in ENGINE_SUFFIXES:
        raise BadInput(f"{engine_path} is not a TensorRT engine ({', '.join(ENGINE_SUFFIXES)}); "
                       "build one with deploytool build-engine")
    path = manifest_path(engine_path)
    if not path.is_file():
        raise BadInput(f"engine {engine_path} has no manifest {path.name}; rebuild it with deploytool build-engine")
    manifest = io.read_json(path, "engine manifest")
    problem = _manifest_problem(manifest)
    if problem:
        raise BadInput(f"{path} is not a deploytool engine manifest ({problem}); "
                       "rebuild the engine with deploytool build-engine")
    return manifest


def _manifest_problem(manifest) -> str | None:
    """What a manifest lacks that readers (runner, package, doctor) rely on; None when whole."""
    if not isinstance(manifest, dict):
        return "not a JSON object"
    if "tensorrt" not in manifest:
        return "no tensorrt version"
    tensors_io = manifest.get("io")
    if not isinstance(tensors_io, dict):
        return "no io"
    for kind in ("inputs", "outputs"):
        tensors = tensors_io.get(kind)
        if not isinstance(tensors, list) or not tensors or not all(map(_is_tensor, tensors)):
            return f"io.{kind} is not a list of tensors with name, dtype and shape"
    profile = manifest.get("profile")
    if not isinstance(profile, dict):
        return "no profile"
    for name, shapes in profile.items():
        if not (isinstance(shapes, dict) and all(_is_shape(shapes.get(k)) for k in ("min", "opt", "max"))):
            return f"profile of {name!r} lacks integer min, opt and max shapes"
    return None


def _is_shape(shape) -> bool:
    return isinstance(shape, list) and bool(shape) and all(isinstance(d, int) and not isinstance(d, bool)
                                                           for d in shape)


def _is_tensor(t) -> bool:
    return (isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("dtype"), str)
            and isinstance(t.get("shape"), list) and all(isinstance(d, int) for d in t["shape"]))


def tensor_metas(manifest: dict, kind: str) -> list[TensorMeta]:
    """The engine's "inputs" or "outputs" as TensorMeta (a -1 dim is dynamic: None), from a read manifest.

    Args:
        manifest: a manifest as read_manifest returns it.
        kind: "inputs" or "outputs".

    Returns:
        One TensorMeta per tensor, in the manifest's order.
    """
    return [TensorMeta(t["name"], t["dtype"], tuple(None if d < 0 else d for d in t["shape"]))
            for t in manifest["io"][kind]]


def manifest_signature(manifest: dict, engine_path: str | Path) -> ModelSignature:
    """The engine's signature: its own tensors, with the routers its manifest copied from the ONNX model.

    Args:
        manifest: a manifest as read_manifest returns it.
        engine_path: the engine (named in messages).

    Returns:
        The engine's ModelSignature.

    Raises:
        BadInput: a stored signature that does not check.
    """
    stored = manifest.get("signature")
    routers = from_json(stored, f"{manifest_path(engine_path)}") if stored else None
    return with_io(routers, tensor_metas(manifest, "inputs"), tensor_metas(manifest, "outputs"))


def max_batch(manifest: dict) -> int | None:
    """The largest batch every input of the engine's profile accepts; None for an engine without a profile."""
    return min((shapes["max"][0] for shapes in manifest["profile"].values()), default=None)
