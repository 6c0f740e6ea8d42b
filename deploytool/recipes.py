"""Training recipes: the TOML files under models/ and the flags of `deploytool train` map to TrainConfig."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploytool.artifacts import MAX_EXPERTS  # one bound, also checked in run configs
from deploytool.choices import ROUTER_KINDS
from deploytool.errors import BadInput
from deploytool.losses import (DEFAULT_ALPHA, DEFAULT_BETA, ONE_CLASS_MESSAGE, check_routing_loss,
                               check_temperature)

ROUTINGS = ("soft", "gumbel")
#: bounds past which a value is a typo, not a model: refused before anything is allocated
MAX_EPOCHS = 100_000
MAX_BATCH_SIZE = 1 << 20
MAX_WIDTH = 1 << 20      # expert_hidden, width, channels, d_model, router_hidden, trunk
MAX_LAYERS = 1024
# field annotation -> accepted Python types (bools are refused even where int is accepted)
_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "float | None": (int, float),
          "dict[str, Any]": (dict,)}


def _check_types(obj: Any) -> None:
    """Each value has its field's type (a TOML typo like experts = "four" or 2.7, or epochs = true)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        wanted = _TYPES[f.type]
        ok = isinstance(value, wanted) and not isinstance(value, bool) or (value is None and "None" in f.type)
        if not ok:
            names = " or ".join(t.__name__ for t in wanted)
            raise BadInput(f"{f.name} must be {names}, got {value!r}")


@dataclass
class LoopSettings:
    """How the training loop runs, whatever the model: `train`, `fit` and `commit` share it.

    The router temperature anneals geometrically from `temperature` to `temperature_end` (None: constant);
    `routing` is soft (blend the experts) or gumbel (straight-through) while training.

    Args:
        epochs: passes over the data (1..MAX_EPOCHS).
        lr: AdamW learning rate (> 0).
        lr_schedule: cosine (decay to 0) or constant.
        weight_decay: AdamW weight decay (>= 0).
        batch_size: rows per step (1..MAX_BATCH_SIZE).
        seed: seeds torch and the shuffling (>= 0).
        temperature: the routers' temperature at the start (> 0).
        temperature_end: the temperature at the end (> 0), None for a constant one.
        routing: soft or gumbel.

    Raises:
        BadInput: a value of the wrong type or out of range, named.
    """

    epochs: int = 100
    lr: float = 2e-3
    lr_schedule: str = "cosine"      # cosine (decay to 0) | constant
    weight_decay: float = 0.0
    batch_size: int = 64
    seed: int = 0
    temperature: float = 1.0
    temperature_end: float | None = 0.02
    routing: str = "soft"            # soft blend or gumbel straight-through while training

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check the type of every field, then the loop's own (see the class's Raises)."""
        _check_types(self)
        try:
            check_temperature(self.temperature)
            if self.temperature_end is not None:
                check_temperature(self.temperature_end, "temperature_end")
        except ValueError as exc:
            raise BadInput(str(exc)) from exc
        if self.lr_schedule not in ("cosine", "constant"):
            raise BadInput(f"lr_schedule must be cosine or constant, got {self.lr_schedule!r}")
        if self.routing not in ROUTINGS:
            raise BadInput(f"unknown routing {self.routing!r}; choose one of {', '.join(ROUTINGS)}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise BadInput(f"lr must be a finite number > 0, got {self.lr}")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise BadInput(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        for name, most in (("epochs", MAX_EPOCHS), ("batch_size", MAX_BATCH_SIZE)):
            if getattr(self, name) < 1:
                raise BadInput(f"{name} must be a whole number >= 1, got {getattr(self, name)}")
            if getattr(self, name) > most:
                raise BadInput(f"{name} must be at most {most}, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:
            raise BadInput(f"seed must be a whole number from 0 to {2**32 - 1}, got {self.seed}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


LOOP_FIELDS = tuple(f.name for f in dataclasses.fields(LoopSettings))


@dataclass
class TrainConfig(LoopSettings):
    """Everything that decides a training run; stored in config.json so the model can be rebuilt.

    The defaults are the measured default recipe (docs/routing.md): on digits with 4 experts they keep
    hard accuracy equal to soft accuracy with 95%+ of rows routed at p >= 0.99. `channels` sizes
    routed-cnn; `d_model`, `layers` and `heads` size moe-transformer; other models ignore them.

    Args:
        model: routed-mlp, routed-cnn or moe-transformer.
        dataset: digits, blobs or a path to an .npz file.
        experts: experts per router (2..MAX_EXPERTS; 2 with a sigmoid router).
        router: softmax, or sigmoid (a 1-logit binary router).
        routing: soft (blend) or gumbel (straight-through) while training.
        penalty: the confidence penalty: frank, entropy or none; `alpha` its weight.
        balance: the load-balancing term: entropy, switch or none; `beta` its weight.
        temperature, temperature_end, epochs, lr, lr_schedule, weight_decay, batch_size, seed: as LoopSettings.
        expert_hidden, width, router_hidden, trunk, channels, d_model, layers, heads: the architecture's
            sizes (each at most MAX_WIDTH, layers at most MAX_LAYERS).
        data_options: options of the data set (data.check_data_options: test_fraction; blobs' sizes).

    Raises:
        BadInput: a value of the wrong type or range, an unknown model or data set, or data_options the
            data set does not take, named (checked on creation and by `validate`).
    """

    model: str = "routed-mlp"
    dataset: str = "digits"
    experts: int = 4
    router: str = "softmax"          # softmax | sigmoid (binary: experts must be 2)
    penalty: str = "frank"           # frank | entropy | none
    alpha: float = DEFAULT_ALPHA
    balance: str = "entropy"         # entropy | switch | none
    beta: float = DEFAULT_BETA
    expert_hidden: int = 64
    width: int = 32
    router_hidden: int = 0
    trunk: int = 0
    channels: int = 16               # routed-cnn: conv channels
    d_model: int = 32                # moe-transformer: token width
    layers: int = 2                  # moe-transformer: encoder layers (one router each)
    heads: int = 4                   # moe-transformer: attention heads (d_model must be a multiple)
    data_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Check every field (see the class's Raises)."""
        from deploytool.data import BUILTIN, check_data_options
        from deploytool.models import MODELS

        super().validate()  # the types of every field, then the loop's
        if self.model not in MODELS:
            raise BadInput(f"unknown model {self.model!r}; built-in models: {', '.join(MODELS)}")
        if self.router not in ROUTER_KINDS:
            raise BadInput(f"router must be {' or '.join(ROUTER_KINDS)}, got {self.router!r}")
        if self.router == "softmax" and self.experts == 1:
            raise BadInput(f"experts=1: {ONE_CLASS_MESSAGE}")
        if self.experts < 2:
            raise BadInput(f"experts must be a whole number >= 2, got {self.experts}")
        if self.experts > MAX_EXPERTS:
            raise BadInput(f"experts must be at most {MAX_EXPERTS}, got {self.experts}")
        if self.router == "sigmoid" and self.experts != 2:
            raise BadInput(f"a sigmoid router routes between exactly 2 experts, got experts={self.experts}")
        try:
            check_routing_loss(self.penalty, self.alpha, self.balance, self.beta)
        except ValueError as exc:
            raise BadInput(str(exc)) from exc
        for name in ("expert_hidden", "width", "channels", "d_model", "layers", "heads"):
            value = getattr(self, name)
            if value < 1:
                raise BadInput(f"{name} must be a whole number >= 1, got {value}")
        for name in ("router_hidden", "trunk"):
            value = getattr(self, name)
            if value < 0:
                raise BadInput(f"{name} must be a whole number >= 0, got {value}")
        for name in ("expert_hidden", "width", "channels", "d_model", "router_hidden", "trunk", "layers"):
            most = MAX_LAYERS if name == "layers" else MAX_WIDTH
            if getattr(self, name) > most:
                raise BadInput(f"{name} must be at most {most}, got {getattr(self, name)}")
        if self.model == "moe-transformer" and self.d_model % self.heads:
            raise BadInput(f"d_model={self.d_model} must be a multiple of heads={self.heads}")
        if self.dataset not in BUILTIN and not (self.dataset.endswith(".npz") or Path(self.dataset).exists()):
            raise BadInput(f"unknown data set {self.dataset!r}; use digits, blobs or a path to an .npz file")
        check_data_options(self.dataset, self.data_options)

    def loop(self) -> LoopSettings:
        """The settings of the training loop this config runs."""
        return LoopSettings(**{name: getattr(self, name) for name in LOOP_FIELDS})


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def config_from_dict(values: dict[str, Any], source: str = "options") -> TrainConfig:
    """A TrainConfig from a dict of its fields, every problem named with `source`.

    Args:
        values: TrainConfig fields (a recipe's keys, or options).
        source: what `values` came from ("recipe models/x.toml"); "options" leaves messages unprefixed.

    Returns:
        The checked TrainConfig.

    Raises:
        BadInput: an unknown key, or a value of the wrong type or range.
    """
    unknown = sorted(set(values) - FIELDS)
    if unknown:
        raise BadInput(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")
    try:
        return TrainConfig(**values)
    except BadInput as exc:
        if source == "options":
            raise
        raise BadInput(f"{source}: {exc}") from exc
    except TypeError as exc:
        raise BadInput(f"{source}: {exc}") from exc


#: keys a recipe may hold beside its [train] table (they describe it; they set nothing)
RECIPE_HEADER = ("name", "description")


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a recipe TOML (flat keys, or a [train] table) and apply `overrides` (flags) on top.

    Args:
        path: a .toml file, or the name of a built-in recipe (`digits-4`).
        overrides: TrainConfig fields applied on top (None values are ignored), as the CLI flags do.

    Returns:
        The checked TrainConfig.

    Raises:
        BadInput: a missing or invalid TOML file, a `train` that is not a table, keys outside the [train]
            table, an unknown key or a bad value (each named, with the file).
    """
    path = resolve_recipe(path)
    try:
        values = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"recipe {path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise BadInput(f"recipe {path} cannot be read: {exc.strerror or exc}") from exc
    source = f"recipe {path}"
    if "train" in values:
        if not isinstance(values["train"], dict):
            raise BadInput(f"{source}: train must be a [train] table of settings, got {values['train']!r}")
        stray = sorted(set(values) - {"train", *RECIPE_HEADER})
        if stray:
            raise BadInput(f"{source}: key(s) {', '.join(stray)} sit outside the [train] table and would be "
                           "ignored; move them under [train]")
        values = values["train"]
    values = dict(values)
    for key in RECIPE_HEADER:
        if key in values and not isinstance(values.pop(key), str):
            raise BadInput(f"{source}: {key} must be a string")
    config = config_from_dict(values, source)  # the recipe's own problems name the recipe
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    return config_from_dict({**config.to_dict(), **overrides}, "options") if overrides else config


def builtin_models_dir() -> Path:
    """models/ in a source checkout, or the copy shipped inside the wheel.

    Returns:
        The directory of the built-in recipes.
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / "_data" / "models", here.parent / "models"):
        if candidate.is_dir():
            return candidate
    return here.parent / "models"


def resolve_recipe(path: str | Path) -> Path:
    """A path, or the name of a built-in recipe (`digits-4` for models/digits-4.toml).

    Args:
        path: a .toml file or a built-in recipe's name.

    Returns:
        The recipe file.

    Raises:
        BadInput: a directory, or neither a file nor a built-in recipe.
    """
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"recipe {path} is a directory; give a .toml file")
    if path.is_file():
        return path
    builtin = builtin_models_dir() / f"{path.stem}.toml"
    if builtin.is_file() and path.parent == Path("."):
        return builtin
    raise BadInput(f"recipe {path} does not exist (built-in recipes: {', '.join(list_recipes()) or 'none'})")


def list_recipes() -> list[str]:
    """The names of the built-in recipes.

    Returns:
        Their names, sorted (`digits-4`, ...).
    """
    return sorted(p.stem for p in builtin_models_dir().glob("*.toml"))
