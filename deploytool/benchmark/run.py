"""`bench`: latency of several backends on one model, side by side, from one process and one run.

For every batch size and routing pattern the backends are measured interleaved (see harness), so
the ratio of each backend's median to the first backend's survives a noisy machine. Each line carries
the expert histogram of its feeds as that backend routed them, so the cost of a traffic mix is visible.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from deploytool import io
from deploytool.batch_sizes import check_batch_sizes
from deploytool.benchmark import harness, patterns
from deploytool.benchmark.stats import CV_WARN, LatencyStats, summarize
from deploytool.errors import BadInput, DeployToolError, MissingDependency, first_line
from deploytool.runners import check_routed_outputs, parse_backends

DEFAULT_BACKENDS = ("torch", "onnxruntime")
DEFAULT_BATCH_SIZES = (1, 8, 64, 256)
#: rows of random inputs when no data set is known
RANDOM_POOL = 4096


@dataclass
class Line:
    """One (backend, batch size, routing pattern) measurement."""

    backend: str
    batch_size: int
    routing: str
    stats: LatencyStats
    ratio: float                 # median over the first backend's median, same batch size and routing
    histogram: list[int]         # rows per expert over the feed cycle, as this backend routed them
    device: dict[str, LatencyStats] = field(default_factory=dict)  # GPU: h2d, compute, d2h, device

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "batch_size": self.batch_size, "routing": self.routing,
                **self.stats.to_dict(), "ratio": self.ratio, "histogram": self.histogram,
                "device": {k: v.to_dict() for k, v in self.device.items()}}


@dataclass
class BenchResult:
    target: str
    kind: str                    # run | onnx | engine
    backends: list[str]          # measured, in order; the first is the reference of the ratios
    skipped: dict[str, str]      # backend -> why it was not measured
    lines: list[Line]
    settings: dict[str, Any]
    inputs: str                  # where the rows came from
    machine: dict[str, Any]
    date: str
    total_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def unstable(self) -> list[Line]:
        return [ln for ln in self.lines if ln.stats.unstable]

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "kind": self.kind, "backends": self.backends, "skipped": self.skipped,
                "lines": [ln.to_dict() for ln in self.lines], "settings": self.settings, "inputs": self.inputs,
                "machine": self.machine, "date": self.date, "total_s": self.total_s, "notes": self.notes,
                "cv_warn": CV_WARN}


def bench(target: str | Path, backends: Sequence[str] = DEFAULT_BACKENDS,
          batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, routing: Sequence[str] = ("uniform",),
          warmup_ms: float = 200.0, duration_s: float = 3.0, min_iters: int = 10,
          json_path: str | Path | None = None, plot_path: str | Path | None = None, progress: bool = True, *,
          checkpoint: str | Path | None = None, data: str | Path | None = None, seed: int = 0) -> BenchResult:
    """Measure `backends` on TARGET (a run directory, an ONNX model or a TensorRT engine).

    torch backends need the run directory (TARGET, `checkpoint`, or the run an ONNX model was exported
    from, while its weights are still the exported ones); onnxruntime the ONNX model (TARGET, the run's model.onnx, or a temporary export); tensorrt the
    engine. A backend that cannot run here is skipped with its reason in `skipped`, unless none can
    run: then its error is raised (MissingDependency, exit 3). Rows come from `data`, else the run's
    data set, else random normal rows.
    """
    from deploytool.benchmark.machine import machine_info
    from deploytool.parity import run_batched

    start = time.perf_counter()
    backends = parse_backends(backends)
    batch_sizes = check_batch_sizes(batch_sizes)
    routing = patterns.check_patterns(list(routing))
    check_settings(warmup_ms, duration_s, min_iters, seed)
    for path in (json_path, plot_path):
        if path is not None:
            io.check_parent_dir(path)
    art = Artifacts.resolve(target, checkpoint)
    load = busy_note()
    if load:
        art.notes.append(load)
    if "tensorrt" in backends and art.engine_path is not None:
        check_engine_batch(art.engine_path, batch_sizes)

    with contextlib.ExitStack() as stack:
        runners, skipped = _open_runners(backends, art, stack)
        for runner in runners:
            check_routed_outputs(runner)
        runners = _check_same_model(runners, art, skipped)
        check_static_batch(runners, batch_sizes)
        label, pool = _pool(runners[0], art, data, seed)
        routes = run_batched(runners[0], pool, min(256, max(batch_sizes)))  # pads a static batch's last chunk
        n_experts = int(routes["probs"].shape[-1])
        lines, device_notes = _measure(runners, pool, routes["index"], n_experts, batch_sizes, routing,
                                       dict(warmup_ms=warmup_ms, duration_s=duration_s, min_iters=min_iters),
                                       progress, seed)
    notes = list(art.notes) + device_notes
    present = np.bincount(routes["index"], minlength=n_experts) > 0
    if "uniform" in routing and not present.all():
        notes.append(f"experts {np.flatnonzero(~present).tolist()} never chosen on these rows; "
                     "uniform spreads over the others")
    result = BenchResult(
        target=str(target), kind=art.kind, backends=[r.name for r in runners], skipped=skipped, lines=lines,
        settings={"batch_sizes": batch_sizes, "routing": routing, "warmup_ms": warmup_ms, "duration_s": duration_s,
                  "min_iters": min_iters, "rounds": harness.ROUNDS, "requested": backends, "seed": seed},
        inputs=f"{label} ({len(pool)} rows, {n_experts} experts)", machine=machine_info(),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"), notes=notes)
    if plot_path is not None:
        from deploytool.benchmark.plot import plot_latency

        plot_latency(result, plot_path)
    result.total_s = round(time.perf_counter() - start, 3)
    if json_path is not None:
        io.write_json(json_path, result.to_dict())
    return result


# --- input checks ------------------------------------------------------------------------------

def busy_note() -> str | None:
    """A note when other work already loads the machine: its numbers will be noisy, ratios less so."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5 * cores:
        return f"the machine was busy before measuring (load {load:.1f} on {cores} cores): expect noisy latencies"
    return None


def check_settings(warmup_ms: float, duration_s: float, min_iters: int, seed: int = 0) -> None:
    """Finite durations only (an infinite warm-up never ends); the harness stops at MAX_ITERS calls."""
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise BadInput(f"--duration-s must be a finite number > 0, got {duration_s}")
    if not (math.isfinite(warmup_ms) and warmup_ms >= 0):
        raise BadInput(f"--warmup-ms must be a finite number >= 0, got {warmup_ms}")
    if isinstance(min_iters, bool) or not isinstance(min_iters, int) or min_iters < 1:
        raise BadInput(f"--min-iters must be an integer >= 1, got {min_iters}")
    if min_iters > harness.MAX_ITERS:
        raise BadInput(f"--min-iters must be at most {harness.MAX_ITERS:,} (the harness's cap), got {min_iters:,}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise BadInput(f"--seed must be a non-negative integer, got {seed}")


def check_engine_batch(engine_path: Path, batch_sizes: list[int]) -> None:
    """Refuse batch sizes above the engine's optimization profile, read from its manifest."""
    max_batch = engine_max_batch(engine_path)
    too_big = [b for b in batch_sizes if max_batch is not None and b > max_batch]
    if too_big:
        raise BadInput(f"batch size {too_big[0]} is above the engine's profile maximum {max_batch} "
                       f"({engine_path.name}); rebuild with a larger --max-batch or use smaller batches")


def engine_max_batch(engine_path: Path) -> int | None:
    """The largest batch every input of the engine's profile accepts (from its manifest), None if unknown.

    Without a manifest there is nothing to check here: the tensorrt runner refuses the engine itself.
    """
    from deploytool.artifacts import manifest_path, max_batch, read_manifest

    if not manifest_path(engine_path).is_file():
        return None
    return max_batch(read_manifest(engine_path))


def check_static_batch(runners, batch_sizes: list[int]) -> None:
    """A static-batch model (its runner's input metadata fixes axis 0) takes its own batch only:
    refuse any other before measuring."""
    from deploytool.runners import static_batch

    for runner in runners:
        fixed = static_batch(runner)
        other = [b for b in batch_sizes if fixed is not None and b != fixed]
        if other:
            raise BadInput(f"the {runner.name} model has a static batch of {fixed} (input {runner.inputs[0].name} "
                           f"{list(runner.inputs[0].shape)}), so batch size {other[0]} cannot run: give "
                           f"--batch-sizes {fixed}, or export with a dynamic batch")


# --- artifacts and runners ---------------------------------------------------------------------

@dataclass
class Artifacts:
    """What each backend loads, found from TARGET; the ONNX model may be exported on demand."""

    kind: str
    run_dir: Path | None = None
    weights: Path | None = None
    onnx_path: Path | None = None
    engine_path: Path | None = None
    notes: list[str] = field(default_factory=list)
    #: the run directory came from the ONNX model's metadata, not from the user
    run_found: bool = False

    @classmethod
    def resolve(cls, target: str | Path, checkpoint: str | Path | None = None) -> "Artifacts":
        from deploytool.parity import resolve_checkpoint
        from deploytool.artifacts import artifact_kind

        path = Path(target)
        kind = artifact_kind(path)
        run_dir, weights = resolve_checkpoint(checkpoint) if checkpoint is not None else (None, None)
        if kind == "run":
            onnx = path / "model.onnx"
            return cls("run", run_dir or path, weights, onnx if onnx.is_file() else None)
        onnx = path if kind == "onnx" else path.with_suffix(".onnx")
        onnx = onnx if onnx.is_file() else None
        source = None if run_dir or onnx is None else _source_run(onnx)
        return cls(kind, run_dir or source, weights, onnx, path if kind == "engine" else None,
                   run_found=source is not None)

    def onnx(self, stack: contextlib.ExitStack) -> Path:
        """The ONNX model; a run directory without one is exported to a temporary file."""
        if self.onnx_path is None:
            if self.run_dir is None:
                raise BadInput("the onnxruntime backend needs an ONNX model: give one as TARGET")
            from deploytool.export.onnx import export_onnx

            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="deploytool-bench-")))
            self.onnx_path = export_onnx(self.run_dir, tmp / "model.onnx", checkpoint=self.weights,
                                         validate=False).path
            self.notes.append(f"onnxruntime ran a temporary export of {self.run_dir} "
                              "(`deploytool export` it to keep and verify the model)")
        return self.onnx_path

    def runner_for(self, backend: str, stack: contextlib.ExitStack):
        from deploytool.runners import make_runner

        if backend.startswith("torch"):
            if self.run_dir is None:
                raise BadInput(f"the {backend} backend needs the training run directory: give --checkpoint RUN_DIR")
            return make_runner(backend, run_dir=self.run_dir, checkpoint=self.weights)
        if backend == "onnxruntime":
            return make_runner(backend, onnx_path=self.onnx(stack))
        if self.engine_path is None:
            raise BadInput("the tensorrt backend needs an engine as TARGET (build one with `deploytool build-engine`)")
        return make_runner(backend, engine_path=self.engine_path)


def _source_run(onnx_path: Path) -> Path | None:
    """The run directory an exported model records as its source, if it still exists. A relative
    source (older exports) meant the exporter's working directory, unknown here: not guessed from ours."""
    from deploytool.artifacts import META_PREFIX, read_onnx_metadata

    source = Path(read_onnx_metadata(onnx_path).get(META_PREFIX + "source", ""))
    return source if source.is_absolute() and (source / io.CONFIG_FILE).is_file() else None


def _open_runners(backends: list[str], art: Artifacts, stack: contextlib.ExitStack):
    """Activated runners, and the reason for each backend that cannot run; none runnable: its error."""
    runners, skipped, errors = [], {}, []
    for backend in backends:
        try:
            runner = art.runner_for(backend, stack)
            stack.enter_context(runner)
        except (DeployToolError, ImportError) as exc:
            first = first_line(exc)
            skipped[backend] = first
            errors.append(exc if isinstance(exc, DeployToolError) else MissingDependency(first))
            continue
        runners.append(runner)
    if not runners:
        raise errors[0]
    return runners, skipped


def _check_same_model(runners: list, art: Artifacts, skipped: dict[str, str]) -> list:
    """The runners to measure: all of them when torch's weights are the ONNX model's (or cannot be told
    apart). A run found through the model's metadata that no longer matches it is another model: its torch
    backends are skipped with the reason. A run given with --checkpoint is the user's choice: shapes that
    disagree are refused, other weights only noted."""
    from deploytool.artifacts import read_onnx_metadata
    from deploytool.parity import check_runners_match

    torch = [r for r in runners if r.backend == "torch"]
    if not torch:
        return runners
    metadata = read_onnx_metadata(art.onnx_path) if art.onnx_path is not None else {}
    weights = art.weights or (art.run_dir / io.WEIGHTS_FILE if art.run_dir is not None else None)
    try:
        mismatch = check_runners_match(runners, metadata, weights)
    except BadInput as exc:
        if not art.run_found:
            raise
        mismatch = [str(exc)]
    if not mismatch:
        return runners
    if not art.run_found:
        art.notes.extend(mismatch)
        return runners
    reason = (f"the run {art.run_dir} recorded in {art.onnx_path.name} no longer matches it ({mismatch[0]}); "
              "give --checkpoint RUN_DIR to time it anyway")
    kept = [r for r in runners if r not in torch]
    if not kept:
        raise BadInput(reason)
    skipped.update({r.name: reason for r in torch})
    return kept


def _pool(runner, art: Artifacts, data: str | Path | None, seed: int) -> tuple[str, np.ndarray]:
    """Rows to pick feeds from: `data`, else the run's data set, else random normal rows."""
    from deploytool.parity import check_inputs, load_inputs

    n_features = runner.inputs[0].shape[-1]
    if data is not None:
        label, x = load_inputs(data, 10**9, seed)
        return label.replace(" held-out", ""), check_inputs(x, n_features, what=f"{label} rows")
    if art.run_dir is not None:
        from deploytool.data import load_dataset
        from deploytool.training import load_run

        config = load_run(art.run_dir).config
        ds = load_dataset(config.get("dataset", "digits"), config.get("seed", seed), **config.get("data_options", {}))
        return ds.name, check_inputs(np.concatenate([ds.x_test, ds.x_train]), n_features, what=f"{ds.name} rows")
    if not isinstance(n_features, int):
        raise BadInput("the model's feature count is dynamic; give --data to choose the rows")
    art.notes.append("no data set known: random normal rows (give --data for real ones)")
    rng = np.random.default_rng(seed)
    return "random normal", rng.standard_normal((RANDOM_POOL, n_features)).astype(np.float32)


# --- measuring ---------------------------------------------------------------------------------

def _measure(runners, pool: np.ndarray, routes: np.ndarray, n_experts: int, batch_sizes: list[int],
             routing: list[str], settings: dict[str, Any], progress: bool, seed: int) -> tuple[list[Line], list[str]]:
    from deploytool.progress import progress_bar
    from deploytool.runners import INPUT_NAME

    cells = list(itertools.product(routing, batch_sizes))
    lines: list[Line] = []
    notes: list[str] = []
    with progress_bar("measuring " + ", ".join(r.name for r in runners), len(cells), progress) as advance:
        for pattern, batch in cells:
            feeds = [{INPUT_NAME: pool[rows]} for rows in patterns.select_rows(pattern, routes, n_experts, batch,
                                                                               seed)]
            calls = [_timed_call(r, feeds, notes) for r in runners]
            summaries = [summarize(ns, batch) for ns in harness.measure(calls, **settings)]
            first_median = summaries[0].median_ms  # the same figure, so the first ratio is exactly 1
            for runner, call, stats in zip(runners, calls, summaries):
                index = [runner.infer(feed)["index"] for feed in feeds]
                device = {k: summarize(v, batch) for k, v in call.stage_ns().items()} \
                    if isinstance(call, harness.CudaStages) else {}
                lines.append(Line(runner.name, batch, pattern, stats, stats.median_ms / first_median,
                                  patterns.histogram(index, n_experts), device))
            advance()
    return lines, list(dict.fromkeys(notes))


def _timed_call(runner, feeds: list[dict[str, np.ndarray]], notes: list[str]) -> Callable[[], object]:
    """runner.infer over the feed cycle; a GPU runner with `device_stages()` is timed stage by stage.

    `device_stages()` returns (to_device(feed), compute(device_feed), to_host(device_out)) enqueued on
    the runner's `stream` attribute (a torch.cuda.Stream) or, without one, torch's current stream.
    """
    next_feed = itertools.cycle(feeds).__next__
    stages = getattr(runner, "device_stages", None)
    if stages is not None:
        return harness.CudaStages(*stages(), feeds=next_feed, stream=getattr(runner, "stream", None))
    if _on_gpu(runner):
        notes.append(f"{runner.name}: host time only (the runner has no device_stages() for CUDA events)")
    infer = runner.infer
    return lambda: infer(next_feed())


def _on_gpu(runner) -> bool:
    device = str(getattr(runner, "device", "cpu"))
    providers = getattr(runner, "active_providers", [])
    return runner.backend == "tensorrt" or device.startswith("cuda") or "CUDAExecutionProvider" in providers
