"""Make an already trained model commit: fine-tune a soft-routing model until its routers pick one expert.

A model trained with soft routing (no confidence penalty, temperature 1) blends its experts, so a hard top-1
select at inference loses accuracy. `commit` repairs it in two stages of the shared training loop:

1. routers only: the confidence penalty and the balance term, the temperature annealed to `temperature_end`;
   the routers learn to decide, but the experts were trained on blends, so accuracy drops;
2. the whole model at the final temperature: the experts adapt to receiving whole samples, which recovers
   the accuracy while the routers stay confident.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploytool.errors import BadInput

#: measured on digits (docs/routing.md): the stages' epochs and the losses' weights while committing
ROUTER_EPOCHS = 25
MODEL_EPOCHS = 15
ALPHA = 2.0   # a stronger penalty than training's: 40 epochs instead of 100 to become confident
BETA = 0.5    # a weaker balance than training's: the routers keep a partition the experts already serve


def commit(run_or_module: Any, *, out: str | Path, data: tuple[Any, Any] | None = None,
           test_data: tuple[Any, Any] | None = None, router_epochs: int = ROUTER_EPOCHS,
           model_epochs: int = MODEL_EPOCHS, penalty: str = "frank", alpha: float = ALPHA, balance: str = "entropy",
           beta: float = BETA, temperature_end: float = 0.02, router_lr: float = 1e-2, model_lr: float = 2e-3,
           batch_size: int = 64, seed: int = 0, progress: bool = True, force: bool = False):
    """Fine-tune a trained routed model so that its routers commit to one expert; write a new run directory.

    Args:
        run_or_module: a run directory of a built-in model, or your own nn.Module with deploytool Routers
            (then `data` is required).
        out: the new run directory; never the input run.
        data: (x, y) to fine-tune on; default: the run's own training data.
        test_data: (x, y) the metrics are measured on; default: the run's test data, else `data`.
        router_epochs: stage 1, routers only, temperature annealed from the routers' current value.
        model_epochs: stage 2, every parameter, at `temperature_end`.
        penalty: confidence penalty (frank | entropy | none) used while committing.
        alpha: its weight.
        balance: balance term (entropy | switch | none).
        beta: its weight.
        temperature_end: the final router temperature.
        router_lr: AdamW learning rate of stage 1 (cosine decay).
        model_lr: AdamW learning rate of stage 2 (cosine decay).
        batch_size: rows per step.
        seed: seeds torch and the shuffling.
        progress: draw progress bars on a terminal.
        force: replace a non-empty `out` (never the input run).

    Returns:
        The new RunDir; its metrics hold `before` (the input model's figures on the same test data).

    Raises:
        BadInput: `out` is the input run, a model without Routers, bad data or settings.
    """
    import torch

    from deploytool.metrics import routing_metrics
    from deploytool.nn import RoutingLoss, named_routers, routed_modules
    from deploytool.recipes import LoopSettings
    from deploytool.training import (as_xy, check_run_target, evaluate, module_config, training_loop,
                                     write_run)

    try:
        loss = RoutingLoss(penalty=penalty, alpha=alpha, balance=balance, beta=beta)
    except ValueError as exc:
        raise BadInput(str(exc)) from exc
    for name, value in (("router_epochs", router_epochs), ("model_epochs", model_epochs)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise BadInput(f"{name} must be a whole number >= 0, got {value!r}")
    if router_epochs + model_epochs < 1:
        raise BadInput("router_epochs + model_epochs must be >= 1: there is nothing to train")
    if isinstance(run_or_module, torch.nn.Module):
        model, source = run_or_module, None
        if data is None:
            raise BadInput(f"committing a {type(model).__name__} needs data=(x, y) to fine-tune on")
        x, y = as_xy(data, "data")
        x_test, y_test = as_xy(test_data, "test_data") if test_data is not None else (x, y)
    else:
        model, source, (x, y), (x_test, y_test) = _from_run(run_or_module, data, test_data)
    if source is not None and (Path(out).resolve() == source.path.resolve()
                               or source.path.resolve() in Path(out).resolve().parents):
        raise BadInput(f"the committed model goes to a new run directory, not over or inside its input run "
                       f"{source.path}")
    out = check_run_target(out, force)
    if not named_routers(model):
        raise BadInput(f"{type(model).__name__} has no deploytool.nn.Router: there is no routing to commit")

    before = routing_metrics(model, x_test.numpy(), y_test.numpy())
    for routed in routed_modules(model):
        routed.loss = loss
    start_t = float(named_routers(model)[0][1].temperature)
    stages = [LoopSettings(epochs=router_epochs or 1, lr=router_lr, batch_size=batch_size, seed=seed,
                           temperature=start_t, temperature_end=temperature_end),
              LoopSettings(epochs=model_epochs or 1, lr=model_lr, batch_size=batch_size, seed=seed + 1,
                           temperature=temperature_end, temperature_end=None)]
    router_params = {id(p) for _, r in named_routers(model) for p in r.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    seconds = 0.0
    try:
        if router_epochs:
            for p in trainable:
                p.requires_grad_(id(p) in router_params)
            seconds += training_loop(model, x, y, stages[0], params=[p for p in trainable if id(p) in router_params],
                                     progress=progress, label="commit: routers")
        for p in trainable:
            p.requires_grad_(True)
        if model_epochs:
            seconds += training_loop(model, x, y, stages[1], params=trainable, progress=progress,
                                     label="commit: whole model")
    finally:
        for p in trainable:
            p.requires_grad_(True)

    settings = {"router_epochs": router_epochs, "model_epochs": model_epochs, "router_lr": router_lr,
                "model_lr": model_lr, "batch_size": batch_size, "seed": seed, "temperature_start": start_t}
    metrics = evaluate(model, x_test.numpy(), y_test.numpy(), stages[1], seconds,
                       epochs=router_epochs + model_epochs, before=_summary(before))
    if source is None:
        config = module_config(model, stages[1], tuple(x.shape[1:]),
                               n_classes=int(max(y.max(), y_test.max())) + 1, commit=settings)
        config.update(penalty=penalty, alpha=alpha, balance=balance, beta=beta)
    else:
        metrics["dataset"] = source.metrics.get("dataset", source.config.get("dataset"))
        config = {**source.config, "penalty": penalty, "alpha": alpha, "balance": balance, "beta": beta,
                  "temperature": temperature_end, "committed_from": str(source.path), "commit": settings}
    return write_run(out, model, config, metrics, f"{config['model']} committed", force=force)


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in ("soft_accuracy", "hard_accuracy", "hard_soft_gap", "frac_confident",
                                    "min_expert_load")}


def _from_run(path: str | Path, data, test_data):
    """The model of a built-in run, and its data (the run's own split unless given)."""
    from deploytool.data import load_dataset
    from deploytool.models import input_shape
    from deploytool.artifacts import load_run
    from deploytool.checkpoints import load_model
    from deploytool.training import as_xy

    run = load_run(path)
    model = load_model(run.path)  # a run of your own module is refused here, with what to do instead
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
