"""`deploytool demo`: the whole chain on the built-in model and data."""

from __future__ import annotations

from deploytool.cli.options import Json, OutDir, Quiet
from deploytool.cli.render import console, print_json, table

import typer

app = typer.Typer()


@app.command()
def demo(out: OutDir = None, json: Json = False, quiet: Quiet = False) -> None:
    """Run the whole chain on digits: train, export, verify, bench, package (TensorRT where available)."""
    from deploytool.pipeline import demo as run_demo

    result = run_demo(out, progress=not (quiet or json))
    if json:
        print_json(result)
        return
    con = console()
    con.print(table("deploytool demo", ["step", "status", "seconds", "detail"],
                    [(s["step"], s["status"], s["seconds"], s["detail"]) for s in result["steps"]]))
    con.print(table("artifacts", ["artifact", "path"], sorted(result["artifacts"].items())))
    con.print(table("key numbers", ["figure", "value"], sorted(result["key_numbers"].items())))
    con.print(f"total {result['seconds']:.1f} s")
