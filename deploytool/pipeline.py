"""`demo`: the whole chain on the built-in model and data, each step timed and reported.

Steps that need TensorRT or a GPU are listed as skipped with the reason; a failed check (parity,
validation) is recorded as a failed step, stops the chain, and the result says passed: False.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deploytool.benchmark.run import bench
from deploytool.engine.build import build_engine
from deploytool.errors import BadInput, CheckFailed, MissingDependency
from deploytool.io import prepare_out_dir
from deploytool.serving.repository import package

DEMO_RECIPE = "digits-4"
BENCH_BATCHES = (1, 256)


class _Steps:
    """Runs named steps, records status, time and a one-line detail; a missing dependency skips a
    step, a failed check fails it."""

    def __init__(self):
        self.rows: list[dict[str, Any]] = []

    @property
    def passed(self) -> bool:
        return all(row["status"] != "failed" for row in self.rows)

    def run(self, name: str, fn: Callable[[], str]) -> bool:
        start = time.perf_counter()
        try:
            detail, status = fn(), "ok"
        except MissingDependency as exc:
            detail, status = str(exc), "skipped"
        except CheckFailed as exc:
            detail, status = str(exc), "failed"
        self.rows.append({"step": name, "status": status, "seconds": round(time.perf_counter() - start, 2),
                          "detail": detail})
        return status == "ok"


def demo(out: str | Path | None = None, *, recipe: str = DEMO_RECIPE, progress: bool = True,
         force: bool = False) -> dict[str, Any]:
    """Train a built-in recipe, export to ONNX, verify and bench torch vs onnxruntime, try a TensorRT
    engine (verified and benched like the others where one builds), package for Triton.

    Args:
        out: the directory for every artifact (default: a new temporary directory).
        recipe: the training recipe (a built-in name such as digits-4, digits-cnn, digits-transformer,
            or a TOML path).
        progress: show progress bars on a terminal.
        force: replace what an earlier demo left in `out`.

    Returns:
        {"out", "passed", "steps", "artifacts", "key_numbers", "seconds"}.

    Raises:
        BadInput: an `out` that is a file, or that holds anything (an earlier demo's or other files)
            without `force`.
    """
    from deploytool.training import resolve_config

    start = time.perf_counter()
    resolve_config(recipe, {})  # a bad recipe is refused before anything is created
    if out and Path(out).is_dir() and any(Path(out).iterdir()) and not force:
        raise BadInput(f"demo output directory {Path(out).resolve()} is not empty; give an empty or new directory, "
                       "or replace an earlier demo's files with force")
    if out:
        missing = [p for p in (Path(out).absolute(), *Path(out).absolute().parents) if not p.exists()]
        made = missing[-1] if missing else None  # the highest directory the demo creates
        out = prepare_out_dir(out)
    else:
        out = made = Path(tempfile.mkdtemp(prefix="deploytool-demo-"))
    try:
        return _chain(out, recipe, progress, start)
    except BaseException:  # interrupted or refused: directories the demo made itself go again
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise


def _chain(out: Path, recipe: str, progress: bool, start: float) -> dict[str, Any]:
    """The demo's steps in `out`; see `demo`."""
    chain = _Chain(out, recipe, progress)
    steps = chain.steps
    torch_ort = ("torch", "onnxruntime")
    steps.run("train", chain.train) and steps.run("export", chain.export) and \
        steps.run("verify", chain.verify(torch_ort, chain.onnx_path))
    if steps.passed and "onnx" in chain.artifacts:
        steps.run("bench", chain.bench(torch_ort, chain.onnx_path, "bench"))
        if steps.run("build-engine", chain.build_engine):  # an engine nothing verified is not shipped
            steps.run("verify engine", chain.verify(("torch", "tensorrt"), chain.engine_path)) and \
                steps.run("bench engine", chain.bench(("onnxruntime", "tensorrt"), chain.engine_path, "bench-engine"))
        if steps.passed:
            steps.run("package", chain.package)
    return {"out": str(out), "passed": steps.passed, "steps": steps.rows, "artifacts": chain.artifacts,
            "key_numbers": chain.key, "seconds": round(time.perf_counter() - start, 2)}


class _Chain:
    """The demo's steps over one output folder: each returns its one-line detail and records the
    artifacts it wrote and its key numbers."""

    def __init__(self, out: Path, recipe: str, progress: bool):
        self.out, self.recipe, self.progress = out, recipe, progress
        self.steps, self.artifacts, self.key = _Steps(), {}, {}
        self.run_dir, self.onnx_path, self.engine_path = out / "run", out / "model.onnx", out / "model.plan"

    def train(self) -> str:
        from deploytool.training import train

        run = train(self.recipe, self.run_dir, progress=self.progress, force=True)
        self.artifacts.update(run_dir=str(run.path), weights=str(run.weights), routing_plot=str(run.plot))
        m = run.metrics
        self.key.update({k: m[k] for k in ("hard_accuracy", "soft_accuracy", "frac_confident", "min_expert_load")})
        return (f"hard acc {m['hard_accuracy']:.3f}, soft {m['soft_accuracy']:.3f}, "
                f"confident {m['frac_confident']:.1%}, min expert load {m['min_expert_load']:.1%}")

    def export(self) -> str:
        from deploytool.export.onnx import export_onnx

        result = export_onnx(self.run_dir, self.onnx_path)
        self.artifacts["onnx"] = str(result.path)
        return f"opset {result.opset}, validated against PyTorch in {result.seconds:.1f} s"

    def verify(self, backends: tuple[str, ...], model: Path) -> Callable[[], str]:
        def step() -> str:
            from deploytool.parity import verify

            report = verify(model, checkpoint=self.run_dir, backends=backends, data="digits")
            if not report.passed:
                raise CheckFailed(f"demo: {' vs '.join(backends)} parity failed: " + "; ".join(report.failures()),
                                  report)
            comparison = report.comparisons[-1]
            max_abs = max(o.max_abs for o in comparison.outputs)
            agreement = min(r.agreement for r in comparison.routing)
            self.key[f"routing_agreement_{backends[-1]}"] = agreement
            self.key[f"parity_max_abs_{backends[-1]}"] = max_abs
            decisions = sum(r.rows for r in comparison.routing)
            return (f"{agreement:.1f}% routing agreement (worst of {len(comparison.routing)} router(s), "
                    f"{decisions} decisions), max abs error {max_abs:.2e}")
        return step

    def bench(self, backends: tuple[str, ...], model: Path, name: str) -> Callable[[], str]:
        def step() -> str:
            out = self.out
            result = bench(model, backends=backends, batch_sizes=BENCH_BATCHES, duration_s=1.0,
                           checkpoint=self.run_dir, json_path=out / f"{name}.json", plot_path=out / f"{name}.png",
                           progress=self.progress)
            self.artifacts.update({f"{name}_json": str(out / f"{name}.json"), f"{name}_plot": str(out / f"{name}.png")})
            parts = []
            for line in result.lines:
                if line.backend != backends[0]:
                    self.key[f"{line.backend}_over_{backends[0]}_median_b{line.batch_size}"] = round(line.ratio, 3)
                parts.append(f"{line.backend} b{line.batch_size} {line.stats.median_ms * 1000:.0f} us")
            return ", ".join(parts) + " (median)"
        return step

    def package(self) -> str:
        pkg = package(self.engine_path if "engine" in self.artifacts else self.onnx_path, self.out / "triton",
                      "routed_model", force=True, dynamic_batching=True)
        self.artifacts.update(triton_repository=str(pkg.repository), triton_config=str(pkg.config_path))
        checked = "checked with Triton's schema" if pkg.validated else "not schema-checked (no tritonclient)"
        return f"{pkg.backend} model, config {checked}; README with the tritonserver command"

    def build_engine(self) -> str:
        result = build_engine(self.onnx_path, self.engine_path)
        self.artifacts["engine"] = str(self.engine_path)
        return f"deploytool ops via the {result.op_path} path"
