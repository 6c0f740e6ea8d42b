"""`deploytool commit`: make an already trained model commit to one expert (a soft-routing built-in model,
or a top-k MoE language model to top-1)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from deploytool.cli.options import Json, Quiet, Seed
from deploytool.finetune import MODEL_EPOCHS, ROUTER_EPOCHS

app = typer.Typer()


def _opt(help: str, *names: str, **kwargs):
    return typer.Option(*names, help=help, **kwargs)


@app.command()
def commit(
    run_dir: Annotated[Path, typer.Argument(help="A trained run directory (a built-in model), or a language "
                                            "model: a transformers save_pretrained folder or an LM run directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The new run directory (never the input run).")],
    router_epochs: Annotated[int, _opt("Stage 1 (off by default): routers only, temperature annealed.",
                                       "--router-epochs", min=0)] = ROUTER_EPOCHS,
    model_epochs: Annotated[int, _opt("Stage 2: the whole model, temperature annealed to the final one.",
                                      "--model-epochs", min=0)] = MODEL_EPOCHS,
    alpha: Annotated[Optional[float], _opt("Weight of the confidence penalty (>= 0; default 3, LM 0.1).",
                                           "--alpha")] = None,
    beta: Annotated[Optional[float], _opt("Weight of the balance term (>= 0; default 0.5, LM 0).", "--beta")] = None,
    guard: Annotated[Optional[float], _opt("Weight of the load guard that keeps every expert that carried traffic "
                                           "alive (>= 0; 0: off; default 1, LM 0.05).", "--guard")] = None,
    temperature_end: Annotated[Optional[float], _opt("Final router temperature (default 0.02, LM 0.05).",
                                                     "--temperature-end")] = None,
    data: Annotated[Optional[str], _opt("A language model's token data: .npz ('ids'), .npy, .bin (uint16) or "
                                        "text.", "--data")] = None,
    test_data: Annotated[Optional[str], _opt("Held-out tokens (default: the last 10% of --data).",
                                             "--test-data")] = None,
    seq_len: Annotated[int, _opt("LM: tokens per window.", "--seq-len")] = 128,
    steps: Annotated[Optional[int], _opt("LM: budget in optimizer steps (default 200).", "--steps")] = None,
    tokens: Annotated[Optional[int], _opt("LM: budget in training tokens (instead of --steps).", "--tokens")] = None,
    batch_size: Annotated[Optional[int], _opt("Rows (LM: windows) per step (default 64, LM 16).",
                                              "--batch-size")] = None,
    lr: Annotated[Optional[float], _opt("Learning rate of the whole-model stage (default 5e-3, LM 1e-3).",
                                        "--lr")] = None,
    distill: Annotated[float, _opt("LM: weight of distillation from the original top-k model (0..1).",
                                   "--distill")] = 1.0,
    checkpoint_every: Annotated[int, _opt("LM: write <out>.checkpoint every N steps (0: only on Ctrl-C).",
                                          "--checkpoint-every")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="LM: continue from <out>.checkpoint.")] = False,
    seed: Seed = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out directory.")] = False,
    json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Fine-tune a trained model so that its routers commit to one expert; write a new run directory."""
    from deploytool.cli.train import show_run
    from deploytool.finetune import CommitSettings
    from deploytool.finetune import commit as run_commit
    from deploytool.lm import LMCommitSettings

    lm_only = {"steps": steps, "tokens": tokens, "checkpoint_every": checkpoint_every or None, "resume": resume or None}
    shared = {"guard": guard, "temperature_end": temperature_end, "batch_size": batch_size, "seed": seed}
    if data is not None or any(v is not None for v in lm_only.values()):  # a built-in run refuses them, named
        kind = LMCommitSettings
        given = {**shared, **lm_only, "lr": lr}
        if data is not None:
            given.update(seq_len=seq_len, distill=distill)
    else:
        kind = CommitSettings
        given = {**shared, "router_epochs": router_epochs, "model_epochs": model_epochs, "model_lr": lr}
    settings = kind(**{k: v for k, v in given.items() if v is not None})
    weights = {k: v for k, v in (("alpha", alpha), ("beta", beta)) if v is not None}
    loss = kind.default_loss(**weights) if weights else None
    run = run_commit(run_dir, out=out, data=data, test_data=test_data, settings=settings, loss=loss,
                     progress=not (quiet or json), force=force)
    show_run(run, json)
