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


def report(run_dir: str | Path) -> dict[str, Any]:
    """The routing-quality figures of a run directory, with the paths of its artifacts.

    Args:
        run_dir: a run directory of `train`, `fit` or `commit`.

    Returns:
        {"run_dir", "plot" (None when absent), "config", "metrics"}.

    Raises:
        BadInput: not a run directory, a config.json check_run_config refuses, no metrics.json, or one
            that lacks a summary figure or holds one that is not a finite number (each named).
    """
    from deploytool import io
    from deploytool.artifacts import is_finite_number, load_run
    from deploytool.errors import BadInput

    run = load_run(run_dir)
    source = run.path / io.METRICS_FILE
    if not run.metrics:
        raise BadInput(f"{run.path} has no {io.METRICS_FILE}; train into it first")
    missing = [k for k in SUMMARY_KEYS if k not in run.metrics]
    if missing:
        raise BadInput(f"{source} is not a deploytool metrics file (lacks {', '.join(missing)})")
    for key in SUMMARY_KEYS:
        value = run.metrics[key]
        values = value if key == "expert_load" and isinstance(value, list) and value else [value]
        if not all(is_finite_number(v) for v in values):
            wanted = "a non-empty list of finite numbers" if key == "expert_load" else "a finite number"
            raise BadInput(f"{source}: {key}={value!r} must be {wanted}")
    return {"run_dir": str(run.path), "plot": str(run.plot) if run.plot.exists() else None,
            "config": run.config, "metrics": run.metrics}


SUMMARY_KEYS = ("soft_accuracy", "hard_accuracy", "hard_soft_gap", "mean_max_prob", "frac_confident",
                "min_expert_load", "routing_entropy", "expert_load")
