"""One progress bar for long work (training, studies, benchmarks), drawn on stderr when it is a terminal."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def progress_bar(label: str, total: int, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yield `advance(status="")`: one step done, with a short status (e.g. the loss) after the bar.

    A no-op when disabled or when stderr is not a terminal (logs and pipes get no bar debris).

    Args:
        label: the bar's label.
        total: steps in all.
        enabled: show a bar at all.

    Yields:
        The `advance` callable.
    """
    from rich.console import Console

    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield lambda status="": None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(label, total=total, status="")
        yield lambda status="": bar.update(task, advance=1, status=status)
