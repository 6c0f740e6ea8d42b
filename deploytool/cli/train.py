"""`deploytool train`, `deploytool fit` (language models), `deploytool report`, `deploytool study`."""

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
def report(
    run_dir: Annotated[Path, typer.Argument(help="A training run directory, or a Hugging Face MoE folder.")],
    data: Annotated[Optional[Path], typer.Option(
        "--data", help="A Hugging Face folder's token data to measure on (text, .npz, .npy or .bin).")] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window (Hugging Face folder).")] = 128,
    top_k: Annotated[Optional[int], typer.Option(
        "--top-k", help="Experts per token of the hard figures (Hugging Face folder; default 1).")] = None,
    json: Json = False,
) -> None:
    """Show the routing quality of a trained run, or measure a Hugging Face MoE folder's on token data."""
    from deploytool.metrics import report as load_report

    _show(load_report(run_dir, data=data, seq_len=seq_len, top_k=top_k), json)


@app.command()
def study(
    out: Annotated[Path, typer.Option("--out", "-o", help="Markdown file for the table (the model's section is "
                                      "replaced, others kept).")] = Path("docs/routing.md"),
    model: Annotated[str, typer.Option("--model", help="Built-in model whose recipe the study varies: "
                                       "routed-mlp, routed-cnn or moe-transformer; or, with --data, a Hugging "
                                       "Face MoE folder or an LM run made top-1 four ways.")] = "routed-mlp",
    data: Annotated[Optional[str], _opt("Token data of a language model's study (.npz, .npy, .bin or text).",
                                        "--data")] = None,
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per configuration.", min=1)] = 3,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Override the epochs of every run.")] = None,
    method: Annotated[Optional[list[str]], typer.Option("--method", help="Only this method (repeatable), e.g. "
                                                        "'frank penalty'.")] = None,
    balance: Annotated[Optional[list[str]], typer.Option("--balance", help="Only this balance term (repeatable), "
                                                         "e.g. 'batch entropy'.")] = None,
    steps: Annotated[Optional[int], _opt("LM study: the budget of every row in optimizer steps.", "--steps")] = None,
    tokens: Annotated[Optional[int], _opt("LM study: the budget in training tokens (instead of --steps).",
                                          "--tokens")] = None,
    test_data: Annotated[Optional[str], _opt("LM study: held-out tokens (default: the last 10% of --data).",
                                             "--test-data")] = None,
    seq_len: Annotated[Optional[int], _opt("LM study: tokens per window (128).", "--seq-len")] = None,
    batch_size: Annotated[Optional[int], _opt("LM study: windows per step (16).", "--batch-size")] = None,
    eval_tokens: Annotated[Optional[int], _opt("LM study: held-out tokens measured.", "--eval-tokens")] = None,
    json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Compare temperature-only, frank, entropy and Gumbel routing on digits; or, with --data, the ways a top-k
    language model is made top-1 (naive, plain fine-tuning, commit without and with distillation)."""
    from deploytool.lm_study import study as run_study

    result = run_study(model, data=data, out=out, seeds=seeds, epochs=epochs, methods=method, balances=balance,
                       progress=not (quiet or json), steps=steps, tokens=tokens, test_data=test_data,
                       seq_len=seq_len, batch_size=batch_size, eval_tokens=eval_tokens)
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
    from deploytool.metrics import LM_SUMMARY_KEYS, SUMMARY_KEYS

    m = result["metrics"]
    con = console()
    keys = (*LM_SUMMARY_KEYS[:2], "topk_perplexity", "original_k", *LM_SUMMARY_KEYS[2:], "heldout", "n_tokens") \
        if m.get("task") == "lm" else SUMMARY_KEYS
    con.print(table(f"routing quality: {result['run_dir']}", ["metric", "value"], [(k, m[k]) for k in keys if k in m]))
    if isinstance(m.get("before"), dict):
        con.print(table("before", ["metric", "value"], [(k, v) for k, v in m["before"].items()
                                                           if isinstance(v, (int, float, str))]))
    routers = m.get("routers") or {}
    if m.get("task") == "lm" or len(routers) > 1 or any(r.get("decisions", 0) > m.get("n_test", 0)
                                                        for r in routers.values()):
        con.print(table("per router (every decision: one per sample, or one per token)",
                        ["router", "decisions", "confident", "mean max prob", "min expert load", "expert load"],
                        [(path, r["decisions"], f"{r['frac_confident']:.1%}", f"{r['mean_max_prob']:.3f}",
                          f"{r['min_expert_load']:.1%}", " ".join(f"{x:.0%}" for x in r["expert_load"]))
                         for path, r in routers.items()]))
    if result.get("plot"):
        con.print(f"plot: {result['plot']}")


@app.command()
def fit(
    model: Annotated[Path, typer.Argument(help="A language model: a transformers save_pretrained folder (MoE) or "
                                          "a run directory of one.")],
    data: Annotated[str, typer.Option("--data", help="Token ids (.npz with 'ids', .npy, .bin of uint16) or a text "
                                      "file (the folder's tokenizer, else bytes).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The run directory to write.")],
    test_data: Annotated[Optional[str], _opt("Held-out tokens (default: the last --test-fraction of --data).",
                                             "--test-data")] = None,
    test_fraction: Annotated[float, _opt("Share of --data held out without --test-data.", "--test-fraction")] = 0.1,
    seq_len: Annotated[int, _opt("Tokens per window.", "--seq-len")] = 128,
    steps: Annotated[Optional[int], _opt("Budget in optimizer steps.", "--steps")] = None,
    tokens: Annotated[Optional[int], _opt("Budget in training tokens (instead of --steps).", "--tokens")] = None,
    batch_size: Annotated[int, _opt("Windows per step.", "--batch-size")] = 16,
    lr: Annotated[float, _opt("AdamW learning rate (warmup, cosine decay).", "--lr")] = 1e-3,
    top_k: Annotated[Optional[int], _opt("Experts per token while training (default: the model's own).",
                                         "--top-k")] = None,
    penalty: Annotated[Optional[str], _opt("Set the routers' loss: frank, entropy or none (default: keep theirs).",
                                           "--penalty")] = None,
    alpha: Annotated[float, _opt("Weight of the penalty.", "--alpha")] = 0.0,
    balance: Annotated[str, _opt("Balance term with --penalty: entropy, switch or none.", "--balance")] = "switch",
    beta: Annotated[float, _opt("Weight of the balance term.", "--beta")] = 0.01,
    temperature: Annotated[float, _opt("Router temperature at the start.", "--temperature")] = 1.0,
    temperature_end: Annotated[Optional[float], _opt("Anneal the temperature to this value.",
                                                     "--temperature-end")] = None,
    checkpoint_every: Annotated[int, _opt("Write <out>.checkpoint every N steps (0: only on Ctrl-C).",
                                          "--checkpoint-every")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from <out>.checkpoint.")] = False,
    seed: Annotated[int, _opt("Random seed.", "--seed")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace a run directory at --out.")] = False,
    json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Train a language model with deploytool routers on token data; write a run directory."""
    from deploytool.lm import LMSettings, fit_lm, routing_loss

    loop = LMSettings(seq_len=seq_len, steps=steps, tokens=tokens, batch_size=batch_size, lr=lr, seed=seed,
                      temperature=temperature, temperature_end=temperature_end, checkpoint_every=checkpoint_every)
    loss = routing_loss(penalty=penalty, alpha=alpha, balance=balance, beta=beta) if penalty is not None else None
    run = fit_lm(model, data, out=out, loop=loop, loss=loss, top_k=top_k, test_data=test_data,
                 test_fraction=test_fraction, resume=resume, progress=not (quiet or json), force=force)
    show_run(run, json)
