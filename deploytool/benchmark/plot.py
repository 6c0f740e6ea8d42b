"""The latency plot: percentiles by batch size per backend, log-log, one panel per routing pattern."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from deploytool.io import atomic_path

if TYPE_CHECKING:
    from deploytool.benchmark.run import BenchResult

#: (stat field, label, line style, marker); the band between p90 and p99 is shaded. Markers keep a
#: single batch size (no line to draw) showing both figures.
CURVES = (("median_ms", "median", "-", "o"), ("p99_ms", "p99", ":", "^"))


def plot_latency(result: "BenchResult", path: str | Path) -> Path:
    """Write the latency plot of a bench result as a PNG, atomically.

    Args:
        result: the BenchResult.
        path: the .png to write.

    Returns:
        The path written.
    """
    fig = draw_latency(result)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return Path(path)


def draw_latency(result: "BenchResult"):
    """The figure, built without pyplot: a library caller's matplotlib backend and figure list stay as they were."""
    from matplotlib import rcParams
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    patterns = list(dict.fromkeys(line.routing for line in result.lines))
    backends = list(dict.fromkeys(line.backend for line in result.lines))
    if not patterns:
        raise ValueError("nothing was measured; no plot to draw")
    fig = Figure(figsize=(5.2 * len(patterns) + 1.0, 4.6))
    axes = fig.subplots(1, len(patterns), squeeze=False, sharey=True)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, pattern in zip(axes[0], patterns):
        for k, backend in enumerate(backends):
            lines = sorted((ln for ln in result.lines if ln.backend == backend and ln.routing == pattern),
                           key=lambda ln: ln.batch_size)
            if not lines:
                continue
            x = [ln.batch_size for ln in lines]
            color = colors[k % len(colors)]
            p90, p99 = [ln.stats.p90_ms for ln in lines], [ln.stats.p99_ms for ln in lines]
            if len(x) > 1:
                ax.fill_between(x, p90, p99, color=color, alpha=0.15, linewidth=0)
            else:  # an area of zero width draws nothing: a thick bar instead
                ax.vlines(x, p90, p99, color=color, alpha=0.25, linewidth=10)
            for field, _, style, marker in CURVES:
                ax.plot(x, [getattr(ln.stats, field) for ln in lines], style, color=color, marker=marker,
                        markersize=4, label=backend if style == "-" else None)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted({ln.batch_size for ln in result.lines}))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(plain)
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xlabel("batch size")
        ax.set_title(f"routing: {pattern}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("latency per call (ms, log)")
    backend_legend = axes[0][0].legend(loc="upper left", title="backend", fontsize=8, title_fontsize=8)
    axes[0][0].add_artist(backend_legend)
    styles = [Line2D([], [], color="gray", linestyle=s, marker=m, markersize=4, label=label)
              for _, label, s, m in CURVES]
    styles.append(Patch(color="gray", alpha=0.25, label="p90..p99"))
    axes[0][-1].legend(handles=styles, loc="lower right", fontsize=8)
    machine = result.machine
    fig.suptitle(f"deploytool bench: {Path(result.target).name}, {result.inputs}\n{machine.get('cpu', '?')} "
                 f"({machine.get('cores', '?')} cores{', ' + machine['gpu'] if machine.get('gpu') else ''}), "
                 f"{result.date[:10]}", fontsize=10)
    fig.tight_layout()
    return fig
