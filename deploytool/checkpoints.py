"""Rebuild a module from what holds its weights: a run directory or a Hugging Face folder.

`open_module(path)` is the one way every command gets a torch module out of a target: the module (eval
mode), the example inputs it traces with, its extra dynamic dims, and where its weights came from.
A run directory of a built-in model rebuilds from its config.json; a `save_pretrained` folder through
transformers (offline, safetensors only) and `deploytool.hf.from_hf`. Weights load with safetensors,
checked (names, shapes, dtypes, finite) before they replace anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploytool import io
from deploytool.artifacts import HFFolder, RunDir, builtin_run, is_hf_run, load_run, run_or_hf_folder
from deploytool.errors import BadInput


@dataclass
class ModuleSource:
    """A module rebuilt from a target.

    Attributes:
        module: the torch module, in eval mode.
        example_inputs: inputs it traces with, by name.
        dynamic_dims: dims beyond the batch that vary, {input: {axis: name}}.
        path: the run directory or folder it came from.
        weights: the weights file(s) it loaded.
        run_config: a run directory's config.json (None for a Hugging Face folder).
    """

    module: Any
    example_inputs: Any
    dynamic_dims: dict[str, dict[int, str]] = field(default_factory=dict)
    path: Path | None = None
    weights: list[Path] = field(default_factory=list)
    run_config: dict[str, Any] | None = None


def open_module(path: str | Path | RunDir | HFFolder, *, checkpoint: str | Path | None = None,
                top_k: int | None = None) -> ModuleSource:
    """The module a run directory or Hugging Face folder holds, ready to run or export.

    Its config.json is read once (artifacts.run_or_hf_folder), or not at all when `path` is a run or
    folder already read.

    Args:
        path: a run directory of a built-in model or of a transformers model (fit or commit of a language
            model: rebuilt from the config it recorded), or a transformers `save_pretrained` folder; or
            either as artifacts.run_or_hf_folder read it.
        checkpoint: other weights for a run directory.
        top_k: experts per token of a Hugging Face model's routers (None: its own, or the run's).

    Returns:
        The ModuleSource.

    Raises:
        BadInput: not such a target, weights that do not match, an option that does not apply to it.
        MissingDependency: transformers, for a Hugging Face folder.
    """
    from deploytool.models import example_inputs

    if not isinstance(path, (RunDir, HFFolder)):
        path = io.check_path(path)
        if not path.is_dir():
            raise BadInput(f"{path} does not exist or is not a directory: give a run directory or a Hugging Face "
                           "save_pretrained folder")
        if not (path / io.CONFIG_FILE).is_file():
            builtin_run(path)  # says what is missing, as before
    opened = run_or_hf_folder(path)
    path = opened.path
    if isinstance(opened, HFFolder):
        from deploytool import hf

        if checkpoint is not None:
            raise BadInput(f"{path} is a Hugging Face folder: it loads its own weights (no separate checkpoint)")
        model = hf.load_folder(path, top_k=top_k)
        example = hf.example_inputs(model)
        return ModuleSource(model, example, hf.dynamic_dims(example), path, sorted(path.glob("*.safetensors")))
    if is_hf_run(opened.config):
        return _open_hf_run(opened, checkpoint, top_k)
    if top_k is not None:
        raise BadInput(f"top-k applies to a Hugging Face MoE model; {path} is a run of a deploytool model "
                       "(its routers pick one expert)")
    run = builtin_run(opened)
    weights = Path(checkpoint) if checkpoint else run.weights
    return ModuleSource(load_model(run, weights), example_inputs(run.config), {}, run.path, [weights],
                        run.config)


def _open_hf_run(run: Any, checkpoint: str | Path | None, top_k: int | None) -> ModuleSource:
    """A run of a transformers model (fit or commit of a language model): built from the config.json it
    recorded, converted by from_hf at its top_k (or `top_k`), its weights loaded, its temperature set."""
    import torch

    from deploytool import hf
    from deploytool.deps import require
    from deploytool.nn import set_temperature

    require("transformers", "a run of a Hugging Face model")
    import transformers

    hf_config = run.config["hf_config"]
    try:
        config_class = transformers.CONFIG_MAPPING[hf_config["model_type"]]
        config = config_class.from_dict(hf_config)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (KeyError, ValueError, TypeError) as exc:
        raise BadInput(f"{run.path / io.CONFIG_FILE}: transformers cannot build its hf_config: {exc}") from exc
    model = hf.from_hf(model.eval(), top_k=top_k if top_k is not None else int(run.config["top_k"]))
    weights = Path(checkpoint) if checkpoint else run.weights
    _load_state(model, weights, str(run.config["model"]))
    set_temperature(model, float(run.config.get("temperature", 1.0)))
    example = hf.example_inputs(model)
    return ModuleSource(model.eval(), example, hf.dynamic_dims(example), run.path, [weights], run.config)


def load_model(path: str | Path | RunDir, checkpoint: str | Path | None = None):
    """Rebuild the built-in model of a run directory and load its safetensors weights, in eval mode.

    Args:
        path: the run directory, or the RunDir already read (its config.json is not read again).
        checkpoint: other weights to load instead of the run's own.

    Returns:
        The model, in eval mode.

    Raises:
        BadInput: not a run dir, a config.json that does not describe a model (check_run_config), a run of
            your own module (use `load_weights_into`), a model too large for this machine's memory, or
            weights that do not match, are not floating point or hold NaN or inf.
    """
    from deploytool.models import build_model

    run = builtin_run(path)
    try:
        model = build_model(run.config)
    except BadInput as exc:
        raise BadInput(f"{run.path / io.CONFIG_FILE}: {exc}") from exc
    _load_state(model, checkpoint or run.weights, str(run.config.get("model")))
    return model.eval()


def load_weights_into(module: Any, run_dir: str | Path, checkpoint: str | Path | None = None):
    """Load a run directory's weights into a module you built (for runs of `fit` and `commit` on your module).

    Every Router gets the run's final temperature (a plain attribute, not in the weights).

    Args:
        module: an instance of the class the run was trained from, built with the same arguments.
        run_dir: the run directory.
        checkpoint: other weights to load instead of the run's own.

    Returns:
        `module`, in eval mode.

    Raises:
        BadInput: not a run dir, or weights whose names or shapes do not match the module, are not
            floating point or hold NaN or inf.
    """
    from deploytool.nn import set_temperature

    run = load_run(run_dir)
    _load_state(module, checkpoint or run.weights, type(module).__name__)
    if "temperature" in run.config:
        set_temperature(module, float(run.config["temperature"]))
    return module.eval()


def load_state(model: Any, weights: str | Path, what: str) -> None:
    """Load safetensors weights into `model`, checked (names, shapes, floating point, finite).

    Args:
        model: the module.
        weights: the safetensors file.
        what: the model's name in messages.

    Raises:
        BadInput: weights that do not match `model` or hold NaN or inf.
    """
    _load_state(model, weights, what)


def _load_state(model: Any, weights: str | Path, what: str) -> None:
    """Load safetensors weights into `model`, refusing missing, unexpected, reshaped, non-floating-point
    or non-finite tensors (NaN weights export and serve without an error, and answer nonsense)."""
    import torch

    state = io.load_weights(weights)
    missing = set(model.state_dict()) - set(state)
    unexpected = set(state) - set(model.state_dict())
    if missing or unexpected:
        raise BadInput(f"checkpoint does not match {what}: missing {sorted(missing)[:3]}, "
                       f"unexpected {sorted(unexpected)[:3]}")
    for name, tensor in model.state_dict().items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise BadInput(f"checkpoint tensor {name} has shape {list(state[name].shape)}, "
                           f"the model expects {list(tensor.shape)}")
        if tensor.is_floating_point():
            if not state[name].is_floating_point():
                got, wanted = (str(t.dtype).removeprefix("torch.") for t in (state[name], tensor))
                raise BadInput(f"checkpoint {weights}: tensor {name} is {got}, the model expects floating point "
                               f"({wanted})")
            if not bool(torch.isfinite(state[name]).all()):
                raise BadInput(f"checkpoint {weights}: tensor {name} holds NaN or inf")
    model.load_state_dict(state)
