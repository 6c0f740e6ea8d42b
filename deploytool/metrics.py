"""Routing quality of a trained model: hard vs soft accuracy, confidence, expert load, and its plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

CONFIDENT = 0.99


def routing_metrics(model, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Evaluate `model` on (x, y) with soft and with hard routing; everything the report shows."""
    import torch

    from deploytool.nn import routing_mode

    model.eval()
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    with torch.no_grad():
        with routing_mode(model, "soft"):
            soft = model(xt)
        with routing_mode(model, "hard"):
            hard = model(xt)
    probs = hard.probs.double().numpy()
    index = hard.index.numpy()
    n_experts = probs.shape[1]
    max_prob = probs.max(axis=1)
    load = np.bincount(index, minlength=n_experts) / len(index)
    row_entropy = -(probs * np.log(np.clip(probs, 1e-300, None))).sum(axis=1) / math.log(n_experts)
    soft_acc = float((soft.output.argmax(1).numpy() == y).mean())
    hard_acc = float((hard.output.argmax(1).numpy() == y).mean())
    classes = int(max(y.max() + 1, 1))
    per_class = np.zeros((classes, n_experts))
    np.add.at(per_class, (y, index), 1)
    return {
        "soft_accuracy": soft_acc,
        "hard_accuracy": hard_acc,
        "hard_soft_gap": soft_acc - hard_acc,
        "mean_max_prob": float(max_prob.mean()),
        "frac_confident": float((max_prob >= CONFIDENT).mean()),
        "expert_load": load.tolist(),
        "min_expert_load": float(load.min()),
        "routing_entropy": float(row_entropy.mean()),
        "n_test": int(len(y)),
        "class_expert_counts": per_class.astype(int).tolist(),
        "max_prob_histogram": np.histogram(max_prob, bins=20, range=(0.0, 1.0))[0].tolist(),
    }


def plot_routing(metrics: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Three panels: confidence histogram, expert load, class-by-expert routing."""
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
    """The routing-quality figures of a run directory, with the paths of its artifacts."""
    from deploytool import io
    from deploytool.training import load_run

    run = load_run(run_dir)
    from deploytool.errors import BadInput

    if not run.metrics:
        raise BadInput(f"{run.path} has no {io.METRICS_FILE}; train into it first")
    missing = [k for k in SUMMARY_KEYS if not isinstance(run.metrics, dict) or k not in run.metrics]
    if missing:
        raise BadInput(f"{run.path / io.METRICS_FILE} is not a deploytool metrics file (lacks {', '.join(missing)})")
    return {"run_dir": str(run.path), "plot": str(run.plot) if run.plot.exists() else None,
            "config": run.config, "metrics": run.metrics}


SUMMARY_KEYS = ("soft_accuracy", "hard_accuracy", "hard_soft_gap", "mean_max_prob", "frac_confident",
                "min_expert_load", "routing_entropy", "expert_load")
