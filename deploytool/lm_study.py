"""The language-model study: the ways a top-k MoE language model is made top-1, compared at one budget.

From the same top-k model (a transformers save_pretrained folder, an LM run of one, or a from_hf module) and
at the same budget (steps or tokens), per seed: *naive* (k = 1, nothing trained), *plain top-1 fine-tuning*
(lm.fit_lm at k = 1: the LM loss alone), *commit, no distillation* (lm.commit_lm, distill 0) and *commit*
(lm.commit_lm as `deploytool commit` ships it). Writes its section of docs/routing.md (study_doc: the other
sections are kept): a per-seed table and a worst-seed table, perplexities as ratios to the top-k original,
the confident share per layer and the least expert load. benchmarks/lm_commit_study.py takes its rows from
here, with the MORE_METHODS rows of docs/routing.md's measured table.

Every call into fit_lm / commit_lm is in `_fit_top1` and `_commit`, one helper per method.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from deploytool.errors import BadInput

#: name -> (kind, options of that kind): the four ways a top-k model is made top-1
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "naive (k = 1)": ("naive", {}),
    "plain top-1 fine-tuning": ("fit", {}),
    "commit, no distillation": ("commit", {"distill": 0.0}),
    "**commit** (distillation, default)": ("commit", {}),
}
#: the rows docs/routing.md's measured table adds (benchmarks/lm_commit_study.py)
MORE_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    # the plain model measured at commit's deployed temperature (runs after "plain top-1 fine-tuning")
    "plain top-1 fine-tuning, temperature then set to 0.05": ("cold", {"temperature": 0.05}),
    # commit_lm as plain top-1 fine-tuning with distillation: no penalty, no guard, no anneal
    "plain top-1 fine-tuning + distillation": ("commit", {"alpha": 0.0, "guard": 0.0, "temperature_end": 1.0,
                                                          "straight_through": False}),
}
ALL_METHODS = {**METHODS, **MORE_METHODS}
#: the reference row: the top-k model as it is
ORIGINAL = "top-{k} original"
#: plain top-1 fine-tuning's learning rate (commit's is lm.COMMIT_LR)
PLAIN_LR = 1e-3


# --- the calls into fit and commit: one helper per method ----------------------------------------------

def _fit_top1(model: Any, train: Any, held: Any, out: Path, *, steps: int, seed: int, run: dict[str, Any]) -> Any:
    """Plain top-1 fine-tuning: lm.fit_lm at k = 1 (the LM loss alone, the routers' own losses)."""
    from deploytool.lm import LMSettings, fit_lm

    loop = LMSettings(seq_len=run["seq_len"], batch_size=run["batch_size"], steps=steps, lr=PLAIN_LR, seed=seed)
    return fit_lm(model, train, out=out, loop=loop, top_k=1, test_data=held, eval_tokens=run["eval_tokens"],
                  force=True, progress=False)


#: the options of a method that change commit's routing loss rather than its settings
_LOSS_OPTIONS = ("penalty", "alpha", "balance", "beta")


def _commit(model: Any, train: Any, held: Any, out: Path, *, steps: int, seed: int, run: dict[str, Any],
            **options: Any) -> Any:
    """lm.commit_lm with `options` (LMCommitSettings fields, or routing-loss ones) over its defaults."""
    from deploytool.lm import LMCommitSettings, commit_lm

    loss = LMCommitSettings.default_loss(**{k: v for k, v in options.items() if k in _LOSS_OPTIONS})
    settings = LMCommitSettings(steps=steps, seed=seed, **run, **{k: v for k, v in options.items()
                                                                    if k not in _LOSS_OPTIONS})
    return commit_lm(model, train, out=out, settings=settings, loss=loss, test_data=held, force=True, progress=False)


# --- the study -----------------------------------------------------------------------------------------

def study_lm(model_or_path: Any, *, data: Any, out: str | Path | None = "docs/routing.md",
             seeds: int | list[int] = 1, steps: int | None = None, tokens: int | None = None,
             test_data: Any = None, test_fraction: float = 0.1, seq_len: int = 128, batch_size: int = 16,
             eval_tokens: int | None = None, methods: list[str] | None = None, name: str | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Make a top-k language model top-1 each of the METHODS ways per seed, at one budget; write the tables.

    Args:
        model_or_path: the top-k model: a save_pretrained folder, an LM run directory, or a module with
            deploytool top-k routers (from_hf; copied for every run, never trained itself).
        data: token data (.npz, .npy, .bin, a text file, a tokens.TokenStream).
        out: the markdown file whose `lm: NAME` section is replaced (others kept); None: write nothing.
        seeds: how many seeds (0..seeds-1), or the seeds themselves.
        steps: the budget of every trained row in optimizer steps (or `tokens`).
        tokens: the budget in training tokens.
        test_data: held-out token data (default: the last `test_fraction` of `data`).
        test_fraction: the share of `data` held out without `test_data`.
        seq_len: tokens per window.
        batch_size: windows per step.
        eval_tokens: held-out tokens measured (default metrics.LM_EVAL_TOKENS).
        methods: only these of METHODS or MORE_METHODS, in this order (default: the four METHODS).
        name: the section's name (default: the folder's, or the module's class).
        progress: draw a progress bar over the runs.

    Returns:
        {"path", "name", "steps", "rows": {seed: [row]}, "worst": [row], "markdown"}; a row holds method,
        perplexity, ratio (to the top-k original), confident (per layer), min_load, seconds (CPU, None
        where nothing was timed).

    Raises:
        BadInput: a built-in model's name, a model without top-k routers, bad token data (a model file
            included), a bad budget or setting, an `out` that cannot be written: all before any training.
    """
    from deploytool.lm import LMSettings, budget_steps
    from deploytool.metrics import LM_EVAL_TOKENS
    from deploytool.penalty_study import MAX_SEEDS, RECIPES
    from deploytool.progress import progress_bar
    from deploytool.study_doc import check_out, pick, write_section
    from deploytool.tokens import load_tokens, split_tokens

    if isinstance(model_or_path, str) and model_or_path in RECIPES and not Path(model_or_path).exists():
        raise BadInput(f"{model_or_path} is a built-in model: its study varies its recipe and takes no token data "
                       "(drop --data), or give a Hugging Face MoE folder or an LM run")
    names = pick(methods or list(METHODS), ALL_METHODS, "method")
    kinds = [ALL_METHODS[m][0] for m in names]
    if "cold" in kinds and ("fit" not in kinds or kinds.index("fit") > kinds.index("cold")):
        raise BadInput("the temperature-set row measures the plain top-1 fine-tuning run: list "
                       "'plain top-1 fine-tuning' before it")
    seed_list = list(range(seeds)) if isinstance(seeds, int) and not isinstance(seeds, bool) else list(seeds)
    if not seed_list or len(seed_list) > MAX_SEEDS or any(isinstance(s, bool) or not isinstance(s, int) or s < 0
                                                           for s in seed_list):
        raise BadInput(f"seeds must be a whole number from 1 to {MAX_SEEDS}, or seeds >= 0, got {seeds!r}")
    steps = budget_steps(steps, tokens, seq_len=seq_len, batch_size=batch_size)
    LMSettings(seq_len=seq_len, steps=steps, batch_size=batch_size)  # every run's loop settings, checked now
    path = Path(model_or_path) if isinstance(model_or_path, (str, Path)) else None
    original = _open(model_or_path)
    doc, existing = check_out(out) if out is not None else (None, None)
    tokenizer = path
    train, held = split_tokens(load_tokens(data, tokenizer=tokenizer), test_data, test_fraction=test_fraction,
                               tokenizer=tokenizer)
    name = name or (path.resolve().name if path is not None else type(original).__name__)
    run = {"seq_len": seq_len, "batch_size": batch_size, "eval_tokens": eval_tokens or LM_EVAL_TOKENS}
    source = path if path is not None else original
    reference = _reference_row(original, held, run)  # the same for every seed: measured once
    rows: dict[int, list[dict[str, Any]]] = {}
    with (tempfile.TemporaryDirectory(prefix="deploytool-lm-study-") as tmp,
          progress_bar("lm study runs", len(seed_list) * len(names), progress) as advance):
        for seed in seed_list:
            rows[seed] = _seed_rows(source, reference, train, held, Path(tmp) / f"s{seed}", names, steps=steps,
                                    seed=seed, run=run, advance=advance)
    worst = _worst(rows)
    section = to_markdown(rows, worst, name=name, steps=steps, batch_size=batch_size, seq_len=seq_len,
                          train=train.name, held=held.name, when=time.strftime("%Y-%m-%d"))
    if doc is not None:
        write_section(doc, existing, section, section_name(name))
    return {"path": None if doc is None else str(doc), "name": name, "steps": steps, "rows": rows, "worst": worst,
            "markdown": section}


def section_name(name: str) -> str:
    """The study document's section of a language model's study."""
    return f"lm: {name}"


def _open(model_or_path: Any) -> Any:
    """The model (opened from its path), refused unless it has top-k routers."""
    from deploytool.metrics import router_k
    from deploytool.nn import named_routers

    if isinstance(model_or_path, (str, Path)):
        from deploytool.checkpoints import open_module

        model = open_module(Path(model_or_path)).module
    else:
        model = model_or_path
    if not any(hasattr(r, "set_top_k") for _, r in named_routers(model)):
        raise BadInput(f"{type(model).__name__} has no top-k router to make top-1: give a Hugging Face MoE folder, "
                       "an LM run of one, or a from_hf model")
    router_k(model)
    return model


def _fresh(source: Any) -> Any:
    """A model a run may train: the path itself (fit_lm and commit_lm open it), or a trainable copy."""
    if isinstance(source, Path):
        return source
    from deploytool.lm import _frozen_copy

    copy = _frozen_copy(source)
    for mine, theirs in zip(copy.parameters(), source.parameters()):
        mine.requires_grad_(theirs.requires_grad)
    return copy


def _reference_row(original: Any, held: Any, run: dict[str, Any]) -> dict[str, Any]:
    """The top-k original's row: its perplexity at its own k, the reference of every ratio."""
    from deploytool.metrics import lm_metrics, router_k

    k = router_k(original)
    ref = lm_metrics(original, held, original_k=k, seq_len=run["seq_len"], max_tokens=run["eval_tokens"])
    perplexity = ref["topk_perplexity"]
    return {**row(ORIGINAL.format(k=k), {**ref, "perplexity": perplexity}, None, perplexity),
            "confident": None, "min_load": None}


def _seed_rows(source: Any, first: dict[str, Any], train: Any, held: Any, work: Path, names: list[str], *,
               steps: int, seed: int, run: dict[str, Any], advance: Any) -> list[dict[str, Any]]:
    """The reference row `first` and one row per method for one seed."""
    from deploytool.checkpoints import open_module
    from deploytool.hf import set_top_k
    from deploytool.metrics import lm_metrics
    from deploytool.nn import set_temperature

    measure = {"seq_len": run["seq_len"], "max_tokens": run["eval_tokens"]}
    reference = first["perplexity"]
    rows = [dict(first)]
    plain_dir = None
    for i, name in enumerate(names):
        kind, options = ALL_METHODS[name]
        out = work / f"row{i}"
        t0 = time.process_time()
        if kind == "naive":
            model = _fresh(source)
            model = open_module(model).module if isinstance(model, Path) else model
            set_top_k(model, 1)
            rows.append(row(name, lm_metrics(model, held, **measure), 0.0, reference))
        elif kind == "cold":  # no training: the plain run's model at another temperature
            model = open_module(plain_dir).module
            set_temperature(model, options["temperature"])
            rows.append(row(name, lm_metrics(model, held, **measure), None, reference))
        else:
            if kind == "fit":
                done = _fit_top1(_fresh(source), train, held, out, steps=steps, seed=seed, run=run)
                plain_dir = out
            else:
                done = _commit(_fresh(source), train, held, out, steps=steps, seed=seed, run=run, **options)
            rows.append(row(name, done.metrics, time.process_time() - t0, reference))
        advance()
    return rows


def row(method: str, metrics: dict[str, Any], seconds: float | None, reference: float) -> dict[str, Any]:
    """A table row from an LM run's (or lm_metrics') metrics.

    Args:
        method: the row's name.
        metrics: the metrics (perplexity, routers).
        seconds: CPU seconds of the row, or None.
        reference: the top-k original's perplexity.

    Returns:
        {method, perplexity, ratio, confident {router: share}, min_load, loads {router: loads}, seconds}.
    """
    routers = metrics["routers"]
    return {"method": method, "perplexity": metrics["perplexity"], "ratio": metrics["perplexity"] / reference,
            "confident": {p: r["frac_confident"] for p, r in routers.items()},
            "min_load": min(r["min_expert_load"] for r in routers.values()),
            "loads": {p: r["expert_load"] for p, r in routers.items()}, "seconds": seconds}


def _worst(rows: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per method, the worst over seeds: the highest ratio, the least confident layer, the least load."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for seed_rows in rows.values():
        for r in seed_rows[1:]:
            by_method.setdefault(r["method"], []).append(r)
    worst = []
    for method, runs in by_method.items():
        timed = [r["seconds"] for r in runs if r["seconds"] is not None]
        worst.append({"method": method, "worst_ratio": max(r["ratio"] for r in runs),
                      "worst_confident": min(min(r["confident"].values()) for r in runs),
                      "worst_min_load": min(r["min_load"] for r in runs),
                      "mean_seconds": statistics.fmean(timed) if timed else None})
    return worst


def per_seed_table(rows: dict[int, list[dict[str, Any]]]) -> str:
    """The per-seed markdown table (docs/routing.md's measured table has this form).

    Args:
        rows: {seed: rows} of study_lm.

    Returns:
        The table.
    """
    layers = max(len(r["confident"]) for seed_rows in rows.values() for r in seed_rows if r["confident"])
    lines = [f"| seed | method | perplexity | x top-k | confident (layer {' / '.join(map(str, range(layers)))}) "
             "| min expert load | CPU s |", "|---|---|---|---|---|---|---|"]
    for seed, seed_rows in rows.items():
        for r in seed_rows:
            conf = " / ".join(["-"] * layers) if r["confident"] is None else \
                " / ".join(f"{v:.1%}" for v in r["confident"].values())
            load = "-" if r["min_load"] is None else f"{r['min_load']:.1%}"
            secs = "-" if r["seconds"] is None else f"{r['seconds']:.0f}"
            lines.append(f"| {seed} | {r['method']} | {r['perplexity']:.3f} | {r['ratio']:.3f} | {conf} | {load} | "
                         f"{secs} |")
    return "\n".join(lines)


def to_markdown(rows: dict[int, list[dict[str, Any]]], worst: list[dict[str, Any]], *, name: str, steps: int,
                batch_size: int, seq_len: int, train: str, held: str, when: str) -> str:
    """The study's section: what was run, the per-seed table, the worst-seed table, between its markers.

    Args:
        rows: {seed: rows}.
        worst: _worst's rows.
        name: the model's name.
        steps: the budget.
        batch_size: windows per step.
        seq_len: tokens per window.
        train: the training stream's name.
        held: the held-out stream's name.
        when: the date shown.

    Returns:
        The markdown section.
    """
    from deploytool.study_doc import section_markers

    begin, end = section_markers(section_name(name))
    seeds = ", ".join(map(str, rows))
    lines = [begin, f"## LM: {name}", "",
             f"Generated by `deploytool study --model {name} --data ...` on {when}: the top-k model made top-1 "
             f"at one budget, {steps} steps of {batch_size} x {seq_len} tokens ({steps * batch_size * seq_len} "
             f"tokens), seeds {seeds}; trained on {train}, measured on {held}. x top-k = perplexity / the top-k "
             "original's; confident = share of held-out tokens whose top routing probability is >= 0.9, per "
             "layer; min expert load = the least top-1 share of any expert in any layer; CPU s = "
             "`time.process_time()` of the row.", "", per_seed_table(rows), "",
             "Worst over the seeds:", "",
             "| method | worst x top-k | worst confident (least layer) | worst min expert load | mean CPU s |",
             "|---|---|---|---|---|"]
    for w in worst:
        secs = "-" if w["mean_seconds"] is None else f"{w['mean_seconds']:.0f}"
        lines.append(f"| {w['method']} | {w['worst_ratio']:.3f} | {w['worst_confident']:.1%} | "
                     f"{w['worst_min_load']:.1%} | {secs} |")
    lines.append(end)
    return "\n".join(lines)


# --- the CLI's one call ----------------------------------------------------------------------------------

def study(model: str, *, data: Any = None, out: str | Path = "docs/routing.md", seeds: int = 3,
          epochs: int | None = None, methods: list[str] | None = None, balances: list[str] | None = None,
          progress: bool = True, **lm_options: Any) -> dict[str, Any]:
    """`deploytool study`: a built-in model's penalty study (no `data`), or a language model's (token `data`).

    Args:
        model: a built-in model's name, or a Hugging Face MoE folder / LM run with `data`.
        data: token data: the language-model study (study_lm).
        out: the markdown file.
        seeds: seeds per configuration.
        epochs: the built-in study's epochs override.
        methods: only these methods (either study's names).
        balances: only these balance terms (the built-in study).
        progress: draw a progress bar.
        **lm_options: study_lm's options (steps, tokens, test_data, seq_len, batch_size, eval_tokens); None
            values are not given.

    Returns:
        penalty_study.study's or study_lm's result.

    Raises:
        BadInput: options of the other study, or what either study refuses (before any training).
    """
    lm_options = {k: v for k, v in lm_options.items() if v is not None}
    if data is None:
        if lm_options:
            raise BadInput(f"{', '.join(sorted(lm_options))}: language-model study options, given with token data "
                           "(--data)")
        from deploytool.penalty_study import RECIPES
        from deploytool.penalty_study import study as penalty_study

        if model not in RECIPES and Path(model).exists():
            raise BadInput(f"{model} is not a built-in model: a language model's study needs token data (--data)")
        return penalty_study(out, seeds=seeds, epochs=epochs, model=model, methods=methods, balances=balances,
                             progress=progress)
    given = [flag for flag, value in (("epochs", epochs), ("balance", balances)) if value]
    if given:
        raise BadInput(f"{', '.join(given)}: options of a built-in model's study, not of a language model's "
                       "(--data)")
    return study_lm(model, data=data, out=out, seeds=seeds, methods=methods, progress=progress, **lm_options)
