"""`deploytool bench`: latency statistics of several backends, side by side, with a plot."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from deploytool.cli.options import Backends, Quiet, Seed, split_list
from deploytool.cli.render import console, fmt, print_json, table

if TYPE_CHECKING:
    from deploytool.benchmark.run import BenchResult

app = typer.Typer()


@app.command()
def bench(
    targets: Annotated[list[Path], typer.Argument(
        help="A training run directory, an .onnx model or a TensorRT engine; several (e.g. the sparse and the "
             "dense export of one model) are measured side by side, ratios to the first.")],
    backends: Backends = "torch,onnxruntime",
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma-separated batch sizes.")] = "1,8,64,256",
    routing: Annotated[str, typer.Option("--routing", help="Routing patterns: uniform, skewed (Zipf), single.")]
    = "uniform",
    router: Annotated[Optional[str], typer.Option(
        "--router", help="Module path of the router the patterns steer (default: the first).")] = None,
    warmup_ms: Annotated[float, typer.Option("--warmup-ms", help="Warm-up time per backend and batch size.")] = 200.0,
    duration_s: Annotated[float, typer.Option("--duration-s", help="Measured time per backend and batch size.")]
    = 3.0,
    min_iters: Annotated[int, typer.Option("--min-iters", help="At least this many timed calls.")] = 10,
    checkpoint: Annotated[Optional[Path], typer.Option(
        "--checkpoint", help="Run directory for the torch backends when TARGET is a model file.")] = None,
    data: Annotated[Optional[str], typer.Option(
        "--data", help="Rows to feed: digits, blobs or an .npz (default: the run's data set).")] = None,
    json_path: Annotated[Optional[Path], typer.Option(
        "--json", help="Write every figure and the machine to this JSON file ('-': print it, no table).")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG of latency by batch size.")] = None,
    seed: Seed = 0,
    quiet: Quiet = False,
) -> None:
    """Measure latency (min/mean/median/p90/p95/p99/max, CV) and throughput per backend and batch size."""
    from deploytool.benchmark.run import bench as run_bench

    to_stdout = str(json_path) == "-"
    result = run_bench(targets, backends=split_list(backends), batch_sizes=batch_sizes, routing=split_list(routing),
                       router=router, warmup_ms=warmup_ms, duration_s=duration_s, min_iters=min_iters,
                       json_path=None if to_stdout else json_path, plot_path=plot, progress=not (quiet or to_stdout),
                       checkpoint=checkpoint, data=data, seed=seed)
    if to_stdout:
        print_json(result.to_dict())
        return
    render(result, json_path, plot)


LATENCY = ("backend", "batch", "median", "ratio", "p90", "p95", "p99", "max", "CV")
THROUGHPUT = ("backend", "batch", "iters", "min", "mean", "queries/s", "samples/s", "experts %")


def render(result: "BenchResult", json_path: Optional[Path] = None, plot: Optional[Path] = None) -> None:
    """Two compact tables per routing pattern (latencies in microseconds), then skips, warnings, machine."""
    from rich import box

    from deploytool.benchmark.stats import CV_WARN

    out = console()
    first = result.backends[0] if result.backends else "-"
    steered = result.settings["router"]
    for pattern in dict.fromkeys(ln.routing for ln in result.lines):
        lines = sorted((ln for ln in result.lines if ln.routing == pattern), key=lambda ln: ln.batch_size)
        latency, throughput = [], []
        for ln in lines:
            s = ln.stats
            histogram = ln.histograms[steered]
            total = sum(histogram) or 1
            latency.append((ln.backend, ln.batch_size, _us(s.median_ms), f"{ln.ratio:.2f}x", _us(s.p90_ms),
                            _us(s.p95_ms), _us(s.p99_ms), _us(s.max_ms),
                            f"{100 * s.cv:.1f}%" + ("!" if s.unstable else "")))
            throughput.append((ln.backend, ln.batch_size, s.iterations, _us(s.min_ms), _us(s.mean_ms),
                               _si(s.queries_per_s), _si(s.samples_per_s),
                               " ".join(f"{100 * c / total:.0f}" for c in histogram)))
        for title, columns, rows in (
                (f"latency (us), routing {pattern}; ratio = median / {first}'s", LATENCY, latency),
                (f"throughput, routing {pattern}; experts % = decisions of {steered} per expert 0, 1, ...", THROUGHPUT, throughput)):
            t = table(title, columns, rows)
            t.box, t.pad_edge = box.SIMPLE_HEAD, False
            t.columns[0].min_width = max(len(ln.backend) for ln in lines)
            t.columns[-1].justify = "left"
            out.print(t)
    m = result.machine
    out.print(f"inputs: {result.inputs}")
    for name, reason in result.skipped.items():
        out.print(f"skipped {name}: {reason}")
    if result.unstable:
        out.print(f"warning: {len(result.unstable)} line(s) vary by more than {100 * CV_WARN:.1f}% (CV marked !): "
                  "the machine is busy or --duration-s too short")
    for note in result.notes:
        out.print(f"note: {note}")
    out.print(f"{m['cpu']}, {m['cores']} cores{', ' + m['gpu'] if m.get('gpu') else ''}; {result.date}; "
              f"{fmt(result.total_s)} s in all")
    for label, path in (("json", json_path), ("plot", plot)):
        if path is not None:
            out.print(f"{label}: {path}")


def _us(ms: float) -> str:
    us = ms * 1e3
    return f"{us:.1f}" if us < 100 else f"{us:.0f}"


def _si(value: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"
