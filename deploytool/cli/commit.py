"""`deploytool commit`: make an already trained (soft-routing) model commit to one expert."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deploytool.cli.options import Json, Quiet, Seed
from deploytool.finetune import ALPHA, BETA, GUARD, MODEL_EPOCHS, ROUTER_EPOCHS

app = typer.Typer()


@app.command()
def commit(
    run_dir: Annotated[Path, typer.Argument(help="A trained run directory (a built-in model).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The new run directory (never the input run).")],
    router_epochs: Annotated[int, typer.Option("--router-epochs", help="Stage 1 (off by default): routers "
                                               "only, temperature annealed.", min=0)] = ROUTER_EPOCHS,
    model_epochs: Annotated[int, typer.Option("--model-epochs", help="Stage 2: the whole model, temperature "
                                              "annealed to the final one.", min=0)] = MODEL_EPOCHS,
    alpha: Annotated[float, typer.Option("--alpha", help="Weight of the confidence penalty (>= 0).")] = ALPHA,
    beta: Annotated[float, typer.Option("--beta", help="Weight of the balance term (>= 0).")] = BETA,
    guard: Annotated[float, typer.Option("--guard", help="Weight of the load guard that keeps every expert "
                                         "that carried traffic alive (>= 0; 0: off).")] = GUARD,
    temperature_end: Annotated[float, typer.Option("--temperature-end", help="Final router temperature.")] = 0.02,
    seed: Seed = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out directory.")] = False,
    json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Fine-tune a trained model so that its routers commit to one expert; write a new run directory."""
    from deploytool.cli.train import show_run
    from deploytool.finetune import commit as run_commit

    run = run_commit(run_dir, out=out, router_epochs=router_epochs, model_epochs=model_epochs, alpha=alpha,
                     beta=beta, guard=guard, temperature_end=temperature_end, seed=seed,
                     progress=not (quiet or json), force=force)
    show_run(run, json)
