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


def commit(run_or_module: Any, *, out: str | Path, data: Any = None, test_data: Any = None,
           router_epochs: int = ROUTER_EPOCHS, model_epochs: int = MODEL_EPOCHS, penalty: str = "frank",
           alpha: float | None = None, balance: str = "entropy", beta: float | None = None, guard: float | None = None,
           temperature_end: float | None = None, router_lr: float = 1e-2, model_lr: float | None = None,
           batch_size: int | None = None, seed: int = 0, lm: dict[str, Any] | None = None, progress: bool = True,
           force: bool = False):
    """Fine-tune a trained routed model so that its routers commit to one expert; write a new run directory.

    A language model (token `data`, a transformers save_pretrained folder, a run of one, or a module with
    top-k routers) goes to lm.commit_lm: top-k to top-1 (see there); the options left None take its defaults.

    Args:
        run_or_module: a run directory of a built-in model, or your own nn.Module with deploytool Routers
            (then `data` is required); or a language model (a from_hf model, a save_pretrained folder, an
            LM run directory).
        out: the new run directory; never the input run.
        data: (x, y) to fine-tune on; default: the run's own training data. For a language model: token
            data (.npz, .npy, .bin, a text file, a tokens.TokenStream).
        test_data: (x, y) the metrics are measured on; default: the run's test data, else `data`; for a
            language model held-out token data (default: the last 10% of `data`).
        router_epochs: stage 1, routers only, temperature annealed from the routers' current value to
            `temperature_end` (0 by default: measured worse than annealing the whole model).
        model_epochs: stage 2, every parameter, temperature annealed from where the routers stand (their
            trained value, or `temperature_end` after stage 1) to `temperature_end`.
        penalty: confidence penalty (frank | entropy | none) used while committing.
        alpha: its weight (None: ALPHA, or lm.COMMIT_ALPHA for a language model).
        balance: balance term (entropy | switch | none).
        beta: its weight (None: BETA, or lm.COMMIT_BETA).
        guard: weight of the load guard (None: GUARD, or lm.COMMIT_GUARD), KL(loads before || batch loads)
            per router, the loads before being each router's mean soft routing probabilities on `data`; it
            keeps every expert that carried traffic from dying. 0 turns it off.
        temperature_end: the final router temperature (None: 0.02, or lm.COMMIT_TEMPERATURE_END).
        router_lr: AdamW learning rate of stage 1 (cosine decay).
        model_lr: AdamW learning rate of stage 2, cosine decay (None: MODEL_LR, or lm.COMMIT_LR).
        batch_size: rows per step (None: 64; a language model: 16 windows).
        seed: seeds torch and the shuffling.
        lm: more options of lm.commit_lm for a language model (seq_len, steps or tokens, distill,
            checkpoint_every, resume, eval_tokens, ...).
        progress: draw progress bars on a terminal.
        force: replace a non-empty `out` (never the input run).

    Returns:
        The new RunDir; its metrics hold `before` (the input model's figures on the same test data) and
        `load_targets` (the loads the guard kept, per router).

    Raises:
        BadInput: `out` is the input run, a model without Routers, bad data or settings.
    """
    import math

    import torch

    if _is_language_model(run_or_module, data):
        from deploytool.lm import commit_lm

        given = {"alpha": alpha, "beta": beta, "guard": guard, "temperature_end": temperature_end, "lr": model_lr,
                 "batch_size": batch_size}
        if data is None:
            raise BadInput("committing a language model needs token data (data=, --data): .npz, .npy, .bin or text")
        return commit_lm(run_or_module, data, out=out, test_data=test_data, penalty=penalty, balance=balance,
                         seed=seed, progress=progress, force=force,
                         **{k: v for k, v in given.items() if v is not None}, **(lm or {}))
    if lm:
        raise BadInput(f"language-model options ({', '.join(sorted(lm))}) apply to a language model with token data")
    alpha = ALPHA if alpha is None else alpha
    beta = BETA if beta is None else beta
    guard = GUARD if guard is None else guard
    temperature_end = 0.02 if temperature_end is None else temperature_end
    model_lr = MODEL_LR if model_lr is None else model_lr
    batch_size = 64 if batch_size is None else batch_size

    from deploytool.metrics import routing_metrics
    from deploytool.nn import RoutingLoss, named_routers, routed_modules
    from deploytool.recipes import LoopSettings
    from deploytool.training import (GuardedLoss, as_xy, check_run_target, evaluate, module_config,
                                     training_loop, write_run)

    try:
        loss = RoutingLoss(penalty=penalty, alpha=alpha, balance=balance, beta=beta)
    except ValueError as exc:
        raise BadInput(str(exc)) from exc
    if isinstance(guard, bool) or not isinstance(guard, (int, float)) or not math.isfinite(guard) or guard < 0:
        raise BadInput(f"guard (the load guard's weight) must be a finite number >= 0, got {guard!r}")
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
    targets = soft_loads(model, x)
    paths = {id(router): path for path, router in named_routers(model)}
    for routed in routed_modules(model):
        target = targets.get(paths[id(routed.router)])
        routed.loss = loss if not guard or target is None else GuardedLoss(loss, target, float(guard))
    start_t = float(named_routers(model)[0][1].temperature)
    stages = [LoopSettings(epochs=router_epochs or 1, lr=router_lr, batch_size=batch_size, seed=seed,
                           temperature=start_t, temperature_end=temperature_end),
              LoopSettings(epochs=model_epochs or 1, lr=model_lr, batch_size=batch_size, seed=seed + 1,
                           temperature=temperature_end if router_epochs else start_t,
                           temperature_end=temperature_end)]
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
        for routed in routed_modules(model):  # the guard's targets belong to this commit, not to the model
            routed.loss = loss

    settings = {"router_epochs": router_epochs, "model_epochs": model_epochs, "router_lr": router_lr,
                "model_lr": model_lr, "batch_size": batch_size, "seed": seed, "temperature_start": start_t,
                "guard": guard}
    metrics = evaluate(model, x_test.numpy(), y_test.numpy(), stages[1], seconds,
                       epochs=router_epochs + model_epochs, before=_summary(before),
                       load_targets={path: target.tolist() for path, target in targets.items()})
    if source is None:
        config = module_config(model, stages[1], tuple(x.shape[1:]),
                               n_classes=int(max(y.max(), y_test.max())) + 1, commit=settings)
        config.update(penalty=penalty, alpha=alpha, balance=balance, beta=beta)
    else:
        metrics["dataset"] = source.metrics.get("dataset", source.config.get("dataset"))
        config = {**source.config, "penalty": penalty, "alpha": alpha, "balance": balance, "beta": beta,
                  "temperature": temperature_end, "committed_from": str(source.path), "commit": settings}
    return write_run(out, model, config, metrics, f"{config['model']} committed", force=force)


def _is_language_model(target: Any, data: Any) -> bool:
    """Token data, a save_pretrained folder, a run of a transformers model, or a module with top-k routers."""
    from deploytool.artifacts import is_hf_folder, is_hf_run
    from deploytool.tokens import is_token_source

    if is_token_source(data):
        return True
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
