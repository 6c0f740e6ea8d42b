"""Output helpers: rich tables for people, JSON for machines; progress and tables go to the right stream."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any


def console(stderr: bool = False):
    """Rich console; written to a pipe or file it is 160 columns wide rather than 80, so tables and paths
    are not cut in logs."""
    from rich.console import Console

    con = Console(stderr=stderr, highlight=False)
    if not con.is_terminal and "COLUMNS" not in os.environ:
        con = Console(stderr=stderr, highlight=False, width=160)
    return con


def print_json(obj: Any) -> None:
    from deploytool.io import dumps_json

    sys.stdout.write(dumps_json(obj))


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]):
    """A rich table; cells are plain text (escaped), so `deploytool[tensorrt]` is not read as markup."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=escape(title), title_justify="left")
    for i, col in enumerate(columns):
        t.add_column(escape(col), justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*(escape(fmt(v)) for v in row))
    return t


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return "-" if value is None else str(value)
