"""Make an already trained model commit: fine-tune a soft-routing model until its routers pick one expert.

A model trained with soft routing (no confidence penalty, temperature 1) blends its experts, so a hard top-1
select at inference loses accuracy. `commit` repairs it with the shared training loop:

1. (optional, off by default) routers only, the temperature annealed to `temperature_end`;
2. the whole model, the temperature annealed from where the routers stand to `temperature_end`: the routers
   learn to decide while the experts learn to serve whole samples instead of blends.

Both stages add the confidence penalty, the batch-entropy balance and the **load guard**
(losses.load_guard): KL from the loads the routers had before committing (their mean soft routing
probabilities on the fine-tuning data) to each batch's loads. It grows without bound as an expert that
carried traffic loses it, so no such expert dies; an expert that carried none is left alone.
Measured on digits (docs/routing.md, benchmarks/commit_study.py): routers first, then the whole model at the
final temperature (the former recipe) reached 0.958-0.972 with one expert at 0 load on one seed of three;
annealing the whole model with the guard stays within 1 point of the soft accuracy on every seed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deploytool.errors import BadInput

#: measured on digits (docs/routing.md): the stages' epochs, the learning rate and the losses' weights
ROUTER_EPOCHS = 0   # a routers-only stage first: measured worse (the experts never see the anneal)
MODEL_EPOCHS = 40
MODEL_LR = 5e-3
ALPHA = 3.0   # a stronger penalty than training's: 40 epochs instead of 100 to become confident
BETA = 0.5    # a weaker balance than training's: the routers keep a partition the experts already serve
GUARD = 1.0   # the load guard's weight; 0 turns it off (then the anneal collapses the routing onto 1-2 experts)
#: rows per forward when measuring the loads the guard keeps
_LOAD_BATCH = 1024


@dataclass(frozen=True)
class CommitSettings:
    """How `commit` fine-tunes a built-in run or your own module; each value checked when it is made.

    The defaults are the ones measured on digits (docs/routing.md); `default_loss()` gives the routing
    loss they go with.

    Args:
        router_epochs: stage 1, routers only, temperature annealed from the routers' current value to
            `temperature_end` (0 by default: measured worse than annealing the whole model).
        model_epochs: stage 2, every parameter, temperature annealed from where the routers stand (their
            trained value, or `temperature_end` after stage 1) to `temperature_end`.
        guard: weight of the load guard, KL(loads before || batch loads) per router, the loads before
            being each router's mean soft routing probabilities on the data; it keeps every expert that
            carried traffic from dying. 0 turns it off.
        temperature_end: the final router temperature.
        router_lr: AdamW learning rate of stage 1 (cosine decay).
        model_lr: AdamW learning rate of stage 2 (cosine decay).
        batch_size: rows per step.
        seed: seeds torch and the shuffling.

    Raises:
        BadInput: a value of the wrong type or out of range, or no epoch at all, named.
    """

    router_epochs: int = ROUTER_EPOCHS
    model_epochs: int = MODEL_EPOCHS
    guard: float = GUARD
    temperature_end: float = 0.02
    router_lr: float = 1e-2
    model_lr: float = MODEL_LR
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self):
        from deploytool.lm import check_guard

        check_guard(self.guard)
        for name in ("router_epochs", "model_epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise BadInput(f"{name} must be a whole number >= 0, got {value!r}")
        if self.router_epochs + self.model_epochs < 1:
            raise BadInput("router_epochs + model_epochs must be >= 1: there is nothing to train")
        for name in ("router_lr", "model_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise BadInput(f"{name} must be a finite number > 0, got {value!r}")
        self.stages(1.0)  # batch_size, seed, temperature_end and the epochs' bounds, as the loop checks them

    def stages(self, temperature: float) -> list[Any]:
        """The two stages' recipes.LoopSettings, from the routers' temperature `temperature`."""
        from deploytool.recipes import LoopSettings

        return [LoopSettings(epochs=self.router_epochs or 1, lr=self.router_lr, batch_size=self.batch_size,
                             seed=self.seed, temperature=temperature, temperature_end=self.temperature_end),
                LoopSettings(epochs=self.model_epochs or 1, lr=self.model_lr, batch_size=self.batch_size,
                             seed=self.seed + 1, temperature=self.temperature_end if self.router_epochs else temperature,
                             temperature_end=self.temperature_end)]

    def to_dict(self) -> dict[str, Any]:
        """The settings as fields."""
        return asdict(self)

    @staticmethod
    def default_loss(**changes: Any) -> Any:
        """The routing loss a built-in commit uses by default (frank penalty ALPHA, entropy balance BETA),
        with `changes` (penalty, alpha, balance, beta) on top.

        Returns:
            The nn.RoutingLoss.

        Raises:
            BadInput: a bad change, named.
        """
        from deploytool.lm import routing_loss

        return routing_loss(**{"penalty": "frank", "alpha": ALPHA, "balance": "entropy", "beta": BETA, **changes})


def commit(target: Any, *, out: str | Path, data: Any = None, test_data: Any = None,
           settings: Any = None, loss: Any = None, progress: bool = True, force: bool = False):
    """Fine-tune a trained routed model so that its routers commit to one expert; write a new run directory.

    A language model (token `data`, a transformers save_pretrained folder, a run of one, or a module with
    top-k routers) goes to lm.commit_lm: top-k to top-1 (see there), with lm.LMCommitSettings.

    Args:
        target: a run directory of a built-in model, or your own nn.Module with deploytool Routers
            (then `data` is required); or a language model (a from_hf model, a save_pretrained folder, an
            LM run directory).
        out: the new run directory; never the input run.
        data: (x, y) to fine-tune on; default: the run's own training data. For a language model: token
            data (.npz, .npy, .bin, a text file, a tokens.TokenStream).
        test_data: (x, y) the metrics are measured on; default: the run's test data, else `data`; for a
            language model held-out token data (default: the last 10% of `data`).
        settings: a CommitSettings (a built-in run or your module), an lm.LMCommitSettings (a language
            model), or None for the kind's measured defaults.
        loss: the routing loss (nn.RoutingLoss) while committing; None: the kind's `default_loss()`.
        progress: draw progress bars on a terminal.
        force: replace a non-empty `out` (never the input run).

    Returns:
        The new RunDir; its metrics hold `before` (the input model's figures on the same test data) and
        `load_targets` (the loads the guard kept, per router).

    Raises:
        BadInput: `out` is the input run, a model without Routers, bad data, or settings of the other kind.
    """
    from deploytool.lm import LMCommitSettings, _check_loss

    _check_loss(loss)
    target = _read(target)
    if _is_language_model(target, data):
        from deploytool.lm import commit_lm

        if data is None:
            raise BadInput("committing a language model needs token data (data=, --data): .npz, .npy, .bin or text")
        if settings is not None and not isinstance(settings, LMCommitSettings):
            raise BadInput(f"a language model commits with settings=LMCommitSettings(...), got {type(settings).__name__}")
        return commit_lm(target, data, out=out, settings=settings, loss=loss, test_data=test_data,
                         progress=progress, force=force)
    if isinstance(settings, LMCommitSettings):
        given = settings.lm_only()
        raise BadInput(f"language-model options ({', '.join(given) or 'LMCommitSettings'}) apply to a language "
                       "model with token data")
    settings = CommitSettings() if settings is None else settings
    if not isinstance(settings, CommitSettings):
        raise BadInput(f"settings must be a CommitSettings (or None), got {type(settings).__name__}")
    loss = CommitSettings.default_loss() if loss is None else loss
    model, source, (x, y), (x_test, y_test), out = _inputs(target, data, test_data, out=out, force=force)
    before, targets = _before(model, x, x_test, y_test)
    stages, seconds = _train_stages(model, x, y, settings, loss, targets, progress=progress)
    metrics = _evaluate(model, x_test, y_test, settings, stages[1], seconds, before, targets)
    return _write_committed(out, model, source, settings, loss, stages, metrics, x, y, y_test, force=force)


def _inputs(target: Any, data: Any, test_data: Any, *, out: str | Path, force: bool):
    """The model, its source run (None for a module) and the training and test data, checked; `out` checked."""
    import torch

    from deploytool.nn import named_routers
    from deploytool.training import as_xy, check_run_target

    if isinstance(target, torch.nn.Module):
        model, source = target, None
        if data is None:
            raise BadInput(f"committing a {type(model).__name__} needs data=(x, y) to fine-tune on")
        x, y = as_xy(data, "data")
        x_test, y_test = as_xy(test_data, "test_data") if test_data is not None else (x, y)
    else:
        model, source, (x, y), (x_test, y_test) = _from_run(target, data, test_data)
    if source is not None and (Path(out).resolve() == source.path.resolve()
                               or source.path.resolve() in Path(out).resolve().parents):
        raise BadInput(f"the committed model goes to a new run directory, not over or inside its input run "
                       f"{source.path}")
    out = check_run_target(out, force)
    if not named_routers(model):
        raise BadInput(f"{type(model).__name__} has no deploytool.nn.Router: there is no routing to commit")
    return model, source, (x, y), (x_test, y_test), out


def _before(model: Any, x: Any, x_test: Any, y_test: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's metrics before committing, and each router's soft loads on `x` (what the guard keeps)."""
    from deploytool.metrics import routing_metrics

    return routing_metrics(model, x_test.numpy(), y_test.numpy()), soft_loads(model, x)


def _train_stages(model: Any, x: Any, y: Any, settings: CommitSettings, loss: Any, targets: dict[str, Any], *,
                  progress: bool) -> tuple[list[Any], float]:
    """Stage 1 (routers only, when router_epochs) then stage 2 (the whole model), under the load guard.

    Returns:
        (the stages' LoopSettings, the seconds spent).
    """
    import torch

    from deploytool.nn import named_routers, routed_modules
    from deploytool.training import GuardedLoss, training_loop

    guard = settings.guard
    paths = {id(router): path for path, router in named_routers(model)}
    for routed in routed_modules(model):
        target = targets.get(paths[id(routed.router)])
        routed.loss = loss if not guard or target is None else GuardedLoss(loss, target, float(guard))
    stages = settings.stages(float(named_routers(model)[0][1].temperature))
    router_params = {id(p) for _, r in named_routers(model) for p in r.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(settings.seed)
    seconds = 0.0
    try:
        if settings.router_epochs:
            for p in trainable:
                p.requires_grad_(id(p) in router_params)
            seconds += training_loop(model, x, y, stages[0], params=[p for p in trainable if id(p) in router_params],
                                     progress=progress, label="commit: routers")
        for p in trainable:
            p.requires_grad_(True)
        if settings.model_epochs:
            seconds += training_loop(model, x, y, stages[1], params=trainable, progress=progress,
                                     label="commit: whole model")
    finally:
        for p in trainable:
            p.requires_grad_(True)
        for routed in routed_modules(model):  # the guard's targets belong to this commit, not to the model
            routed.loss = loss
    return stages, seconds


def _evaluate(model: Any, x_test: Any, y_test: Any, settings: CommitSettings, last: Any, seconds: float,
              before: dict[str, Any], targets: dict[str, Any]) -> dict[str, Any]:
    """metrics.json of the committed model: its figures, `before`'s and the loads the guard kept."""
    from deploytool.training import evaluate

    return evaluate(model, x_test.numpy(), y_test.numpy(), last, seconds,
                    epochs=settings.router_epochs + settings.model_epochs, before=_summary(before),
                    load_targets={path: target.tolist() for path, target in targets.items()})


def _write_committed(out: Path, model: Any, source: Any, settings: CommitSettings, loss: Any, stages: list[Any],
                     metrics: dict[str, Any], x: Any, y: Any, y_test: Any, *, force: bool):
    """config.json of the committed run (its source run's, or a module run's) and the run written."""
    from deploytool.training import module_config, write_run

    recorded = {"router_epochs": settings.router_epochs, "model_epochs": settings.model_epochs,
                "router_lr": settings.router_lr, "model_lr": settings.model_lr, "batch_size": settings.batch_size,
                "seed": settings.seed, "temperature_start": stages[0].temperature, "guard": settings.guard}
    losses = {"penalty": loss.penalty, "alpha": loss.alpha, "balance": loss.balance, "beta": loss.beta}
    if source is None:
        config = module_config(model, stages[1], tuple(x.shape[1:]),
                               n_classes=int(max(y.max(), y_test.max())) + 1, commit=recorded)
        config.update(losses)
    else:
        metrics["dataset"] = source.metrics.get("dataset", source.config.get("dataset"))
        config = {**source.config, **losses, "temperature": settings.temperature_end,
                  "committed_from": str(source.path), "commit": recorded}
    return write_run(out, model, config, metrics, f"{config['model']} committed", force=force)


def _read(target: Any) -> Any:
    """A path's run directory or Hugging Face folder, its config.json read once (artifacts.RunDir or
    HFFolder); the path itself when it cannot be read (whoever reads it then says why); a module as is."""
    from deploytool.artifacts import run_or_hf_folder

    if not isinstance(target, (str, Path)):
        return target
    try:
        return run_or_hf_folder(target)
    except BadInput:
        return target


def _is_language_model(target: Any, data: Any) -> bool:
    """Token data, a save_pretrained folder, a run of a transformers model, or a module with top-k routers."""
    from deploytool.artifacts import HFFolder, RunDir, is_hf_folder, is_hf_run
    from deploytool.tokens import is_token_source

    if is_token_source(data):
        return True
    if isinstance(target, HFFolder):
        return True
    if isinstance(target, RunDir):
        return is_hf_run(target.config)
    if isinstance(target, (str, Path)):
        from deploytool import io

        if is_hf_folder(target):
            return True
        config_path = Path(target) / io.CONFIG_FILE
        try:
            return config_path.is_file() and is_hf_run(io.read_json(config_path, "run config"))
        except BadInput:
            return False
    from deploytool.nn import named_routers

    return any(hasattr(r, "rule") for _, r in named_routers(target))


def soft_loads(model: Any, x: Any) -> dict[str, Any]:
    """Each router's load under soft routing: its mean routing probabilities over every decision on `x`.

    What the load guard keeps while committing: a blending model's traffic is its routing weights, not
    its top-1 choices (which may starve an expert the blend relies on).

    Args:
        model: a module with deploytool Routers, at its current temperatures.
        x: inputs [N, ...] in the model's input shape (a tensor).

    Returns:
        {router path: float64 tensor [n_experts] summing to 1}, for the routers that made decisions.
    """
    from deploytool.nn import mean_routing_probs, routing_mode

    with routing_mode(model, "soft"):
        return mean_routing_probs(model, (lambda i=i: model(x[i:i + _LOAD_BATCH]) for i in range(0, len(x), _LOAD_BATCH)))


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in ("soft_accuracy", "hard_accuracy", "hard_soft_gap", "frac_confident",
                                    "min_expert_load")}


def _from_run(path: str | Path, data, test_data):
    """The model of a built-in run, and its data (the run's own split unless given)."""
    from deploytool.data import load_dataset
    from deploytool.models import input_shape
    from deploytool.artifacts import RunDir, load_run
    from deploytool.checkpoints import load_model
    from deploytool.training import as_xy

    run = path if isinstance(path, RunDir) else load_run(path)
    model = load_model(run)  # a run of your own module is refused here, with what to do instead
    shape = input_shape(run.config)
    if data is None or test_data is None:
        own = load_dataset(run.config.get("dataset", "digits"), run.config.get("seed", 0),
                           **run.config.get("data_options", {}))
        data = data if data is not None else (own.x_train, own.y_train)
        test_data = test_data if test_data is not None else (own.x_test, own.y_test)
    x, y = as_xy(data, "data")
    x_test, y_test = as_xy(test_data, "test_data")
    try:
        x, x_test = x.reshape(-1, *shape), x_test.reshape(-1, *shape)
    except RuntimeError as exc:
        raise BadInput(f"data does not fit the run's input shape {list(shape)}: {exc}") from exc
    if len(x) != len(y) or len(x_test) != len(y_test):
        raise BadInput(f"data samples do not have the run's input shape {list(shape)}")
    return model, run, (x, y), (x_test, y_test)
