"""Options that recur across commands, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout instead of tables.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed (data split, initialisation, sampling).")]
OutDir = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory.")]
OutFile = Annotated[Path, typer.Option("--out", "-o", help="Output file (written atomically).")]
Backends = Annotated[str, typer.Option("--backends", "-b",
                                       help="Comma-separated backends: torch, torch-dense, torch-sparse, "
                                            "onnxruntime, onnxruntime-cuda, tensorrt.")]
Data = Annotated[Optional[str], typer.Option(
    "--data", help="Samples to feed: digits, blobs, an .npz with arrays x and y, or an .npz of one array per "
                   "input name (default: the run's own data set, else made-up inputs from the model's signature).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def split_list(value: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']."""
    return [part.strip() for part in value.split(",") if part.strip()]
