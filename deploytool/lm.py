"""Language models: fit and commit on token streams, with step budgets, checkpoints and resume.

`fit(model, data, ...)` is the public fit: (x, y) pairs go to training.fit, token data (a path or a
tokens.TokenStream) to `fit_lm`. `commit_lm` makes a top-k MoE language model (a transformers model
converted by deploytool.from_hf, a save_pretrained folder, or a run of one) commit to top-1.

The loop reads `batch_size` random windows of `seq_len` tokens per step (bounded reads from a memory
map), trains with the causal-LM loss on the next tokens plus every router's routing loss, anneals the
routers' temperature geometrically and the learning rate by a cosine. Every `checkpoint_every` steps,
and on Ctrl-C, it writes `<out>.checkpoint/` (weights, optimizer, step) atomically; `resume=True`
continues from it. The run directory appears only when the run completes; its config.json records
what rebuilds the model (for a transformers model its config and top_k), so checkpoints.open_module
and every command (export, verify, bench) take it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deploytool import io
from deploytool.artifacts import HF_PREFIX, MODULE_PREFIX, RunDir
from deploytool.errors import BadInput

#: the most optimizer steps a run may take: more is a typo, not a budget
MAX_STEPS = 10_000_000
CHECKPOINT_SUFFIX = ".checkpoint"
#: commit's defaults, measured on the tiny Mixtral-like LM of docs/routing.md
COMMIT_ALPHA = 0.1
COMMIT_BETA = 0.0
COMMIT_GUARD = 0.05
COMMIT_TEMPERATURE_END = 0.05
COMMIT_LR = 1e-3
COMMIT_DISTILL = 1.0


@dataclass
class LMSettings:
    """How the LM loop runs: `fit_lm`'s loop settings, each value checked when the object is made.

    The budget is `steps` or `tokens` (one of them); tokens round up to whole steps of batch_size x
    seq_len, and `steps` holds the steps the run takes from then on.

    Args:
        seq_len: tokens per window.
        steps: optimizer steps.
        tokens: the budget in training tokens instead of steps.
        batch_size: windows per step.
        lr: AdamW learning rate (cosine decay to 0 after a warmup of 5% of the steps, or constant).
        lr_schedule: cosine or constant.
        weight_decay: AdamW weight decay.
        seed: seeds torch and the windows.
        temperature: the routers' temperature at the start.
        temperature_end: at the end (None: constant).
        checkpoint_every: write a checkpoint every this many steps (0: only on Ctrl-C).

    Raises:
        BadInput: both budgets or neither, or a value of the wrong type or out of range, named.
    """

    seq_len: int = 128
    steps: int | None = None
    batch_size: int = 16
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    seed: int = 0
    temperature: float = 1.0
    temperature_end: float | None = None
    checkpoint_every: int = 0
    tokens: int | None = None

    def __post_init__(self):
        from deploytool.losses import check_temperature
        from deploytool.tokens import check_seq_len

        check_seq_len(self.seq_len)
        _check_whole(self, "batch_size", 1)
        self.steps = budget_steps(self.steps, self.tokens, seq_len=self.seq_len, batch_size=self.batch_size)
        self.tokens = None  # spent: `steps` is the budget from here on (a resume compares the steps)
        for name in ("seed", "checkpoint_every"):
            _check_whole(self, name, 0)
        if self.steps > MAX_STEPS:
            raise BadInput(f"steps={self.steps} is more than the {MAX_STEPS} a run may take")
        if self.batch_size * self.seq_len > 1 << 24:
            raise BadInput(f"batch_size x seq_len = {self.batch_size * self.seq_len} tokens per step is more than "
                           f"the {1 << 24} deploytool reads per step")
        if self.lr_schedule not in ("cosine", "constant"):
            raise BadInput(f"lr_schedule must be cosine or constant, got {self.lr_schedule!r}")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
                    or (name == "lr" and value == 0):
                raise BadInput(f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {value!r}")
        try:
            check_temperature(self.temperature)
            if self.temperature_end is not None:
                check_temperature(self.temperature_end, "temperature_end")
        except (ValueError, TypeError) as exc:
            raise BadInput(str(exc)) from exc

    def lr_at(self, step: int) -> float:
        if self.lr_schedule == "constant":
            return self.lr
        warmup = max(self.steps // 20, 1)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        return self.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(self.steps - warmup, 1)))

    def to_dict(self) -> dict[str, Any]:
        """The settings as config.json and a checkpoint record them (the budget in steps)."""
        settings = asdict(self)
        settings.pop("tokens")
        return settings


def _check_whole(settings: Any, name: str, least: int) -> None:
    value = getattr(settings, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise BadInput(f"{name} must be a whole number >= {least}, got {value!r}")


def budget_steps(steps: int | None, tokens: int | None, *, seq_len: int, batch_size: int) -> int:
    """The steps of a budget given in steps or in tokens (one of them).

    Args:
        steps: optimizer steps, or None.
        tokens: training tokens (rounded up to whole steps of batch_size x seq_len), or None.
        seq_len: tokens per window.
        batch_size: windows per step.

    Returns:
        The number of steps.

    Raises:
        BadInput: both or neither given, or a value that is not a whole number >= 1 or beyond MAX_STEPS.
    """
    if (steps is None) == (tokens is None):
        raise BadInput("give the budget in steps or in tokens (one of them)")
    for name, value in (("steps", steps), ("tokens", tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise BadInput(f"{name} must be a whole number >= 1, got {value!r}")
    if steps is None:
        if tokens > MAX_STEPS * batch_size * seq_len:
            raise BadInput(f"tokens={tokens} is more than {MAX_STEPS} steps of {batch_size} x {seq_len} tokens")
        steps = -(-tokens // (batch_size * seq_len))
    return steps


def distributed() -> tuple[int, int]:
    """(rank, world size): under torchrun (WORLD_SIZE > 1) the process group is started here (gloo on CPU,
    NCCL when CUDA is available) unless the caller started it, and destroyed at exit (atexit, no barrier);
    (0, 1) on one process.

    Returns:
        (rank, world size).
    """
    import os

    import torch

    if not torch.distributed.is_available():
        return 0, 1
    dist = torch.distributed
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        import atexit

        atexit.register(_destroy_group)  # ours to end: without it a rank may abort at interpreter teardown
    return dist.get_rank(), dist.get_world_size()


def _destroy_group() -> None:
    """Destroy the process group `distributed` started, without a barrier (a rank interrupted by Ctrl-C
    would never reach one), so no rank aborts with "terminate called without an active exception" when
    the interpreter tears gloo down."""
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _barrier(world: int) -> None:
    if world > 1:
        import torch

        torch.distributed.barrier()


def checkpoint_dir(out: str | Path) -> Path:
    """Where a run to `out` keeps its resumable checkpoint: `<out>.checkpoint` beside it."""
    out = Path(out).resolve()
    return out.with_name(out.name + CHECKPOINT_SUFFIX)


# --- the loop ----------------------------------------------------------------------------------------

def lm_loop(model: Any, train: Any, settings: LMSettings, *, loss_fn: Callable[[Any, Any, Any], Any] | None = None,
            checkpoint: Path | None = None, resume: bool = False, state: dict[str, Any] | None = None,
            progress: bool = True, label: str = "training") -> dict[str, Any]:
    """THE language-model loop: AdamW, random windows, next-token loss plus the routers' losses.

    Args:
        model: the LM (train mode is set here; eval mode on return).
        train: the training tokens.TokenStream.
        settings: the LMSettings.
        loss_fn: `loss_fn(logits, labels, ids) -> scalar`; the causal-LM cross-entropy when None.
        checkpoint: the checkpoint directory (None: no checkpoints, not even on Ctrl-C).
        resume: continue from `checkpoint` (its settings must be these).
        state: JSON-able facts the checkpoint keeps and a resume returns (e.g. a commit's load targets).
        progress: draw a progress bar (tokens/s and ETA) on a terminal.
        label: the bar's label.

    Returns:
        {"seconds", "steps", "tokens", "resumed_from", "state"}.

    Raises:
        BadInput: resume without a checkpoint, or one written with other settings.
        KeyboardInterrupt: after writing the checkpoint (when there is one).
    """
    import numpy as np
    import torch

    from deploytool.metrics import lm_logits, model_vocab
    from deploytool.nn import collect_routing_loss, set_temperature
    from deploytool.progress import progress_bar
    from deploytool.tokens import IGNORE, random_starts, window_batch
    from deploytool.training import single_thread, temperature_at

    loss_fn = loss_fn or (lambda logits, labels, _ids: torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    start, seconds, state = 0, 0.0, dict(state or {})
    if resume:
        if checkpoint is None or not (checkpoint / "state.json").is_file():
            raise BadInput(f"nothing to resume: no checkpoint at {checkpoint}")
        start, seconds, state = _load_checkpoint(checkpoint, model, opt, settings)
    vocab = model_vocab(model)
    rank, world = distributed()
    if settings.batch_size % world:
        raise BadInput(f"batch_size {settings.batch_size} (windows per step, over all processes) must be a multiple "
                       f"of the {world} processes")
    torch.manual_seed(settings.seed + start)
    step = start
    began = time.perf_counter()
    tokens_per_step = settings.batch_size * settings.seq_len
    try:
        with single_thread(), progress_bar(label, settings.steps - start, progress) as advance:
            model.train()
            for step in range(start, settings.steps):
                rng = np.random.default_rng([settings.seed, step])
                starts = random_starts(train, settings.seq_len, settings.batch_size, rng)[rank::world]  # this rank's
                ids, labels = (torch.from_numpy(a) for a in window_batch(train, starts, settings.seq_len, vocab))
                for group in opt.param_groups:
                    group["lr"] = settings.lr_at(step)
                set_temperature(model, temperature_at(settings, step, settings.steps))
                loss = loss_fn(lm_logits(model, ids), labels, ids) + collect_routing_loss(model)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if world > 1:
                    _average_gradients(params, world)
                opt.step()
                done = step + 1 - start
                elapsed = time.perf_counter() - began
                rate = done * tokens_per_step / max(elapsed, 1e-9)
                eta = (settings.steps - step - 1) * tokens_per_step / max(rate, 1e-9)
                advance(status=f"loss {loss.item():.3f}  {rate:,.0f} tok/s  ETA {_clock(eta)}")
                due = settings.checkpoint_every and (step + 1) % settings.checkpoint_every == 0
                if checkpoint is not None and due and step + 1 < settings.steps:
                    _save_checkpoint(checkpoint, model, opt, settings, step + 1,
                                     seconds + time.perf_counter() - began, state)
    except KeyboardInterrupt:
        if checkpoint is not None and rank == 0:
            done = step  # the step in flight is lost; every step before it is in the weights
            # rank 0 alone, without a barrier: the other ranks are being interrupted too
            _write_checkpoint(checkpoint, model, opt, settings, done, seconds + time.perf_counter() - began, state)
            import sys

            sys.stderr.write(f"interrupted at step {done} of {settings.steps}: resume from {checkpoint} with "
                             "resume=True (--resume)\n")
        raise
    finally:
        set_temperature(model, temperature_at(settings, settings.steps - 1, settings.steps))
        model.eval()
    seconds += time.perf_counter() - began
    return {"seconds": seconds, "steps": settings.steps, "tokens": settings.steps * tokens_per_step,
            "resumed_from": start or None, "state": state}


def _average_gradients(params: list[Any], world: int) -> None:
    """Every rank's gradients averaged (a parameter without one counts as zeros), as DDP would."""
    import torch

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad /= world


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _save_checkpoint(path: Path, model: Any, opt: Any, settings: LMSettings, step: int, seconds: float,
                     state: dict[str, Any]) -> None:
    """Weights, optimizer moments and the step, written as a new directory swapped into place (by rank 0,
    the others waiting for it)."""
    rank, world = distributed()
    if rank == 0:
        _write_checkpoint(path, model, opt, settings, step, seconds, state)
    _barrier(world)


def _write_checkpoint(path: Path, model: Any, opt: Any, settings: LMSettings, step: int, seconds: float,
                      state: dict[str, Any]) -> None:
    opt_state = opt.state_dict()
    tensors = {f"{i}.{k}": v for i, s in opt_state["state"].items() for k, v in s.items()}
    with io.atomic_dir(path, replace=True) as tmp:
        io.save_weights(tmp / io.WEIGHTS_FILE, unshared(model.state_dict()))
        io.save_weights(tmp / "optimizer.safetensors", {k: v.reshape(v.shape) for k, v in tensors.items()})
        io.write_json(tmp / "state.json", {"step": step, "seconds": seconds, "settings": settings.to_dict(),
                                           "state": state})


def _load_checkpoint(path: Path, model: Any, opt: Any, settings: LMSettings) -> tuple[int, float, dict]:
    from deploytool.checkpoints import load_state

    meta = io.read_json(path / "state.json", "checkpoint state")
    if meta.get("settings") != settings.to_dict():
        theirs = meta.get("settings") or {}
        diff = sorted(k for k in settings.to_dict() if theirs.get(k) != settings.to_dict()[k])
        raise BadInput(f"checkpoint {path} was written with other settings ({', '.join(diff)}); resume with the "
                       "same ones, or start afresh without resume")
    load_state(model, path / io.WEIGHTS_FILE, type(model).__name__)
    tensors = io.load_weights(path / "optimizer.safetensors")
    opt_state = opt.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        i, key = name.split(".", 1)
        state.setdefault(int(i), {})[key] = tensor
    opt_state["state"] = state
    opt.load_state_dict(opt_state)
    return int(meta["step"]), float(meta["seconds"]), dict(meta.get("state") or {})


def unshared(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict whose tensors share no memory (tied embeddings copied), as safetensors requires."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[name] = tensor.detach().clone() if key in seen else tensor
        seen.add(key)
    return out


# --- fit ---------------------------------------------------------------------------------------------

def fit(model: Any, data: Any, *, out: str | Path, loop: Any, **options: Any) -> RunDir:
    """Train your own module with deploytool routers: class data goes to training.fit, token data to fit_lm.

    Args:
        model: a torch nn.Module with deploytool routers (or a transformers MoE model from from_hf).
        data: (x, y) for a classifier; a token file or tokens.TokenStream for a language model.
        out: the run directory to write.
        loop: the loop's settings: a recipes.LoopSettings for (x, y), an LMSettings for token data.
        **options: the other options of training.fit (test_data, loss_fn, progress, force) or of fit_lm
            (loss, top_k, test_data, test_fraction, tokenizer, resume, eval_tokens, progress, force).

    Returns:
        The RunDir.

    Raises:
        BadInput: settings of the other kind of data, or as training.fit or fit_lm.
    """
    from deploytool.recipes import LoopSettings
    from deploytool.tokens import is_token_source

    if is_token_source(data):
        if not isinstance(loop, LMSettings):
            raise BadInput(f"token data trains with loop=LMSettings(...) (seq_len, steps or tokens, ...), got "
                           f"{type(loop).__name__}")
        return fit_lm(model, data, out=out, loop=loop, **options)
    if not isinstance(loop, LoopSettings):
        raise BadInput(f"(x, y) data trains with loop=LoopSettings(...) (epochs, lr, ...), got {type(loop).__name__}")
    from deploytool.training import fit as fit_classes

    return fit_classes(model, data, out=out, loop=loop, **options)


#: what an LM run's config.json records as "fit" when the routers keep their own routing losses
_OWN_LOSSES = {"penalty": None, "alpha": 0.0, "balance": "switch", "beta": 0.01}


def fit_lm(model: Any, data: Any, *, out: str | Path, loop: LMSettings, loss: Any = None, top_k: int | None = None,
           test_data: Any = None, test_fraction: float = 0.1, tokenizer: str | Path | None = None,
           resume: bool = False, eval_tokens: int | None = None, progress: bool = True, force: bool = False) -> RunDir:
    """Train a language model with deploytool routers on token data and write a run directory.

    Args:
        model: a causal LM whose forward takes token ids [B, T] and returns logits [B, T, V] (first, or as
            `.logits`), with deploytool routers (a transformers MoE model converted by from_hf); or a path: a
            save_pretrained folder or an LM run directory (checkpoints.open_module).
        data: token ids (.npz, .npy, .bin), a text file, or a tokens.TokenStream.
        out: the run directory to write.
        loop: the loop's settings (seq_len, the budget in steps or tokens, batch size, lr, temperatures,
            checkpoint_every).
        loss: an nn.RoutingLoss every router gets (see `routing_loss`); None keeps the routers' own (a
            converted model's routers have none).
        top_k: experts per token of a model given by path (None: its own).
        test_data: held-out token data (default: the last `test_fraction` of `data`).
        test_fraction: the share of `data` held out without `test_data`.
        tokenizer: a model folder whose tokenizer reads text files (default: the model's folder when given
            by path; else bytes).
        resume: continue from the checkpoint at `<out>.checkpoint`.
        eval_tokens: held-out tokens measured (default metrics.LM_EVAL_TOKENS).
        progress: draw a progress bar.
        force: replace a run directory at `out`.

    Returns:
        The RunDir; `model` is left trained, in eval mode.

    Raises:
        BadInput: a model without routers, bad data or settings, an output directory that cannot be written.
    """
    import torch

    from deploytool.metrics import LM_EVAL_TOKENS, lm_metrics
    from deploytool.tokens import load_tokens, split_tokens
    from deploytool.training import check_run_target

    _check_settings(loop, LMSettings, "loop")
    _check_loss(loss)
    if isinstance(model, (str, Path)):
        from deploytool.checkpoints import open_module

        tokenizer = tokenizer if tokenizer is not None else model
        model = open_module(model, top_k=top_k).module
    elif top_k is not None:
        _set_top_k(model, top_k)
    _check_model(model)
    progress = progress and distributed()[0] == 0
    out = check_run_target(out, force)
    train, held = split_tokens(load_tokens(data, tokenizer=tokenizer), test_data, test_fraction=test_fraction,
                               tokenizer=tokenizer)
    if loss is not None:
        _set_routing_loss(model, loss)
    torch.manual_seed(loop.seed)
    run = lm_loop(model, train, loop, checkpoint=checkpoint_dir(out), resume=resume, progress=progress,
                  label="fit")
    metrics = lm_metrics(model, held, seq_len=loop.seq_len, max_tokens=eval_tokens or LM_EVAL_TOKENS)
    metrics.update(heldout=held.name, train_data=train.name, train_seconds=round(run["seconds"], 3),
                   steps=run["steps"], train_tokens=run["tokens"], seed=loop.seed, processes=distributed()[1])
    config = lm_run_config(model, loop, fit=_loss_dict(loss) if loss is not None else dict(_OWN_LOSSES))
    return write_lm_run(out, model, config, metrics, f"{config['model']} fitted", force=force)


def routing_loss(*, penalty: str = "frank", alpha: float = 0.0, balance: str = "switch",
                 beta: float = 0.01) -> Any:
    """An nn.RoutingLoss, checked: what `fit_lm(loss=)` and `commit_lm(loss=)` take.

    Args:
        penalty: the confidence penalty (frank | entropy | none).
        alpha: its weight (>= 0).
        balance: the balance term (entropy | switch | none).
        beta: its weight (>= 0).

    Returns:
        The RoutingLoss.

    Raises:
        BadInput: an unknown term or a bad weight, named.
    """
    from deploytool.nn import RoutingLoss

    try:
        return RoutingLoss(penalty=penalty, alpha=alpha, balance=balance, beta=beta)
    except (ValueError, TypeError) as exc:
        raise BadInput(str(exc)) from exc


def _loss_dict(loss: Any) -> dict[str, Any]:
    return {"penalty": loss.penalty, "alpha": loss.alpha, "balance": loss.balance, "beta": loss.beta}


def _check_loss(loss: Any) -> None:
    from deploytool.nn import RoutingLoss

    if loss is not None and not isinstance(loss, RoutingLoss):
        raise BadInput(f"loss must be a deploytool.nn.RoutingLoss (or None), got {type(loss).__name__}")


def _check_settings(settings: Any, kind: type, name: str) -> None:
    if not isinstance(settings, kind):
        raise BadInput(f"{name} must be a {kind.__name__}, got {type(settings).__name__}")


def _check_model(model: Any) -> None:
    import torch

    from deploytool.nn import named_routers

    if not isinstance(model, torch.nn.Module):
        raise BadInput(f"a language model is a torch nn.Module, got {type(model).__name__}")
    if not named_routers(model):
        raise BadInput(f"{type(model).__name__} has no deploytool router: convert a transformers MoE model with "
                       "deploytool.from_hf")


def _set_routing_loss(model: Any, loss: Any, targets: dict[str, Any] | None = None, guard: float = 0.0) -> None:
    """Give every router's routing loss (top-k routers) or its RoutedExperts' (deploytool Routers) `loss`,
    guarded towards `targets` (by router path) with weight `guard` when given."""
    from deploytool.nn import named_routers, routed_modules
    from deploytool.training import GuardedLoss

    def guarded(path: str):
        target = (targets or {}).get(path)
        return loss if not guard or target is None else GuardedLoss(loss, target, float(guard))

    paths = {id(r): p for p, r in named_routers(model)}
    for routed in routed_modules(model):
        routed.loss = guarded(paths[id(routed.router)])
    for path, router in named_routers(model):
        if hasattr(router, "rule"):
            router.loss = guarded(path)


def lm_run_config(model: Any, settings: LMSettings, **extra: Any) -> dict[str, Any]:
    """config.json of an LM run: what rebuilds the model (a transformers model's config and top_k), the
    settings, the routers.

    Args:
        model: the trained model.
        settings: the loop's settings.
        **extra: more entries (fit, commit).

    Returns:
        config.json's dict.
    """
    import json

    from deploytool import __version__
    from deploytool.hf import is_hf_model
    from deploytool.metrics import router_k
    from deploytool.nn import named_routers
    from deploytool.training import final_temperature

    config: dict[str, Any] = {"task": "lm", **settings.to_dict(),
                              "temperature": final_temperature(settings), "temperature_start": settings.temperature,
                              "routers": {path: int(r.n_experts) for path, r in named_routers(model)},
                              "deploytool_version": __version__, **extra}
    if is_hf_model(model):
        config.update(model=f"{HF_PREFIX}{type(model).__name__}", top_k=router_k(model),
                      hf_config=json.loads(model.config.to_json_string(use_diff=False)))
    else:
        config.update(model=f"{MODULE_PREFIX}{type(model).__name__}", input_shape=[settings.seq_len])
    return config


def write_lm_run(out: Path, model: Any, config: dict[str, Any], metrics: dict[str, Any], title: str, *,
                 force: bool) -> RunDir:
    """Write an LM run directory atomically (weights, config.json, metrics.json, routing.png per router),
    then drop the checkpoint the run no longer needs.

    Args:
        out: the run directory.
        model: the trained model.
        config: config.json.
        metrics: metrics.json.
        title: the plot's title.
        force: replace a run another process wrote at `out` meanwhile.

    Returns:
        The RunDir.
    """
    import shutil

    from deploytool.metrics import plot_lm_routing

    rank, world = distributed()
    if rank != 0:  # rank 0 alone writes the run
        _barrier(world)
        return RunDir(Path(out), config, metrics)
    with io.atomic_dir(out, replace=force) as tmp:
        io.save_weights(tmp / io.WEIGHTS_FILE, unshared(model.state_dict()), metadata={"model": str(config["model"])})
        io.write_json(tmp / io.CONFIG_FILE, config)
        plot_lm_routing(metrics, tmp / io.ROUTING_PLOT, title=f"{title}: perplexity {metrics['perplexity']:.3f}, "
                        f"{metrics['min_frac_confident']:.1%} confident (least layer)")
        io.write_json(tmp / io.METRICS_FILE, metrics)
    shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
    _barrier(world)
    return RunDir(Path(out), config, metrics)


# --- commit ------------------------------------------------------------------------------------------

#: a commit's budget when neither steps nor tokens is given
COMMIT_STEPS = 200
#: LMCommitSettings fields a built-in commit has no counterpart of (named when they are given there)
LM_ONLY = ("seq_len", "steps", "tokens", "distill", "straight_through", "checkpoint_every", "resume",
           "eval_tokens", "test_fraction")


@dataclass(frozen=True)
class LMCommitSettings:
    """How `commit_lm` fine-tunes a top-k language model to top-1; each value checked when it is made.

    The defaults are the ones measured on the tiny Mixtral-like LM of docs/routing.md; `default_loss()`
    gives the routing loss they go with.

    Args:
        seq_len: tokens per window.
        steps: the budget in optimizer steps (or `tokens`; neither: COMMIT_STEPS).
        tokens: the budget in training tokens (rounded up to whole steps).
        batch_size: windows per step.
        lr: AdamW learning rate (warmup, cosine decay).
        guard: the load guard's weight (0: off).
        distill: the weight of the KL to the original model's next-token distribution, 0..1 (the LM loss
            gets 1 - distill).
        temperature_end: the routers' final (deployed) temperature.
        straight_through: let the LM loss reach the routers at k = 1 (off: measured worse).
        seed: seeds torch and the windows.
        checkpoint_every: a checkpoint every this many steps at `<out>.checkpoint` (0: only on Ctrl-C).
        resume: continue from that checkpoint.
        eval_tokens: held-out tokens measured (None: metrics.LM_EVAL_TOKENS).
        test_fraction: the share of the data held out without test data.

    Raises:
        BadInput: both budgets, or a value of the wrong type or out of range, named.
    """

    seq_len: int = 128
    steps: int | None = None
    tokens: int | None = None
    batch_size: int = 16
    lr: float = COMMIT_LR
    guard: float = COMMIT_GUARD
    distill: float = COMMIT_DISTILL
    temperature_end: float = COMMIT_TEMPERATURE_END
    straight_through: bool = False
    seed: int = 0
    checkpoint_every: int = 0
    resume: bool = False
    eval_tokens: int | None = None
    test_fraction: float = 0.1

    def __post_init__(self):
        self.loop(1.0)  # seq_len, the budget, batch_size, lr, seed, checkpoint_every, temperature_end
        if isinstance(self.distill, bool) or not isinstance(self.distill, (int, float)) or not 0 <= self.distill <= 1:
            raise BadInput(f"distill must be a number from 0 to 1, got {self.distill!r}")
        check_guard(self.guard)
        for name in ("straight_through", "resume"):
            if not isinstance(getattr(self, name), bool):
                raise BadInput(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.eval_tokens is not None:
            _check_whole(self, "eval_tokens", 1)
        value = self.test_fraction
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise BadInput(f"test_fraction must be a number between 0 and 1, got {value!r}")

    @property
    def total_steps(self) -> int:
        """The optimizer steps the budget comes to."""
        if self.steps is None and self.tokens is None:
            return COMMIT_STEPS
        return budget_steps(self.steps, self.tokens, seq_len=self.seq_len, batch_size=self.batch_size)

    def loop(self, temperature: float) -> LMSettings:
        """The LM loop's settings, its temperature annealed from `temperature` (the routers' own)."""
        return LMSettings(seq_len=self.seq_len, steps=self.total_steps, batch_size=self.batch_size, lr=self.lr,
                          seed=self.seed, temperature=temperature, temperature_end=self.temperature_end,
                          checkpoint_every=self.checkpoint_every)

    def lm_only(self) -> list[str]:
        """The fields given other values than their defaults that a built-in commit has no counterpart of."""
        return [name for name in LM_ONLY if getattr(self, name) != getattr(_LM_COMMIT_DEFAULTS, name)]

    @staticmethod
    def default_loss(**changes: Any) -> Any:
        """The routing loss an LM commit uses by default (frank penalty COMMIT_ALPHA, entropy balance
        COMMIT_BETA), with `changes` (penalty, alpha, balance, beta) on top.

        Returns:
            The nn.RoutingLoss.

        Raises:
            BadInput: a bad change, named.
        """
        return routing_loss(**{"penalty": "frank", "alpha": COMMIT_ALPHA, "balance": "entropy",
                               "beta": COMMIT_BETA, **changes})


def check_guard(guard: Any) -> None:
    """Refuse a load-guard weight that is not a finite number >= 0.

    Raises:
        BadInput: naming the guard.
    """
    if isinstance(guard, bool) or not isinstance(guard, (int, float)) or not math.isfinite(guard) or guard < 0:
        raise BadInput(f"guard (the load guard's weight) must be a finite number >= 0, got {guard!r}")


def commit_lm(model_or_path: Any, data: Any, *, out: str | Path, settings: LMCommitSettings | None = None,
              loss: Any = None, test_data: Any = None, progress: bool = True, force: bool = False) -> RunDir:
    """Make a top-k MoE language model commit to top-1: fine-tune it at k = 1 until every router is confident.

    Every router picks one expert from the first step (what deployment runs); the loss is the causal-LM
    loss, mixed with distillation from the original top-k model's next-token distribution (`distill`),
    plus per router the confidence penalty, a balance term and the load guard (losses.load_guard: KL from
    the router's soft loads before the commit to each batch's, so no expert that carried traffic dies),
    while the temperature anneals from the routers' own to `temperature_end`. At k = 1 a router's
    combine weight is 1 and the LM loss does not reach it: the routers move only by the penalty (towards
    the expert each already prefers) and the guard, so the experts adapt to a routing that stays close to
    the original's top-1 choices. `straight_through` multiplies the weight by p / p.detach() (the same
    forward, the probability's gradient backward) to let the LM loss move the routers: measured worse
    (docs/routing.md), the experts then chase a routing that keeps changing.

    Args:
        model_or_path: a model with deploytool routers (from_hf), a save_pretrained folder or an LM run dir
            (a path, or as artifacts.run_or_hf_folder read it: its config.json is not read again).
        data: token data (.npz, .npy, .bin, a text file) or a tokens.TokenStream.
        out: the new run directory (never inside the input).
        settings: the commit's settings (None: LMCommitSettings(), the measured defaults).
        loss: the routers' nn.RoutingLoss (None: LMCommitSettings.default_loss()).
        test_data: held-out token data (default: the last `settings.test_fraction` of `data`).
        progress: draw a progress bar.
        force: replace a run directory at `out`.

    Returns:
        The new RunDir: its metrics hold `before` (the input's figures on the same held-out tokens, its
        original k included) and `load_targets`; config.json rebuilds the committed top-1 model.

    Raises:
        BadInput: a model without routers, bad data or settings, `out` inside the input.
    """
    import torch

    from deploytool.artifacts import HFFolder
    from deploytool.metrics import LM_EVAL_TOKENS, lm_logits, lm_metrics, router_k
    from deploytool.nn import named_routers
    from deploytool.tokens import IGNORE, load_tokens, split_tokens
    from deploytool.training import check_run_target

    settings = LMCommitSettings() if settings is None else settings
    _check_settings(settings, LMCommitSettings, "settings")
    _check_loss(loss)
    loss = LMCommitSettings.default_loss() if loss is None else loss
    s = settings
    tokenizer = None
    source_path = None
    if isinstance(model_or_path, (str, Path, RunDir, HFFolder)):
        from deploytool.checkpoints import open_module

        read = isinstance(model_or_path, (RunDir, HFFolder))
        source_path = Path(model_or_path.path if read else model_or_path)
        model = open_module(model_or_path).module
        tokenizer = source_path
        resolved = Path(out).resolve()
        if resolved == source_path.resolve() or source_path.resolve() in resolved.parents:
            raise BadInput(f"the committed model goes to a new run directory, not over or inside {source_path}")
    else:
        model = model_or_path
    _check_model(model)
    progress = progress and distributed()[0] == 0
    start_t = float(named_routers(model)[0][1].temperature)
    loop = s.loop(start_t)
    seq_len, seed, distill, guard = s.seq_len, s.seed, s.distill, s.guard
    out = check_run_target(out, force)
    train, held = split_tokens(load_tokens(data, tokenizer=tokenizer), test_data, test_fraction=s.test_fraction,
                               tokenizer=tokenizer)
    eval_tokens = s.eval_tokens or LM_EVAL_TOKENS
    original_k = router_k(model)
    ckpt = checkpoint_dir(out)
    saved_losses = {path: getattr(r, "loss", None) for path, r in named_routers(model)}
    if s.resume and (ckpt / "state.json").is_file():
        meta = io.read_json(ckpt / "state.json", "checkpoint state")["state"]
        before, targets = meta["before"], meta["load_targets"]
    else:
        before = lm_metrics(model, held, seq_len=seq_len, max_tokens=eval_tokens, original_k=original_k)
        before.pop("routers", None)
        targets = {p: t.tolist() for p, t in lm_soft_loads(model, train, seq_len=seq_len, seed=seed).items()}
    teacher = _frozen_copy(model) if distill else None
    _set_top_k(model, 1)
    _set_routing_loss(model, loss, {p: torch.tensor(t, dtype=torch.float64) for p, t in targets.items()}, guard)
    hooks = [r.register_forward_hook(_straight_through) for _, r in named_routers(model)
             if s.straight_through and hasattr(r, "rule")]

    def loss_fn(logits, labels, ids):
        flat = logits.reshape(-1, logits.shape[-1]).float()
        total = 0.0
        if distill < 1:
            total = (1 - distill) * torch.nn.functional.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE)
        if teacher is not None:
            with torch.no_grad():
                target = torch.log_softmax(lm_logits(teacher, ids).reshape(flat.shape).float(), dim=-1)
            kl = torch.nn.functional.kl_div(torch.log_softmax(flat, dim=-1), target, log_target=True,
                                            reduction="batchmean")
            total = total + distill * kl
        return total

    torch.manual_seed(seed)
    try:
        run = lm_loop(model, train, loop, loss_fn=loss_fn, checkpoint=ckpt, resume=s.resume,
                      state={"before": before, "load_targets": targets}, progress=progress, label="commit")
    finally:
        for hook in hooks:
            hook.remove()
        for path, r in named_routers(model):
            if hasattr(r, "rule"):
                r.loss = saved_losses[path]
    metrics = lm_metrics(model, held, seq_len=seq_len, max_tokens=eval_tokens, original_k=original_k)
    metrics.update(heldout=held.name, train_data=train.name, train_seconds=round(run["seconds"], 3),
                   steps=run["steps"], train_tokens=run["tokens"], seed=seed, processes=distributed()[1],
                   before=before, load_targets=targets,
                   perplexity_ratio=metrics["perplexity"] / before.get("topk_perplexity", before["perplexity"]))
    commit_settings = {**_loss_dict(loss), "guard": guard, "distill": distill,
                       "straight_through": s.straight_through, "original_k": original_k}
    if source_path is not None:
        commit_settings["committed_from"] = str(source_path)
    config = lm_run_config(model, loop, commit=commit_settings)
    return write_lm_run(out, model, config, metrics, f"{config['model']} committed", force=force)


def _frozen_copy(model: Any) -> Any:
    """A frozen copy of `model` in eval mode (the distillation teacher). A converted transformers model is
    rebuilt from its config and converted afresh: a deepcopy would keep hooks bound to the original."""
    import copy

    from deploytool.hf import from_hf, is_hf_model

    if is_hf_model(model):
        import torch
        import transformers

        teacher = transformers.AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
        teacher.load_state_dict(model.state_dict())
        teacher = from_hf(teacher.eval())
        own = {p: r for p, r in _named_topk(model)}
        for path, router in _named_topk(teacher):  # the rule found by probing, and the temperature, as is
            router.rule, router.temperature = own[path].rule, own[path].temperature
    else:
        teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def _named_topk(model: Any) -> list[tuple[str, Any]]:
    from deploytool.nn import named_routers

    return [(p, r) for p, r in named_routers(model) if hasattr(r, "rule")]


def _set_top_k(model: Any, k: int) -> None:
    from deploytool.nn import named_routers

    for path, router in named_routers(model):
        if hasattr(router, "set_top_k"):
            try:
                router.set_top_k(k)
            except ValueError as exc:
                raise BadInput(f"{path}: {exc}") from None


def _straight_through(router: Any, _inputs: Any, out: Any) -> Any:
    """A top-k router's output with its combine weights times p / p.detach(): the same forward, and the
    chosen experts' probabilities get the LM loss's gradient."""
    logits, weights, index = out
    probs = router.last_routing.probs.reshape(-1, logits.shape[-1])
    chosen = probs.gather(-1, index)
    return logits, weights * (chosen / chosen.detach()).to(weights.dtype), index


def lm_soft_loads(model: Any, stream: Any, *, seq_len: int, seed: int = 0, windows: int = 64) -> dict[str, Any]:
    """Each router's soft load on `windows` random windows of `stream`: its mean routing probabilities.

    Args:
        model: the LM.
        stream: a tokens.TokenStream.
        seq_len: tokens per window.
        seed: seeds the windows.
        windows: how many windows (bounded work whatever the stream's size).

    Returns:
        {router path: float64 tensor [n_experts] summing to 1}.
    """
    import numpy as np
    import torch

    from deploytool.metrics import lm_logits, model_vocab
    from deploytool.nn import mean_routing_probs
    from deploytool.tokens import random_starts, window_batch

    starts = random_starts(stream, seq_len, windows, np.random.default_rng([seed, 1 << 30]))
    vocab = model_vocab(model)

    def forward(at: int):
        ids, _ = window_batch(stream, starts[at:at + 16], seq_len, vocab)
        lm_logits(model, torch.from_numpy(ids))

    return mean_routing_probs(model, (lambda at=at: forward(at) for at in range(0, len(starts), 16)))


#: the defaults `LMCommitSettings.lm_only` compares with
_LM_COMMIT_DEFAULTS = LMCommitSettings()
