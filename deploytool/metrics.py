"""Routing quality of a trained model: hard vs soft accuracy, confidence, expert load, and its plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

CONFIDENT = 0.99


def routing_metrics(model, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Evaluate `model` on (x, y) with soft and with hard routing; everything the report shows.

    Confidence and expert load are measured per router over every decision it makes (each row, or
    each token of a token-level router) under hard routing, and summarised over all routers: the
    share of confident decisions overall, the smallest expert load of any router. The class-by-expert
    counts and the plot's load panel are those of the first router.

    Args:
        model: a module with deploytool routers whose forward takes `x` and returns class logits first.
        x: inputs, batch first, in the model's input shape.
        y: int class labels, one per sample.

    Returns:
        The metrics dict (`routers` holds the per-router figures by module path).

    Raises:
        BadInput: a model without routers (nothing was recorded).
    """
    import torch

    from deploytool.model_io import primary_output
    from deploytool.nn import named_routers, record_routing, routing_mode

    model.eval()
    x = np.ascontiguousarray(x)
    xt = torch.from_numpy(x.astype(np.float32, copy=False) if x.dtype.kind == "f" else x.astype(np.int64, copy=False))
    with torch.no_grad():
        with routing_mode(model, "soft"):
            soft = primary_output(model(xt))
        with routing_mode(model, "hard"), record_routing(model) as calls:
            hard = primary_output(model(xt))
    soft_acc = float((soft.argmax(1).numpy() == y).mean())
    hard_acc = float((hard.argmax(1).numpy() == y).mean())
    routers = {path: _router_metrics(calls[path][-1], y) for path, _ in named_routers(model) if calls[path]}
    if not routers:
        from deploytool.errors import BadInput

        raise BadInput(f"{type(model).__name__} made no routing decision: it has no deploytool Router in use")
    first = next(iter(routers.values()))
    max_probs = np.concatenate([r.pop("_max_prob") for r in routers.values()])
    return {
        "soft_accuracy": soft_acc,
        "hard_accuracy": hard_acc,
        "hard_soft_gap": soft_acc - hard_acc,
        "mean_max_prob": float(max_probs.mean()),
        "frac_confident": float((max_probs >= CONFIDENT).mean()),
        "expert_load": first["expert_load"],
        "min_expert_load": min(r["min_expert_load"] for r in routers.values()),
        "routing_entropy": float(np.mean([r["routing_entropy"] for r in routers.values()])),
        "n_test": int(len(y)),
        "class_expert_counts": first["class_expert_counts"],
        "max_prob_histogram": np.histogram(max_probs, bins=20, range=(0.0, 1.0))[0].tolist(),
        "routers": routers,
    }


def _router_metrics(routing, y: np.ndarray) -> dict[str, Any]:
    """One router's figures from its hard-routing output; a sample's label counts for each of its positions."""
    probs = routing.probs.double().numpy().reshape(len(y), -1, routing.probs.shape[-1])
    index = routing.index.numpy().reshape(len(y), -1)
    n_experts = probs.shape[-1]
    max_prob = probs.max(axis=-1).ravel()
    load = np.bincount(index.ravel(), minlength=n_experts) / index.size
    flat = probs.reshape(-1, n_experts)
    row_entropy = -(flat * np.log(np.clip(flat, 1e-300, None))).sum(axis=1) / math.log(n_experts)
    classes = int(max(y.max() + 1, 1))
    per_class = np.zeros((classes, n_experts))
    np.add.at(per_class, (np.repeat(y, index.shape[1]), index.ravel()), 1)
    return {
        "decisions": int(index.size),
        "mean_max_prob": float(max_prob.mean()),
        "frac_confident": float((max_prob >= CONFIDENT).mean()),
        "expert_load": load.tolist(),
        "min_expert_load": float(load.min()),
        "routing_entropy": float(row_entropy.mean()),
        "class_expert_counts": per_class.astype(int).tolist(),
        "_max_prob": max_prob,
    }


def plot_routing(metrics: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Three panels: confidence histogram, expert load, class-by-expert routing.

    Args:
        metrics: what routing_metrics returns.
        path: the PNG to write (atomically).
        title: the figure's title (default: hard and soft accuracy).

    Returns:
        `path`.

    Raises:
        KeyError: metrics lacking the figures routing_metrics writes.
    """
    from matplotlib.figure import Figure  # no pyplot: a caller's matplotlib backend is left alone

    from deploytool.io import atomic_path

    fig = Figure(figsize=(14, 4.2))
    axes = fig.subplots(1, 3)
    hist = np.asarray(metrics["max_prob_histogram"])
    edges = np.linspace(0, 1, len(hist) + 1)
    axes[0].bar(edges[:-1], hist, width=edges[1] - edges[0], align="edge", color="#4477aa")
    axes[0].axvline(CONFIDENT, color="#cc3311", ls="--", label=f"p = {CONFIDENT}")
    axes[0].set(title=f"router confidence ({metrics['frac_confident']:.1%} >= {CONFIDENT})",
                xlabel="max routing probability", ylabel="test samples (log)", yscale="log")
    axes[0].legend(loc="upper left")
    load = np.asarray(metrics["expert_load"])
    axes[1].bar(range(len(load)), load, color="#228833")
    axes[1].axhline(1 / len(load), color="grey", ls=":", label="even share")
    axes[1].set(title="expert load (hard routing)", xlabel="expert", ylabel="share of test samples",
                xticks=range(len(load)))
    axes[1].legend()
    counts = np.asarray(metrics["class_expert_counts"])
    im = axes[2].imshow(counts, aspect="auto", cmap="viridis")
    axes[2].set(title="which expert each class goes to", xlabel="expert", ylabel="class",
                xticks=range(counts.shape[1]), yticks=range(counts.shape[0]))
    fig.colorbar(im, ax=axes[2], label="samples")
    fig.suptitle(title or (f"hard acc {metrics['hard_accuracy']:.3f} vs soft {metrics['soft_accuracy']:.3f}"))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    return Path(path)


def report(run_dir: str | Path, *, data: str | Path | None = None, seq_len: int = 128,
           top_k: int | None = None) -> dict[str, Any]:
    """The routing-quality figures of a run directory, with the paths of its artifacts; or those of a
    Hugging Face MoE folder, measured on token data.

    Args:
        run_dir: a run directory of `train`, `fit` or `commit` (a language model's metrics: LM_SUMMARY_KEYS),
            or a transformers save_pretrained folder (measured now, on `data`).
        data: for a Hugging Face folder: token data (see deploytool.tokens; a text file is tokenised by
            the folder's tokenizer, else read as bytes).
        seq_len: for a Hugging Face folder: tokens per window.
        top_k: for a Hugging Face folder: experts per token its hard figures use (None: 1, what a
            committed deployment runs; the model's own k gives `topk_perplexity`).

    Returns:
        {"run_dir", "plot" (None when absent), "config", "metrics"}.

    Raises:
        BadInput: not a run directory, a config.json check_run_config refuses, no metrics.json, or one
            that lacks a summary figure or holds one that is not a finite number (each named); a Hugging
            Face folder without token data.
    """
    from deploytool import io
    from deploytool.artifacts import HFFolder, folder_config, is_finite_number, is_hf_config, load_run
    from deploytool.errors import BadInput

    config = folder_config(run_dir)  # config.json read once
    if is_hf_config(config):
        return _folder_report(HFFolder(Path(run_dir), config), data, seq_len, top_k)
    if data is not None:
        raise BadInput(f"token data is measured for a Hugging Face folder; {run_dir} is a run, whose metrics "
                       "were measured when it was trained")
    run = load_run(run_dir, config=config)
    source = run.path / io.METRICS_FILE
    if not run.metrics:
        raise BadInput(f"{run.path} has no {io.METRICS_FILE}; train into it first")
    keys = LM_SUMMARY_KEYS if run.metrics.get("task") == "lm" else SUMMARY_KEYS
    missing = [k for k in keys if k not in run.metrics]
    if missing:
        raise BadInput(f"{source} is not a deploytool metrics file (lacks {', '.join(missing)})")
    for key in keys:
        value = run.metrics[key]
        values = value if key == "expert_load" and isinstance(value, list) and value else [value]
        if not all(is_finite_number(v) for v in values):
            wanted = "a non-empty list of finite numbers" if key == "expert_load" else "a finite number"
            raise BadInput(f"{source}: {key}={value!r} must be {wanted}")
    return {"run_dir": str(run.path), "plot": str(run.plot) if run.plot.exists() else None,
            "config": run.config, "metrics": run.metrics}


def _folder_report(opened: Any, data: str | Path | None, seq_len: int, top_k: int | None) -> dict[str, Any]:
    """LM metrics of a save_pretrained folder on `data`, at its own k and at `top_k` (default 1)."""
    from deploytool.checkpoints import open_module
    from deploytool.errors import BadInput
    from deploytool.hf import set_top_k
    from deploytool.moe import TopKRouting
    from deploytool.tokens import check_seq_len, load_tokens

    folder = opened.path
    if data is None:
        raise BadInput(f"{folder} is a Hugging Face folder, with no training metrics: give token data to "
                       "measure its routing on (a text file, .npz, .npy or .bin of ids)")
    seq_len = check_seq_len(seq_len)
    model = open_module(opened).module
    own_k = max(r.k for r in model.modules() if isinstance(r, TopKRouting))
    stream = load_tokens(data, tokenizer=folder)
    set_top_k(model, 1 if top_k is None else top_k)
    metrics = lm_metrics(model, stream, seq_len=seq_len, original_k=own_k)
    return {"run_dir": str(folder), "plot": None, "config": {"model_type": model.config.model_type,
                                                             "top_k": own_k}, "metrics": metrics}


SUMMARY_KEYS = ("soft_accuracy", "hard_accuracy", "hard_soft_gap", "mean_max_prob", "frac_confident",
                "min_expert_load", "routing_entropy", "expert_load")


# --- language models ----------------------------------------------------------------------------------

#: a token's routing is confident when its top probability reaches this, at the deployed temperature
LM_CONFIDENT = 0.9
#: the held-out tokens an LM is measured on, by default (bounded whatever the corpus' size)
LM_EVAL_TOKENS = 1 << 15
LM_SUMMARY_KEYS = ("perplexity", "soft_perplexity", "mean_max_prob", "frac_confident", "min_frac_confident",
                   "min_expert_load", "expert_load")


def lm_logits(model, ids):
    """Next-token logits [B, T, V] of a causal LM (a transformers model or a module returning logits first).

    Args:
        model: the language model.
        ids: int64 token ids [B, T].

    Returns:
        The logits tensor.
    """
    from deploytool.hf import call_options
    from deploytool.model_io import primary_output

    out = model(ids, **call_options(model))
    logits = getattr(out, "logits", None)
    return logits if logits is not None else primary_output(out)


def model_vocab(model) -> int | None:
    """The vocabulary of a transformers model's config (None for other modules)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(vocab) if isinstance(vocab, int) and vocab > 0 else None


def router_k(model) -> int:
    """The most experts any router of `model` picks per position (1 for deploytool Routers)."""
    from deploytool.nn import named_routers

    return max((int(getattr(r, "k", 1)) for _, r in named_routers(model)), default=1)


def routing_as(model, how: str | int):
    """Temporarily route every router of `model` "hard" (top-1), "soft" (every expert weighted by its
    probability) or with k experts (an int): top-k routers get a rule, RoutedExperts a routing mode.

    Args:
        model: a module with deploytool routers.
        how: "hard", "soft" or k.

    Returns:
        A context manager restoring every router on exit.
    """
    import contextlib
    from dataclasses import replace

    from deploytool.nn import named_routers, routing_mode

    @contextlib.contextmanager
    def manage():
        topk = [r for _, r in named_routers(model) if hasattr(r, "rule")]
        saved = [r.rule for r in topk]
        for r in topk:
            if how == "soft":
                r.rule = replace(r.rule, k=r.n_experts, combine="prob", groups=None)
            else:
                r.rule = r.rule.with_k(1 if how == "hard" else min(int(how), r.n_experts))
        try:
            with routing_mode(model, "soft" if how == "soft" else "hard"):
                yield
        finally:
            for r, rule in zip(topk, saved):
                r.rule = rule
    return manage()


def lm_metrics(model, stream, *, seq_len: int, max_tokens: int = LM_EVAL_TOKENS, batch_size: int = 8,
               original_k: int | None = None) -> dict[str, Any]:
    """Perplexity and routing quality of a language model on held-out tokens, per router.

    Perplexity is measured three ways: hard (every router picks its top-1 expert: what a committed model
    deploys), soft (every expert weighted by its probability) and, when `original_k` > 1, with the
    routers picking that many (an imported top-k model's own routing). Confidence (top probability >=
    LM_CONFIDENT at each router's current temperature) and expert loads (top-1 choices) are per router,
    over every token, under hard routing.

    Args:
        model: a causal LM with deploytool routers (e.g. converted by from_hf).
        stream: the held-out tokens.TokenStream.
        seq_len: tokens per window.
        max_tokens: at most this many held-out tokens are read (evenly spaced windows).
        batch_size: windows per forward.
        original_k: the routers' k before a commit (default: their current k).

    Returns:
        The metrics dict ("task": "lm"; `routers` holds the per-router figures by module path).

    Raises:
        BadInput: a model that made no routing decision, or ids outside its vocabulary.
    """
    import torch

    from deploytool.errors import BadInput
    from deploytool.nn import named_routers, record_routing
    from deploytool.tokens import IGNORE, eval_starts, window_batch

    original_k = original_k or router_k(model)
    rank, world = _rank_world()
    starts = eval_starts(stream, seq_len, max_tokens)[rank::world]  # under torchrun each rank its share
    vocab = model_vocab(model)
    was_training = model.training
    model.eval()
    modes: list[tuple[str, str | int]] = [("perplexity", "hard"), ("soft_perplexity", "soft")]
    if original_k > 1:
        modes.append(("topk_perplexity", original_k))
    nll = {name: 0.0 for name, _ in modes}
    count = 0
    per_router: dict[str, dict[str, Any]] = {}
    try:
        with torch.no_grad():
            for i in range(0, len(starts), batch_size):
                ids, labels = (torch.from_numpy(a) for a in window_batch(stream, starts[i:i + batch_size], seq_len,
                                                                         vocab))
                count += int((labels != IGNORE).sum())
                for name, how in modes:
                    with routing_as(model, how), record_routing(model) as calls:
                        logits = lm_logits(model, ids)
                        nll[name] += float(torch.nn.functional.cross_entropy(
                            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE,
                            reduction="sum"))
                        if how == "hard":
                            for path, outs in calls.items():
                                for routing in outs:
                                    _accumulate(per_router.setdefault(path, {}), routing)
    finally:
        model.train(was_training)
    if not per_router:
        raise BadInput(f"{type(model).__name__} made no routing decision: it has no deploytool router in use")
    if world > 1:
        nll, count, per_router = _all_reduced(nll, count, per_router)
    routers = {path: _finish(acc) for path, acc in per_router.items()}
    temps = {path: float(r.temperature) for path, r in named_routers(model)}
    for path, r in routers.items():
        r["temperature"] = temps.get(path)
    loads = [r["expert_load"] for r in routers.values()]
    decisions = sum(r["decisions"] for r in routers.values())
    metrics = {"task": "lm", "n_tokens": count, "seq_len": seq_len, "original_k": original_k,
               **{name: math.exp(total / max(count, 1)) for name, total in nll.items()},
               "mean_max_prob": sum(r["mean_max_prob"] * r["decisions"] for r in routers.values()) / decisions,
               "frac_confident": sum(r["frac_confident"] * r["decisions"] for r in routers.values()) / decisions,
               "min_frac_confident": min(r["frac_confident"] for r in routers.values()),
               "min_expert_load": min(r["min_expert_load"] for r in routers.values()),
               "expert_load": loads[0], "confident_at": LM_CONFIDENT, "routers": routers}
    metrics["hard_soft_gap"] = metrics["perplexity"] / metrics["soft_perplexity"] - 1
    return metrics


def _rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed process group, else (0, 1)."""
    import torch

    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduced(nll: dict[str, float], count: int, per_router: dict[str, dict[str, Any]]):
    """The sums of every rank: log-likelihoods, token counts, each router's counts (float64, in one all-reduce)."""
    import torch

    names, paths = sorted(nll), sorted(per_router)
    parts = [np.array([nll[n] for n in names] + [count], np.float64)]
    for path in paths:
        acc = per_router[path]
        parts += [np.asarray(acc["counts"], np.float64), np.asarray(acc["hist"], np.float64),
                  np.array([acc["confident"], acc["sum_max"], acc["n"]], np.float64)]
    flat = torch.from_numpy(np.concatenate(parts))
    torch.distributed.all_reduce(flat)
    values = flat.numpy()
    nll = dict(zip(names, values[:len(names)].tolist()))
    count = int(round(values[len(names)]))
    at = len(names) + 1
    for path in paths:
        acc = per_router[path]
        n_experts, bins = len(acc["counts"]), len(acc["hist"])
        acc["counts"] = values[at:at + n_experts]
        acc["hist"] = values[at + n_experts:at + n_experts + bins]
        acc["confident"], acc["sum_max"], acc["n"] = values[at + n_experts + bins:at + n_experts + bins + 3]
        acc["n"] = int(round(acc["n"]))
        at += n_experts + bins + 3
    return nll, count, per_router


def _accumulate(acc: dict[str, Any], routing) -> None:
    probs = routing.probs.detach().double().reshape(-1, routing.probs.shape[-1])
    index = routing.index.reshape(len(probs), -1)[:, 0]  # hard routing: one decision per token
    top = probs.max(dim=-1).values.numpy()
    n = probs.shape[-1]
    acc["counts"] = acc.get("counts", 0) + np.bincount(index.numpy(), minlength=n)
    acc["hist"] = acc.get("hist", 0) + np.histogram(top, bins=20, range=(0.0, 1.0))[0]
    acc["confident"] = acc.get("confident", 0) + int((top >= LM_CONFIDENT).sum())
    acc["sum_max"] = acc.get("sum_max", 0.0) + float(top.sum())
    acc["n"] = acc.get("n", 0) + len(top)


def _finish(acc: dict[str, Any]) -> dict[str, Any]:
    load = acc["counts"] / max(acc["n"], 1)
    return {"decisions": int(acc["n"]), "mean_max_prob": acc["sum_max"] / max(acc["n"], 1),
            "frac_confident": acc["confident"] / max(acc["n"], 1), "expert_load": load.tolist(),
            "min_expert_load": float(load.min()), "max_prob_histogram": acc["hist"].astype(int).tolist()}


def plot_lm_routing(metrics: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """One row per router (layer): its confidence histogram and its expert loads.

    Args:
        metrics: what lm_metrics returns.
        path: the PNG to write (atomically).
        title: the figure's title.

    Returns:
        `path`.
    """
    from matplotlib.figure import Figure

    from deploytool.io import atomic_path

    routers = metrics["routers"]
    fig = Figure(figsize=(11, 2.6 * len(routers) + 0.6))
    axes = fig.subplots(len(routers), 2, squeeze=False)
    for (name, r), (left, right) in zip(routers.items(), axes):
        hist = np.asarray(r["max_prob_histogram"])
        edges = np.linspace(0, 1, len(hist) + 1)
        left.bar(edges[:-1], hist, width=edges[1] - edges[0], align="edge", color="#4477aa")
        left.axvline(LM_CONFIDENT, color="#cc3311", ls="--")
        left.set(title=f"{name}: {r['frac_confident']:.1%} of tokens >= {LM_CONFIDENT}", yscale="log",
                 xlabel="top routing probability", ylabel="tokens (log)")
        load = np.asarray(r["expert_load"])
        right.bar(range(len(load)), load, color="#228833")
        right.axhline(1 / len(load), color="grey", ls=":")
        right.set(title=f"{name}: expert load (top-1), min {load.min():.1%}", xlabel="expert",
                  ylabel="share of tokens", xticks=range(len(load)))
    fig.suptitle(title or f"perplexity {metrics['perplexity']:.3f} (soft {metrics['soft_perplexity']:.3f})")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    return Path(path)
