"""One progress bar for long work (training, studies, benchmarks), drawn on stderr."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def progress_bar(label: str, total: int, enabled: bool = True, **fields: float) -> Iterator[Callable[..., None]]:
    """Yield `advance(**fields)`; extra fields (e.g. loss) are shown after the bar. A no-op when disabled."""
    if not enabled:
        yield lambda **_: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn(label), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(f"{name} {{task.fields[{name}]:.4g}}") for name in fields]
    with Progress(*columns, TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total, **fields)
        yield lambda **values: bar.update(task, advance=1, **values)
