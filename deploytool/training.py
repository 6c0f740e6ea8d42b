"""The training loop: TrainConfig -> a run directory that everything downstream rebuilds from.

A run dir holds config.json (architecture + recipe), model.safetensors, metrics.json, routing.png.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploytool import io
from deploytool.artifacts import MODULE_PREFIX, RunDir
from deploytool.data import MAX_CLASSES  # fit's labels obey the bound data sets do
from deploytool.errors import BadInput
from deploytool.recipes import LoopSettings, TrainConfig


@dataclass(frozen=True)
class GuardedLoss:
    """A RoutedExperts' routing loss plus `weight` * load_guard(routing, `target`), while committing."""

    base: Any      # nn.RoutingLoss
    target: Any    # torch.Tensor [n_experts]: the loads to keep
    weight: float

    def __call__(self, routing: Any, temperature: float) -> Any:
        from deploytool.losses import load_guard

        return self.base(routing, temperature) + self.weight * load_guard(routing.probs, self.target)


def temperature_at(config: LoopSettings | TrainConfig, step: int, total: int) -> float:
    """Geometric annealing from temperature to temperature_end over the run.

    Args:
        config: the loop's settings (temperature, temperature_end).
        step: the optimizer step, from 0.
        total: the run's number of steps.

    Returns:
        The router temperature at `step`.
    """
    if config.temperature_end is None or total <= 1:
        return config.temperature
    frac = min(step / (total - 1), 1.0)
    return float(config.temperature * (config.temperature_end / config.temperature) ** frac)


def final_temperature(config: LoopSettings | TrainConfig) -> float:
    """The router temperature a run ends at (and inference uses).

    Args:
        config: the loop's settings.

    Returns:
        temperature_end, or temperature when it is constant.
    """
    return config.temperature_end if config.temperature_end is not None else config.temperature


def model_config(config: TrainConfig, n_features: int, n_classes: int) -> dict[str, Any]:
    """What config.json stores: the recipe plus the architecture arguments build_model needs.

    Args:
        config: the checked TrainConfig.
        n_features: the data set's features per row.
        n_classes: its number of classes.

    Returns:
        config.json's dict.
    """
    from deploytool import __version__

    final_t = final_temperature(config)
    return {**config.to_dict(), "in_features": n_features, "n_classes": n_classes, "n_experts": config.experts,
            "temperature": final_t, "temperature_start": config.temperature, "deploytool_version": __version__}


def default_out_dir() -> Path:
    """The run directory of a `train` given no `out`.

    Returns:
        runs/train-<date>-<time>.
    """
    return Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")


def train(config: TrainConfig | str | Path | None = None, out: str | Path | None = None, *, progress: bool = True,
          force: bool = False, **overrides: Any) -> RunDir:
    """Train a built-in model with the routing losses and write the run directory `out`.

    The run dir appears only when complete; an existing non-empty `out` stays intact until the new run
    is whole.

    Args:
        config: a TrainConfig, a recipe (path or built-in name) or None for the defaults.
        out: the run directory to write (default: runs/train-<time>).
        progress: draw a progress bar on a terminal.
        force: replace `out` if it is another run directory (never a directory that is not a run's).
        **overrides: TrainConfig fields (e.g. experts=8, penalty="entropy") applied on top, as the CLI
            flags do; None values are ignored.

    Returns:
        The RunDir (path, config, metrics).

    Raises:
        BadInput: a bad config value, data set or output directory, a model too large for this machine's
            memory, or another process that wrote `out` meanwhile (without `force`); all but the last
            before any training.
    """
    import torch

    from deploytool.data import load_dataset
    from deploytool.models import build_model, input_shape

    from deploytool.models import check_memory

    config = resolve_config(config, overrides)
    out = check_run_target(default_out_dir() if out is None else out, force)
    data = load_dataset(config.dataset, config.seed, **config.data_options)
    if data.n_classes < 2:
        raise BadInput(f"data set {config.dataset} has a single class; nothing to learn")
    torch.manual_seed(config.seed)
    arch = model_config(config, data.n_features, data.n_classes)
    check_memory(arch, training=True)  # before anything is allocated
    model = build_model({**arch, "temperature": config.temperature})
    shape = input_shape(arch)
    seconds = training_loop(model, torch.from_numpy(data.x_train).reshape(-1, *shape),
                            torch.from_numpy(data.y_train), config.loop(), progress=progress)
    metrics = evaluate(model, data.x_test.reshape(-1, *shape), data.y_test, config.loop(), seconds,
                       dataset=data.name)
    return write_run(out, model, arch, metrics, f"{config.model} on {data.name}, {config.experts} experts, "
                     f"penalty {config.penalty}", force=force)


def fit(model: Any, train_data: tuple[Any, Any], *, out: str | Path, loop: LoopSettings,
        test_data: tuple[Any, Any] | None = None, loss_fn: Callable[[Any, Any], Any] | None = None,
        progress: bool = True, force: bool = False) -> RunDir:
    """Train your own module that contains deploytool Routers with the loop the built-in models use.

    Every Router's temperature anneals geometrically from `loop.temperature` to `loop.temperature_end`;
    the loss is `loss_fn(output, labels)` on the first tensor forward returns (cross-entropy by default)
    plus the routing losses (penalty, balance) each RoutedExperts records. Trains `model` in place, then
    writes the run directory `out` (model.safetensors, config.json with "model": "module:<ClassName>", the
    training settings and "input_shape", metrics.json, routing.png), which appears only when complete.
    `load_model` cannot rebuild your class: build it yourself and call `load_weights_into(module, out)`.

    Args:
        model: a torch nn.Module with at least one deploytool.nn.Router; forward takes x and returns the
            class logits first (alone, or first in a tuple/dict).
        train_data: (x, y): x a float array or tensor of any shape, batch first; y integer class labels [N].
        out: the run directory to write.
        loop: the loop's settings (recipes.LoopSettings: epochs, lr, lr_schedule, weight_decay, batch_size,
            seed, temperature, temperature_end, routing), checked when made.
        test_data: (x, y) the metrics are measured on (default: train_data, and metrics say so).
        loss_fn: replaces cross-entropy: `loss_fn(output, labels) -> scalar tensor`.
        progress: draw a progress bar on a terminal.
        force: replace `out` if it is another run directory (never a directory that is not a run's).

    Returns:
        The RunDir (path, config, metrics); `model` is left trained, in eval mode.

    Raises:
        BadInput: a model without a Router, malformed data, settings that are no LoopSettings, or a bad
            output directory.
    """
    import torch

    from deploytool.nn import named_routers

    if not isinstance(model, torch.nn.Module):
        raise BadInput(f"fit trains a torch nn.Module, got {type(model).__name__}")
    if not named_routers(model):
        raise BadInput(f"{type(model).__name__} has no deploytool router: there is no routing to train (a "
                       "transformers MoE model converts with deploytool.from_hf)")
    if not isinstance(loop, LoopSettings):
        raise BadInput(f"loop must be a LoopSettings (epochs, lr, ...), got {type(loop).__name__}")
    out = check_run_target(out, force)
    x, y = as_xy(train_data, "train_data")
    x_test, y_test = as_xy(test_data, "test_data") if test_data is not None else (x, y)
    if x_test.shape[1:] != x.shape[1:]:
        raise BadInput(f"test_data samples have shape {list(x_test.shape[1:])}, train_data's {list(x.shape[1:])}")
    torch.manual_seed(loop.seed)
    seconds = training_loop(model, x, y, loop, loss_fn=loss_fn, progress=progress)
    metrics = evaluate(model, x_test.numpy(), y_test.numpy(), loop, seconds,
                       evaluated_on="test_data" if test_data is not None else "train_data")
    config = module_config(model, loop, tuple(x.shape[1:]), n_classes=int(max(y.max(), y_test.max())) + 1)
    return write_run(out, model, config, metrics, f"{config['model']}", force=force)


def as_xy(data: Any, what: str) -> tuple[Any, Any]:
    """(x, y) arrays or tensors -> (x tensor [N, ...], int64 tensor [N]), checked: float x as float32,
    integer x (token ids for an embedding) as int64.

    Args:
        data: the pair (x, y).
        what: its name in messages (train_data).

    Returns:
        (x as a contiguous float32 or int64 tensor, y as int64).

    Raises:
        BadInput: not a pair, wrong ranks, lengths that differ, labels that are not integers >= 0, or x
            that is not finite in float32.
    """
    import numpy as np
    import torch

    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise BadInput(f"{what} must be a pair (x, y), got {type(data).__name__}")
    try:
        x, y = (v.detach().cpu() if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v)) for v in data)
    except (TypeError, ValueError, OverflowError) as exc:  # object arrays, ragged lists, huge ints
        raise BadInput(f"{what}: x and y must be numeric arrays or tensors ({str(exc)[:120]})") from exc
    if x.dim() < 2 or y.dim() != 1:
        raise BadInput(f"{what}: x must be batch first with at least 2 dims and y 1-D labels, got "
                       f"x{list(x.shape)} y{list(y.shape)}")
    if len(x) != len(y) or len(x) == 0:
        raise BadInput(f"{what}: x has {len(x)} samples but y has {len(y)} labels")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.dtype.is_complex or int(y.min()) < 0:
        raise BadInput(f"{what}: y must be integer class labels >= 0, got {y.dtype}")
    if int(y.max()) >= MAX_CLASSES:
        raise BadInput(f"{what}: y must be class labels 0..K-1 with K <= {MAX_CLASSES}, got a label {int(y.max())}")
    if x.dtype.is_complex or x.dtype == torch.bool:
        raise BadInput(f"{what}: x must be real numbers, got {x.dtype}")
    x = x.to(torch.float32 if x.dtype.is_floating_point else torch.int64)
    if x.dtype.is_floating_point and not torch.isfinite(x).all():
        raise BadInput(f"{what}: x contains NaN or inf")
    return x.contiguous(), y.to(torch.int64)


def training_loop(model: Any, x: Any, y: Any, settings: LoopSettings, *,
                  loss_fn: Callable[[Any, Any], Any] | None = None, params: Iterable[Any] | None = None,
                  progress: bool = True, label: str = "training") -> float:
    """THE loop: AdamW on `params` (default: all), every Router annealed, loss on the primary output plus
    the routing losses. Leaves every Router at the final temperature and `model` in eval mode.

    Args:
        model: a module with deploytool Routers.
        x: float tensor [N, ...] in the model's input shape.
        y: int64 labels [N] (or whatever `loss_fn` reads).
        settings: epochs, lr, schedule, batch size, seed (of the shuffling), temperatures, routing.
        loss_fn: `loss_fn(output, labels)`; cross-entropy when None.
        params: the parameters to train (e.g. only the routers').
        progress: draw a progress bar on a terminal.
        label: the progress bar's label.

    Returns:
        Seconds spent.
    """
    import torch

    from deploytool.model_io import primary_output
    from deploytool.nn import collect_routing_loss, routing_mode, set_temperature
    from deploytool.progress import progress_bar

    loss_fn = loss_fn or torch.nn.functional.cross_entropy
    opt = torch.optim.AdamW(list(model.parameters() if params is None else params), lr=settings.lr,
                            weight_decay=settings.weight_decay)
    gen = torch.Generator().manual_seed(settings.seed)
    steps_per_epoch = max(1, -(-len(x) // settings.batch_size))
    total = settings.epochs * steps_per_epoch
    schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, total) if settings.lr_schedule == "cosine"
                else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    step = 0
    start = time.perf_counter()
    with single_thread(), progress_bar(label, settings.epochs, progress) as advance:
        for _ in range(settings.epochs):
            model.train()
            perm = torch.randperm(len(x), generator=gen)
            epoch_loss = 0.0
            with routing_mode(model, settings.routing):
                for i in range(0, len(x), settings.batch_size):
                    idx = perm[i:i + settings.batch_size]
                    set_temperature(model, temperature_at(settings, step, total))
                    loss = loss_fn(primary_output(model(x[idx])), y[idx]) + collect_routing_loss(model)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    schedule.step()
                    epoch_loss += loss.item() / steps_per_epoch
                    step += 1
            advance(status=f"loss {epoch_loss:.4f}")
    set_temperature(model, final_temperature(settings))
    model.eval()
    return time.perf_counter() - start


def evaluate(model: Any, x: Any, y: Any, settings: LoopSettings, seconds: float, **extra: Any) -> dict[str, Any]:
    """routing_metrics on (x, y) plus what the run was: seed, epochs, seconds, final temperature (`extra` wins).

    Args:
        model: the trained module.
        x: inputs in the model's shape.
        y: labels.
        settings: the loop's settings.
        seconds: the training time.
        **extra: more entries for metrics.json.

    Returns:
        metrics.json's dict.
    """
    from deploytool.metrics import routing_metrics

    metrics = routing_metrics(model, x, y)
    metrics.update({"seed": settings.seed, "epochs": settings.epochs, "train_seconds": round(seconds, 3),
                    "temperature": final_temperature(settings), **extra})
    return metrics


def module_config(model: Any, settings: LoopSettings, shape: tuple[int, ...], **extra: Any) -> dict[str, Any]:
    """config.json of a run trained from a user's module: its class name, the settings, its input shape.

    Args:
        model: the user's module.
        settings: the loop's settings.
        shape: one sample's shape.
        **extra: more entries (n_classes, commit).

    Returns:
        config.json's dict.
    """
    from deploytool import __version__
    from deploytool.nn import named_routers

    return {"model": f"{MODULE_PREFIX}{type(model).__name__}", **settings.to_dict(), "input_shape": list(shape),
            "temperature": final_temperature(settings), "temperature_start": settings.temperature,
            "routers": {path: router.n_experts for path, router in named_routers(model)},
            "deploytool_version": __version__, **extra}


def write_run(out: Path, model: Any, config: dict[str, Any], metrics: dict[str, Any], title: str, *,
              force: bool) -> RunDir:
    """Write a run directory atomically: weights, config.json, metrics.json and the routing plot.

    Args:
        out: the run directory (checked by check_run_target before training).
        model: the trained module.
        config: config.json.
        metrics: metrics.json.
        title: the routing plot's title.
        force: replace a run that another process wrote at `out` while this one trained; without it that
            run is kept and this one refused.

    Returns:
        The RunDir.

    Raises:
        BadInput: `out` was written meanwhile (without `force`).
    """
    from deploytool.metrics import plot_routing

    with io.atomic_dir(out, replace=force) as tmp:
        io.save_weights(tmp / io.WEIGHTS_FILE, model.state_dict(), metadata={"model": str(config["model"])})
        io.write_json(tmp / io.CONFIG_FILE, config)
        plot_routing(metrics, tmp / io.ROUTING_PLOT, title=f"{title}: hard acc {metrics['hard_accuracy']:.3f}, "
                     f"soft {metrics['soft_accuracy']:.3f}")
        io.write_json(tmp / io.METRICS_FILE, metrics)
    return RunDir(out, config, metrics)


def check_run_target(out: str | Path, force: bool) -> Path:
    """A run dir may go where nothing is, in an empty directory, or over another run with `force`.

    Checked before training, so that minutes of work are not lost to an output that cannot be written.

    Args:
        out: the run directory to write ("" is the current directory).
        force: allow replacing an existing run directory (one with a config.json), never anything else.

    Returns:
        `out` as a Path.

    Raises:
        BadInput: `out` is a file, lies under a file, cannot be written, is the current directory or one
            above it, a non-empty directory (without `force`), or a non-empty directory that is not a run's.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"output directory {out} exists and is a file")
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        what = "is the current directory" if resolved == cwd else "holds the current directory"
        raise BadInput(f"output directory {str(out) or repr('')} {what}: a run is written as a new directory swapped "
                       "into place; give a new directory name")
    check_writable_parent(out, "output directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise BadInput(f"output directory {out} is not empty; choose another one, or replace the run in it "
                           "with force")
        if not (out / io.CONFIG_FILE).is_file():
            raise BadInput(f"output directory {out} is not a deploytool run directory (no {io.CONFIG_FILE}); "
                           "force replaces only runs: choose another output directory")
    return out


def check_writable_parent(path: str | Path, what: str) -> Path:
    """Refuse `path` (a file or directory to write) if its nearest existing ancestor is a file or cannot
    be written; checked before long work, whose result would otherwise be lost at the write.

    Args:
        path: what will be written (it may not exist yet, nor its parents).
        what: how messages name it ("output directory").

    Returns:
        The nearest existing ancestor directory.

    Raises:
        BadInput: an ancestor is a file, or the directory the write would create files in is not writable.
    """
    import os
    import tempfile

    target = Path(path).resolve()
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise BadInput(f"{what} {path} cannot be created: {parent} is a file")
    try:  # a probe, not os.access: it also sees read-only file systems and answers as the write will
        fd, probe = tempfile.mkstemp(prefix=".deploytool-probe.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BadInput(f"{what} {path} cannot be written: {parent} is not writable "
                       f"({exc.strerror or type(exc).__name__})") from exc
    return parent


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Train on one intra-op thread: the routed models are small, and extra OpenMP threads only spin.

    Measured on 2 busy cores: 7.5 s on one thread against 126 s on two for the default recipe.

    Returns:
        A context manager that restores torch's thread count on exit.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_config(config: TrainConfig | str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """The TrainConfig `train` runs: defaults, a TrainConfig or a recipe, with `overrides` on top.

    Args:
        config: None, a TrainConfig, or a recipe (path or built-in name).
        overrides: TrainConfig fields (None values ignored).

    Returns:
        The checked TrainConfig.

    Raises:
        BadInput: an unknown key or a bad value.
    """
    from deploytool.recipes import config_from_dict, load_recipe

    overrides = {k: v for k, v in overrides.items() if v is not None}
    if config is None:
        return config_from_dict(overrides, "options")
    if isinstance(config, TrainConfig):
        return config_from_dict({**config.to_dict(), **overrides}, "options")
    return load_recipe(config, overrides)
