"""`demo`: the whole chain on the built-in model and data, each step timed and reported.

Steps that need TensorRT or a GPU are listed as skipped with the reason; a failed check (parity,
validation) is recorded as a failed step, stops the chain, and the result says passed: False.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
        from deploytool.errors import CheckFailed, MissingDependency

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


def demo(out: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train on digits, export to ONNX, verify and bench torch vs onnxruntime, try a TensorRT engine, package."""
    from deploytool.benchmark.run import bench
    from deploytool.engine.build import build_engine
    from deploytool.errors import CheckFailed
    from deploytool.export.onnx import export_onnx
    from deploytool.io import prepare_out_dir
    from deploytool.parity import verify
    from deploytool.serving.repository import package
    from deploytool.training import train

    start = time.perf_counter()
    out = prepare_out_dir(out or tempfile.mkdtemp(prefix="deploytool-demo-"))
    steps, artifacts, key = _Steps(), {}, {}
    run_dir, onnx_path, engine_path = out / "run", out / "model.onnx", out / "model.plan"

    def do_train() -> str:
        run = train(DEMO_RECIPE, run_dir, progress=progress, force=True)
        artifacts.update(run_dir=str(run.path), weights=str(run.weights), routing_plot=str(run.plot))
        m = run.metrics
        key.update({k: m[k] for k in ("hard_accuracy", "soft_accuracy", "frac_confident", "min_expert_load")})
        return (f"hard acc {m['hard_accuracy']:.3f}, soft {m['soft_accuracy']:.3f}, "
                f"confident {m['frac_confident']:.1%}, min expert load {m['min_expert_load']:.1%}")

    def do_export() -> str:
        result = export_onnx(run_dir, onnx_path)
        artifacts["onnx"] = str(result.path)
        return f"opset {result.opset}, validated against PyTorch in {result.seconds:.1f} s"

    def do_verify() -> str:
        report = verify(onnx_path, run_dir, backends=("torch", "onnxruntime"), data="digits")
        if not report.passed:
            raise CheckFailed("demo: torch vs onnxruntime parity failed: " + "; ".join(report.failures()), report)
        comparison = report.comparisons[0]
        max_abs = max(o.max_abs for o in comparison.outputs)
        key.update(routing_agreement=comparison.routing.agreement, parity_max_abs=max_abs)
        return (f"{comparison.routing.agreement:.1f}% routing agreement over {comparison.routing.rows} rows, "
                f"max abs error {max_abs:.2e}")

    def do_bench() -> str:
        result = bench(onnx_path, backends=("torch", "onnxruntime"), batch_sizes=BENCH_BATCHES, duration_s=1.0,
                       checkpoint=run_dir, json_path=out / "bench.json", plot_path=out / "latency.png",
                       progress=progress)
        artifacts.update(bench_json=str(out / "bench.json"), latency_plot=str(out / "latency.png"))
        parts = []
        for line in result.lines:
            if line.backend == "onnxruntime":
                key[f"ort_over_torch_median_b{line.batch_size}"] = round(line.ratio, 3)
            parts.append(f"{line.backend} b{line.batch_size} {line.stats.median_ms * 1000:.0f} us")
        return ", ".join(parts) + " (median)"

    def do_package() -> str:
        pkg = package(engine_path if engine_path.exists() else onnx_path, out / "triton", "routed_mlp", force=True,
                      dynamic_batching=True)
        artifacts.update(triton_repository=str(pkg.repository), triton_config=str(pkg.config_path))
        checked = "checked with Triton's schema" if pkg.validated else "not schema-checked (no tritonclient)"
        return f"{pkg.backend} model, config {checked}; README with the tritonserver command"

    def do_engine() -> str:
        result = build_engine(onnx_path, engine_path)
        artifacts["engine"] = str(engine_path)
        return f"deploytool ops via the {result.op_path} path"

    steps.run("train", do_train) and steps.run("export", do_export) and steps.run("verify", do_verify)
    if steps.passed and "onnx" in artifacts:
        steps.run("bench", do_bench)
        steps.run("build-engine", do_engine)
        steps.run("package", do_package)
    return {"out": str(out), "passed": steps.passed, "steps": steps.rows, "artifacts": artifacts,
            "key_numbers": key, "seconds": round(time.perf_counter() - start, 2)}
