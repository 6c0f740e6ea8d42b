"""`deploytool train`, `deploytool report`, `deploytool study`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from deploytool.cli.options import Json, OutDir, Quiet
from deploytool.cli.render import console, print_json, table

app = typer.Typer()


def _opt(help: str, *names: str):
    return typer.Option(*names, help=help)


@app.command()
def train(
    recipe: Annotated[Optional[str], _opt("Recipe TOML (path or built-in name, e.g. digits-4); flags override it.",
                                          "--recipe", "-r")] = None,
    model: Annotated[Optional[str], _opt("Built-in model.", "--model")] = None,
    dataset: Annotated[Optional[str], _opt("digits, blobs, or a path to an .npz (arrays x, y).", "--dataset")] = None,
    experts: Annotated[Optional[int], _opt("Number of experts (>= 2; 2 with --router sigmoid).", "--experts")] = None,
    router: Annotated[Optional[str], _opt("softmax, or sigmoid for a 1-logit binary router.", "--router")] = None,
    routing: Annotated[Optional[str], _opt("soft (blend) or gumbel (straight-through) in training.", "--routing")] = None,
    penalty: Annotated[Optional[str], _opt("frank (confidence penalty), entropy or none.", "--penalty")] = None,
    alpha: Annotated[Optional[float], _opt("Weight of the penalty (>= 0).", "--alpha")] = None,
    balance: Annotated[Optional[str], _opt("Load balancing: entropy, switch or none.", "--balance")] = None,
    beta: Annotated[Optional[float], _opt("Weight of the balance term (>= 0).", "--beta")] = None,
    temperature: Annotated[Optional[float], _opt("Router softmax temperature (> 0).", "--temperature")] = None,
    temperature_end: Annotated[Optional[float], _opt("Anneal the temperature to this value.", "--temperature-end")] = None,
    epochs: Annotated[Optional[int], _opt("Training epochs.", "--epochs")] = None,
    lr: Annotated[Optional[float], _opt("Adam learning rate.", "--lr")] = None,
    batch_size: Annotated[Optional[int], _opt("Batch size.", "--batch-size")] = None,
    seed: Annotated[Optional[int], _opt("Random seed.", "--seed")] = None,
    out: OutDir = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out directory.")] = False,
    json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Train a routed model with the confidence penalty; write a run directory."""
    from deploytool.training import train as run_training

    run = run_training(recipe, out, progress=not (quiet or json), force=force, model=model, dataset=dataset, experts=experts,
                       router=router, routing=routing, penalty=penalty, alpha=alpha, balance=balance, beta=beta,
                       temperature=temperature, temperature_end=temperature_end, epochs=epochs, lr=lr,
                       batch_size=batch_size, seed=seed)
    show_run(run, json)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A training run directory.")], json: Json = False) -> None:
    """Show the routing quality of a trained run."""
    from deploytool.metrics import report as load_report

    _show(load_report(run_dir), json)


@app.command()
def study(
    out: Annotated[Path, typer.Option("--out", "-o", help="Markdown file for the table (the model's section is "
                                      "replaced, others kept).")] = Path("docs/routing.md"),
    model: Annotated[str, typer.Option("--model", help="Built-in model whose recipe the study varies: "
                                       "routed-mlp, routed-cnn or moe-transformer.")] = "routed-mlp",
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per configuration.", min=1)] = 3,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Override the epochs of every run.")] = None,
    method: Annotated[Optional[list[str]], typer.Option("--method", help="Only this method (repeatable), e.g. "
                                                        "'frank penalty'.")] = None,
    balance: Annotated[Optional[list[str]], typer.Option("--balance", help="Only this balance term (repeatable), "
                                                         "e.g. 'batch entropy'.")] = None,
    json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Compare temperature-only, frank, entropy and Gumbel routing, each with every balance term, on digits."""
    from deploytool.penalty_study import study as run_study

    result = run_study(out, seeds=seeds, epochs=epochs, model=model, methods=method, balances=balance,
                       progress=not (quiet or json))
    if json:
        print_json(result)
    else:
        from rich.markdown import Markdown

        console().print(Markdown(result["markdown"]))


def show_run(run, json: bool) -> None:
    """Print a RunDir (of train or commit) as the routing-quality table, or as JSON."""
    _show({"run_dir": str(run.path), "plot": str(run.plot), "config": run.config, "metrics": run.metrics}, json)


def _show(result: dict, json: bool) -> None:
    if json:
        print_json(result)
        return
    from deploytool.metrics import SUMMARY_KEYS

    m = result["metrics"]
    con = console()
    con.print(table(f"routing quality: {result['run_dir']}", ["metric", "value"],
                    [(k, m[k]) for k in SUMMARY_KEYS if k in m]))
    routers = m.get("routers") or {}
    if len(routers) > 1 or any(r.get("decisions", 0) > m.get("n_test", 0) for r in routers.values()):
        con.print(table("per router (every decision: one per sample, or one per token)",
                        ["router", "decisions", "confident", "mean max prob", "min expert load", "expert load"],
                        [(path, r["decisions"], f"{r['frac_confident']:.1%}", f"{r['mean_max_prob']:.3f}",
                          f"{r['min_expert_load']:.1%}", " ".join(f"{x:.0%}" for x in r["expert_load"]))
                         for path, r in routers.items()]))
    if result.get("plot"):
        con.print(f"plot: {result['plot']}")
