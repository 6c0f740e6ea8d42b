"""`deploytool build-engine`: ONNX model -> TensorRT engine + manifest (or, with --dry-run, the plan)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from deploytool.cli.options import Json
from deploytool.cli.render import console, print_json, table

app = typer.Typer()


@app.command("build-engine")
def build_engine(
    model: Annotated[Path, typer.Argument(help="ONNX model (from deploytool export).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Engine file to write, e.g. model.plan "
                                                "(written atomically, with model.plan.json beside it).")] = None,
    precision: Annotated[str, typer.Option("--precision", help="fp32, fp16 or bf16.")] = "fp32",
    min_batch: Annotated[int, typer.Option("--min-batch", help="Smallest batch the engine accepts.")] = 1,
    opt_batch: Annotated[int, typer.Option("--opt-batch", help="Batch TensorRT tunes for.")] = 64,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Largest batch the engine accepts.")] = 1024,
    dim: Annotated[Optional[list[str]], typer.Option(
        "--dim", help="Range of another dynamic dim, NAME=MIN:OPT:MAX (e.g. tokens=1:8:64); repeatable. "
                      "Without it such a dim is fixed at the export example's size.")] = None,
    workspace: Annotated[int, typer.Option("--workspace", help="Builder workspace limit in MiB.")] = 1024,
    timing_cache: Annotated[Optional[Path], typer.Option(
        "--timing-cache", help="Timing cache file: read if present, updated after the build.")] = None,
    plugin: Annotated[bool, typer.Option(
        "--plugin/--no-plugin", help="Run deploytool's ops as the embedded Triton kernel (plugin) or as their "
                                     "ONNX functions in standard layers.")] = True,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the build plan as JSON; needs no TensorRT.")] = False,
    json: Json = False,
) -> None:
    """Build a TensorRT engine; exit 3 when TensorRT or a GPU is missing (nothing is written then)."""
    from deploytool.engine.build import build_engine as build
    from deploytool.errors import BadInput

    if out is None and not dry_run:
        raise BadInput("give the engine file to write with --out (e.g. --out model.plan), or --dry-run for the plan")

    result = build(model, out, precision=precision, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                   dims=parse_dims(dim or []), workspace_mib=workspace, timing_cache=timing_cache, plugin=plugin, dry_run=dry_run)
    if dry_run or json:
        print_json(result.to_dict())
        return
    data = result.to_dict()
    plan = data["plan"]
    con = console()
    con.print(table(f"engine {data['engine']}", ["", ""], [
        ("precision", _precision_line(plan)),
        ("profile", "; ".join(f"{name} {s['min']} .. {s['opt']} .. {s['max']}" for name, s in plan["profile"].items())),
        ("deploytool ops", _op_path_line(data, plan)),
        ("manifest", data["manifest"]),
    ]))


def _precision_line(plan: dict) -> str:
    if plan["lower_to"]:
        return f"{plan['precision']} (fp32 model lowered in-graph; routing kept in fp32)"
    return f"{plan['precision']} (the model's own types)"


def _op_path_line(data: dict, plan: dict) -> str:
    if data["op_path"] == "plugin":
        return f"plugin path: {len(data['plugin_layers'])} plugin layer(s), Triton kernel embedded as PTX"
    if plan["op_path"] == "plugin":
        return "local-function path: the parser found no registered deploytool plugin for these nodes"
    return "local-function path (ONNX function bodies as standard layers)"


def parse_dims(values: list[str]) -> dict[str, tuple[int, int, int]]:
    """NAME=MIN:OPT:MAX strings as {name: (min, opt, max)}; a malformed one is BadInput."""
    from deploytool.errors import BadInput

    dims = {}
    for value in values:
        name, _, spec = value.partition("=")
        parts = spec.split(":")
        if not name or len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise BadInput(f"--dim {value!r}: give NAME=MIN:OPT:MAX with whole numbers, e.g. tokens=1:8:64")
        dims[name.strip()] = tuple(int(p) for p in parts)
    return dims
