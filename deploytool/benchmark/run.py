"""`bench`: latency of several backends on one model, side by side, from one process and one run.

For every batch size and routing pattern the backends are measured interleaved (see harness), so
the ratio of each backend's median to the first backend's survives a noisy machine. Inputs come from
the model's signature (a data set's samples, reshaped to its inputs, or made-up ones); a routing
pattern picks samples by one router's decisions (the first router unless told), and each line carries
every router's expert histogram over its feeds as that backend routed them, so the cost of a traffic
mix is visible.
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
from deploytool.benchmark.plot import plot_latency
from deploytool.benchmark.stats import CV_WARN, LatencyStats, summarize
from deploytool.errors import BadInput, DeployToolError, MissingDependency, first_line
from deploytool.artifacts import Target, manifest_path, max_batch, read_manifest, resolve_target
from deploytool.comparator import check_runners_match, run_batched
from deploytool.feeds import Feed, batch_of, sample_feed, take
from deploytool.machine import machine_info
from deploytool.progress import progress_bar
from deploytool.runners import artifact_of, make_runner, parse_backends, runs_on_gpu, runs_weights

DEFAULT_BACKENDS = ("torch", "onnxruntime")
DEFAULT_BATCH_SIZES = (1, 8, 64, 256)
#: samples of made-up inputs when no data set is known
RANDOM_POOL = 4096
#: the most input data one batch may hold: a larger batch is refused before anything is allocated
MAX_FEED_BYTES = 1 << 30
#: the longest time one backend may be measured per cell (and warmed up)
MAX_DURATION_S = 600.0


@dataclass
class Line:
    """One (backend, batch size, routing pattern) measurement."""

    backend: str
    batch_size: int
    routing: str
    stats: LatencyStats
    ratio: float                 # median over the first backend's median, same batch size and routing
    #: router path -> decisions per expert over the feed cycle, as this backend routed them
    histograms: dict[str, list[int]]

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "batch_size": self.batch_size, "routing": self.routing,
                **self.stats.to_dict(), "ratio": self.ratio, "histograms": self.histograms}


@dataclass
class BenchResult:
    """Every line measured, with the settings, inputs and machine they were measured on.

    Attributes:
        target: what was benchmarked.
        kind: its artifact kind (run, onnx, engine).
        backends: the backends measured, in order (ratios are to the first).
        skipped: backends that could not run here, with the reason.
        lines: one per backend, batch size and routing pattern.
        settings: the timing settings.
        inputs: where the samples came from.
        machine: the machine's description.
        date: when (UTC, ISO 8601).
        total_s: the whole run's seconds.
        notes: remarks (noisy machine, experts never chosen).
    """

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
        """The lines whose coefficient of variation is above CV_WARN."""
        return [ln for ln in self.lines if ln.stats.unstable]

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "kind": self.kind, "backends": self.backends, "skipped": self.skipped,
                "lines": [ln.to_dict() for ln in self.lines], "settings": self.settings, "inputs": self.inputs,
                "machine": self.machine, "date": self.date, "total_s": self.total_s, "notes": self.notes,
                "cv_warn": CV_WARN}


def bench(target: str | Path | Sequence[str | Path], *, backends: Sequence[str] = DEFAULT_BACKENDS,
          batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, routing: Sequence[str] = ("uniform",),
          router: str | None = None, warmup_ms: float = 200.0, duration_s: float = 3.0, min_iters: int = 10,
          json_path: str | Path | None = None, plot_path: str | Path | None = None, progress: bool = True,
          checkpoint: str | Path | None = None, data: Any = None, seed: int = 0) -> BenchResult:
    """Measure `backends` on TARGET (a run directory, an ONNX model or a TensorRT engine), or on several
    targets side by side (e.g. the sparse and the dense export of one model), ratios to the first line.

    torch backends need the run directory (TARGET, `checkpoint`, or the run an ONNX model was exported
    from, while its weights are still the exported ones); onnxruntime the ONNX model (TARGET, the run's
    model.onnx, or a temporary export); tensorrt the engine. A backend that cannot run here is skipped
    with its reason in `skipped`, unless none can run: then its error is raised.

    Args:
        target: the artifact, or a list of artifacts of one model (same inputs and routers).
        backends: backend names, the first the reference of the ratios.
        batch_sizes: batch sizes to measure.
        routing: routing patterns (uniform, skewed, single).
        router: the module path of the router the patterns steer (default: the first).
        warmup_ms: warm-up per callable.
        duration_s: timed duration per callable and cell.
        min_iters: at least this many timed calls.
        json_path: write the result as JSON here.
        plot_path: write a PNG plot here.
        progress: show a progress bar on a terminal.
        checkpoint: the run directory (or weights) the torch backends load.
        data: samples to pick feeds from (see deploytool.feeds.load_feed); default the run's data set,
            else made-up inputs from the signature.
        seed: seed of the data split and pattern sampling.

    Returns:
        The BenchResult.

    Raises:
        BadInput: bad options or files, an output path that is an input, a model without routers.
        MissingDependency: no backend can run here.
    """
    start = time.perf_counter()
    backends = parse_backends(backends)
    batch_sizes = check_batch_sizes(batch_sizes)
    routing = patterns.check_patterns(list(routing))
    check_settings(warmup_ms, duration_s, min_iters, seed)
    targets = _check_targets(target, backends)
    arts = [resolve_target(t, checkpoint=checkpoint) for t in targets]
    _check_reports(json_path, plot_path, checkpoint, data, targets, arts)
    notes = [note for note in (busy_note(),) if note]
    for a in arts:
        if any(artifact_of(b) == "engine" for b in backends) and a.engine_path is not None:
            check_engine_batch(a.engine_path, batch_sizes)

    with contextlib.ExitStack() as stack:
        runners, skipped = _open_targets(backends, targets, arts, stack, notes)
        check_static_batch(runners, batch_sizes)
        signature = runners[0].signature
        steered = _steered_router(signature, router)
        label, pool = _pool(signature, arts[0], data, seed, notes)
        check_feed_size(pool, batch_sizes)
        routes = run_batched(runners[0], pool, min(256, max(batch_sizes)))  # pads a static batch's last chunk
        per_sample = sample_experts(routes[steered.index], steered.n_experts)
        lines, device_notes = _measure(runners, pool, routes=per_sample, n_experts=steered.n_experts,
                                       batch_sizes=batch_sizes, routing=routing,
                                       settings=dict(warmup_ms=warmup_ms, duration_s=duration_s, min_iters=min_iters),
                                       progress=progress, seed=seed)
    notes = notes + device_notes
    present = patterns.pool_counts(per_sample, steered.n_experts) > 0
    if "uniform" in routing and not present.all():
        notes.append(f"router {steered.path}: experts {np.flatnonzero(~present).tolist()} never chosen on these "
                     "samples; uniform spreads over the others")
    result = BenchResult(
        target=", ".join(map(str, targets)), kind=arts[0].kind, backends=[r.name for r in runners], skipped=skipped,
        lines=lines,
        settings={"batch_sizes": batch_sizes, "routing": routing, "router": steered.path, "warmup_ms": warmup_ms,
                  "duration_s": duration_s, "min_iters": min_iters, "rounds": harness.ROUNDS, "requested": backends,
                  "seed": seed},
        inputs=f"{label} ({batch_of(pool)} samples; router {steered.path}, {steered.n_experts} experts)",
        machine=machine_info(), date=datetime.now(timezone.utc).isoformat(timespec="seconds"), notes=notes)
    _write_reports(result, json_path, plot_path, start)
    return result


def _check_targets(target: str | Path | Sequence[str | Path], backends: list[str]) -> list[Path]:
    """The targets as paths: distinct, and several only with a backend that reads each (not torch alone)."""
    targets = [Path(target)] if isinstance(target, (str, Path)) else [Path(t) for t in target]
    if not targets or len({t.resolve() for t in targets}) != len(targets):
        raise BadInput("give one or more distinct targets")
    if len(targets) > 1 and all(artifact_of(b) == "run" for b in backends):
        raise BadInput(f"several targets are measured with the backends that read them; {', '.join(backends)} "
                       "run the training run's weights, the same for every export: add onnxruntime or tensorrt")
    return targets


def _check_reports(json_path: str | Path | None, plot_path: str | Path | None, checkpoint: str | Path | None,
                   data: Any, targets: list[Path], arts: list[Target]) -> None:
    """Refuse report paths that clash with each other, have the wrong suffix, or would overwrite an input."""
    if json_path is not None and plot_path is not None and Path(json_path).resolve() == Path(plot_path).resolve():
        raise BadInput(f"the JSON report and the plot are both {json_path}; give two paths")
    for path, suffix in ((json_path, ".json"), (plot_path, ".png")):
        if path is not None and Path(path).suffix.lower() != suffix:
            raise BadInput(f"{path} must end in {suffix} (it is written as {suffix[1:].upper()})")
    for path in (json_path, plot_path):
        if path is not None:
            io.check_parent_dir(path)
            io.refuse_overwrite(path, checkpoint, data if isinstance(data, (str, Path)) else None, *targets,
                                *(p for a in arts for p in (a.onnx_path, a.source, a.engine_path)))


def _open_targets(backends: list[str], targets: list[Path], arts: list[Target], stack: contextlib.ExitStack,
                  notes: list[str]) -> tuple[list, dict[str, str]]:
    """Every runnable (backend, target) runner, activated, named after its target when there are several;
    the backends skipped, with the reason. Each runner's model must have routers, and several targets must
    be exports of one model."""
    runners, skipped = [], {}
    for i, (path, a) in enumerate(zip(targets, arts)):
        # torch runs the weights, the same for every export of one run: measured once, with the first
        names = backends if i == 0 else [b for b in backends if artifact_of(b) != "run"]
        opened, missed = _open_runners(names, a, stack, notes)
        opened = _check_same_model(opened, a, missed, notes)
        if len(targets) > 1:
            for runner in opened:
                if artifact_of(runner.name) != "run":
                    runner.name = f"{runner.name} {path.name}"
            missed = {f"{k} {path.name}": v for k, v in missed.items()}
        runners += opened
        skipped.update(missed)
    for runner in runners:
        runner.signature.require_router(f"the {runner.name} model")
    if len(targets) > 1:
        check_runners_match(runners, {}, None)
    return runners, skipped


def _write_reports(result: BenchResult, json_path: str | Path | None, plot_path: str | Path | None,
                   start: float) -> None:
    """The plot, then the JSON report (which records the whole run's seconds)."""
    if plot_path is not None:
        plot_latency(result, plot_path)
    result.total_s = round(time.perf_counter() - start, 3)
    if json_path is not None:
        io.write_json(json_path, result.to_dict())


def _steered_router(signature, path: str | None):
    """The router whose decisions the routing patterns steer: `path`, or the first."""
    if path is None:
        return signature.routers[0]
    for meta in signature.routers:
        if meta.path == path:
            return meta
    raise BadInput(f"the model has no router {path!r}; its routers are {[r.path for r in signature.routers]}")


def sample_experts(index: np.ndarray, n_experts: int) -> np.ndarray:
    """What pattern selection steers by: each sample's expert for a router deciding once per sample, or
    for a router deciding per token (or picking k experts) each sample's count of decisions per expert.

    Args:
        index: a router's index output over the pool, [samples] or [samples, tokens..., (k)].
        n_experts: its expert count.

    Returns:
        [samples] int64 experts, or [samples, n_experts] int64 decision counts.
    """
    flat = np.asarray(index, dtype=np.int64).reshape(len(index), -1)
    if flat.shape[1] == 1:
        return flat[:, 0]
    return np.apply_along_axis(np.bincount, 1, flat, minlength=n_experts)[:, :n_experts]


def check_feed_size(pool: Feed, batch_sizes: list[int]) -> None:
    """Refuse a batch whose inputs alone would not fit in memory, before building any feed.

    Args:
        pool: the samples feeds are picked from.
        batch_sizes: the batch sizes to measure.

    Raises:
        BadInput: the largest batch's inputs exceed MAX_FEED_BYTES.
    """
    per_sample = sum(v[0].nbytes for v in pool.values())
    largest = max(batch_sizes)
    if largest * per_sample > MAX_FEED_BYTES:
        raise BadInput(f"batch size {largest} needs {largest * per_sample / 2**30:.1f} GiB of inputs per call "
                       f"({per_sample} bytes a sample); the most a benchmark feed may hold is "
                       f"{MAX_FEED_BYTES / 2**30:.0f} GiB: give smaller batch sizes")


# --- input checks ------------------------------------------------------------------------------

def busy_note() -> str | None:
    """A note when other work already loads the machine: its numbers will be noisy, ratios less so."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5 * cores:
        return f"the machine was busy before measuring (load {load:.1f} on {cores} cores): expect noisy latencies"
    return None


def check_settings(warmup_ms: float, duration_s: float, min_iters: int, seed: int = 0) -> None:
    """Finite durations only (an infinite warm-up never ends); the harness stops at MAX_ITERS calls.

    Args:
        warmup_ms: warm-up per callable.
        duration_s: timed duration per callable and cell.
        min_iters: least timed calls.
        seed: the data and pattern seed.

    Raises:
        BadInput: a value out of range or of the wrong type.
    """
    if not (math.isfinite(duration_s) and 0 < duration_s <= MAX_DURATION_S):
        raise BadInput(f"duration_s must be a number > 0 and at most {MAX_DURATION_S} s, got {duration_s}")
    if not (math.isfinite(warmup_ms) and 0 <= warmup_ms <= 1000 * MAX_DURATION_S):
        raise BadInput(f"warmup_ms must be a number >= 0 and at most {1000 * MAX_DURATION_S} ms, got {warmup_ms}")
    if isinstance(min_iters, bool) or not isinstance(min_iters, int) or min_iters < 1:
        raise BadInput(f"min_iters must be an integer >= 1, got {min_iters}")
    if min_iters > harness.MAX_ITERS:
        raise BadInput(f"min_iters must be at most {harness.MAX_ITERS:,} (the harness's cap), got {min_iters:,}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise BadInput(f"seed must be a non-negative integer, got {seed}")


def check_engine_batch(engine_path: Path, batch_sizes: list[int]) -> None:
    """Refuse batch sizes above the engine's optimization profile, read from its manifest.

    Args:
        engine_path: the engine (its manifest beside it).
        batch_sizes: the batch sizes to measure.

    Raises:
        BadInput: a batch size above the profile's maximum.
    """
    max_batch = engine_max_batch(engine_path)
    too_big = [b for b in batch_sizes if max_batch is not None and b > max_batch]
    if too_big:
        raise BadInput(f"batch size {too_big[0]} is above the engine's profile maximum {max_batch} "
                       f"({engine_path.name}); rebuild it with a larger max batch or use smaller batches")


def engine_max_batch(engine_path: Path) -> int | None:
    """The largest batch every input of the engine's profile accepts (from its manifest), None if unknown.

    Without a manifest there is nothing to check here: the tensorrt runner refuses the engine itself.
    """
    if not manifest_path(engine_path).is_file():
        return None
    return max_batch(read_manifest(engine_path))


def check_static_batch(runners, batch_sizes: list[int]) -> None:
    """A static-batch model (its runner's input metadata fixes axis 0) takes its own batch only:
    refuse any other before measuring.

    Args:
        runners: the runners to measure.
        batch_sizes: the batch sizes to measure.

    Raises:
        BadInput: a batch size other than a static-batch model's own.
    """
    for runner in runners:
        fixed = runner.signature.static_batch
        other = [b for b in batch_sizes if fixed is not None and b != fixed]
        if other:
            raise BadInput(f"the {runner.name} model has a static batch of {fixed} (input {runner.inputs[0].name} "
                           f"{list(runner.inputs[0].shape)}), so batch size {other[0]} cannot run: give "
                           f"batch size {fixed} only, or export with a dynamic batch")


# --- targets and runners -----------------------------------------------------------------------

def _onnx_for(target: Target, stack: contextlib.ExitStack, notes: list[str]) -> Path:
    """The target's ONNX model; a run directory without one is exported to a temporary file."""
    if target.onnx_path is None:
        if target.source is None:
            raise BadInput("the onnxruntime backend needs an ONNX model: give one as TARGET")
        from deploytool.export.onnx import export_onnx

        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="deploytool-bench-")))
        target.onnx_path = export_onnx(target.source, tmp / "model.onnx", checkpoint=target.weights,
                                       validate=False).path
        notes.append(f"onnxruntime ran a temporary export of {target.source} "
                     "(`deploytool export` it to keep and verify the model)")
    return target.onnx_path


def _runner_for(backend: str, target: Target, stack: contextlib.ExitStack, notes: list[str]):
    """The runner of `backend` over what it reads of `target` (not yet active)."""
    reader = artifact_of(backend)
    if reader == "run":
        if target.source is None:
            raise BadInput(f"the {backend} backend needs the training run directory: give the checkpoint")
        return make_runner(backend, target.opened(), checkpoint=target.weights, **target.module_options())
    if reader == "onnx":
        return make_runner(backend, _onnx_for(target, stack, notes))
    if target.engine_path is None:
        raise BadInput(f"the {backend} backend needs an engine as TARGET (build one with `deploytool build-engine`)")
    return make_runner(backend, target.engine_path)


def _open_runners(backends: list[str], target: Target, stack: contextlib.ExitStack, notes: list[str]):
    """Activated runners, and the reason for each backend that cannot run; none runnable: its error."""
    runners, skipped, errors = [], {}, []
    for backend in backends:
        try:
            runner = _runner_for(backend, target, stack, notes)
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


def _check_same_model(runners: list, target: Target, skipped: dict[str, str], notes: list[str]) -> list:
    """The runners to measure: all of them when torch's weights are the ONNX model's (or cannot be told
    apart). A run found through the model's metadata that no longer matches it is another model: its torch
    backends are skipped with the reason. A run given with --checkpoint is the user's choice: shapes that
    disagree are refused, other weights only noted."""
    torch = [r for r in runners if runs_weights(r)]
    if not torch:
        return runners
    try:
        mismatch = check_runners_match(runners, target.metadata, target.source_weights)
    except BadInput as exc:
        if not target.source_found:
            raise
        mismatch = [str(exc)]
    if not mismatch:
        return runners
    if not target.source_found:
        notes.extend(mismatch)
        return runners
    reason = (f"the run {target.source} recorded in {target.onnx_path.name} no longer matches it ({mismatch[0]}); "
              "give the checkpoint (its run directory) to time it anyway")
    kept = [r for r in runners if r not in torch]
    if not kept:
        raise BadInput(reason)
    skipped.update({r.name: reason for r in torch})
    return kept


def _pool(signature, target: Target, data: Any, seed: int, notes: list[str]) -> tuple[str, Feed]:
    """Samples to pick feeds from: `data`, else the run's data set (training rows too), else made up."""
    config = target.run_config() if data is None else None
    label, feed = sample_feed(signature, data=data, run_config=config, samples=10**9, seed=seed, made_up=RANDOM_POOL,
                              tokenizer=target.source)
    if data is None and config is None:
        notes.append("no data set known: made-up inputs from the model's signature (give data for real ones)")
    return label.replace(" held-out", ""), feed


# --- measuring ---------------------------------------------------------------------------------

def _measure(runners, pool: Feed, *, routes: np.ndarray, n_experts: int, batch_sizes: list[int],
             routing: list[str], settings: dict[str, Any], progress: bool, seed: int) -> tuple[list[Line], list[str]]:
    """Every cell (routing pattern x batch size), the runners measured interleaved.

    Args:
        runners: the active runners, the first the reference of the ratios.
        pool: the samples feeds are picked from.
        routes: each sample's expert under the steered router, or its decisions per expert (token routers).
        n_experts: that router's expert count.
        batch_sizes: batch sizes to measure.
        routing: routing patterns.
        settings: the harness's timing settings (warmup_ms, duration_s, min_iters).
        progress: show a progress bar.
        seed: seed of the pattern sampling.

    Returns:
        (one Line per runner and cell, notes on how the times were taken).
    """
    cells = list(itertools.product(routing, batch_sizes))
    lines: list[Line] = []
    notes: list[str] = []
    routers = runners[0].signature.routers
    with progress_bar("measuring " + ", ".join(r.name for r in runners), len(cells), progress) as advance:
        for pattern, batch in cells:
            feeds = [take(pool, rows) for rows in patterns.select_rows(pattern, routes, n_experts, batch, seed)]
            calls = [_timed_call(r, feeds, notes) for r in runners]
            summaries = [summarize(ns, batch) for ns in harness.measure(calls, **settings)]
            first_median = summaries[0].median_ms  # the same figure, so the first ratio is exactly 1
            for runner, stats in zip(runners, summaries):
                outputs = [runner.infer(feed) for feed in feeds]
                histograms = {r.path: patterns.histogram([o[r.index] for o in outputs], r.n_experts) for r in routers}
                lines.append(Line(backend=runner.name, batch_size=batch, routing=pattern, stats=stats,
                                  ratio=stats.median_ms / first_median, histograms=histograms))
            advance()
    return lines, list(dict.fromkeys(notes))


def _timed_call(runner, feeds: list[Feed], notes: list[str]) -> Callable[[], object]:
    """runner.infer over the feed cycle (host time: a GPU runner's call includes its copies)."""
    next_feed = itertools.cycle(feeds).__next__
    if runs_on_gpu(runner):
        notes.append(f"{runner.name}: host time, copies to and from the GPU included")
    infer = runner.infer
    return lambda: infer(next_feed())

