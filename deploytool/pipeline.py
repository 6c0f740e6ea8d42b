"""`demo`: the whole chain on the built-in model and data, each step timed and reported."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEMO_RECIPE = "digits-4"


class _Steps:
    """Runs named steps, records status, time and a one-line detail; a missing dependency skips."""

    def __init__(self):
        self.rows: list[dict[str, Any]] = []

    def run(self, name: str, fn: Callable[[], str]) -> None:
        from deploytool.errors import MissingDependency

        start = time.perf_counter()
        try:
            detail, status = fn(), "ok"
        except MissingDependency as exc:
            detail, status = str(exc), "skipped"
        self.rows.append({"step": name, "status": status, "seconds": round(time.perf_counter() - start, 2),
                          "detail": detail})


def demo(out: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train the built-in recipe on digits and report its routing quality (later steps join here)."""
    from deploytool.io import prepare_out_dir
    from deploytool.training import train

    start = time.perf_counter()
    out = prepare_out_dir(out or tempfile.mkdtemp(prefix="deploytool-demo-"))
    steps, artifacts, state = _Steps(), {}, {}

    def do_train() -> str:
        run = train(DEMO_RECIPE, out / "run", progress=progress)
        state["run"] = run
        artifacts.update(run_dir=str(run.path), weights=str(run.weights), routing_plot=str(run.plot))
        m = run.metrics
        return (f"hard acc {m['hard_accuracy']:.3f}, soft {m['soft_accuracy']:.3f}, "
                f"confident {m['frac_confident']:.1%}, min expert load {m['min_expert_load']:.1%}")

    steps.run("train", do_train)
    return {"out": str(out), "steps": steps.rows, "artifacts": artifacts,
            "metrics": state["run"].metrics, "seconds": round(time.perf_counter() - start, 2)}
