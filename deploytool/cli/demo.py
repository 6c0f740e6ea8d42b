"""`deploytool demo`: the whole chain on the built-in model and data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from deploytool.cli.options import Json, Quiet
from deploytool.cli.render import console, print_json, table

app = typer.Typer()


@app.command()
def demo(
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Directory for every artifact (default: a new deploytool-demo-* temporary directory; "
                            "one the demo creates is removed again if it is interrupted).")] = None,
    recipe: Annotated[str, typer.Option(
        "--recipe", help="Built-in recipe (digits-4: routed MLP, digits-cnn: image model, digits-transformer: "
                         "token-level MoE with 2 routers) or a TOML file.")] = "digits-4",
    force: Annotated[bool, typer.Option("--force", help="Replace what an earlier demo left in --out.")] = False,
    json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Run the whole chain on digits: train, export, verify, bench, package (TensorRT where available)."""
    from deploytool.pipeline import demo as run_demo

    result = run_demo(out, recipe=recipe, force=force, progress=not (quiet or json))
    _show(result, json)
    if not result["passed"]:
        from deploytool.errors import CheckFailed

        failed = next(s for s in result["steps"] if s["status"] == "failed")
        raise CheckFailed(f"demo stopped at {failed['step']}: {failed['detail']}")


def _show(result: dict, json: bool) -> None:
    if json:
        print_json(result)
        return
    con = console()
    con.print(table("deploytool demo", ["step", "status", "seconds", "detail"],
                    [(s["step"], s["status"], s["seconds"], s["detail"]) for s in result["steps"]]))
    con.print(table("artifacts", ["artifact", "path"], sorted(result["artifacts"].items())))
    con.print(table("key numbers", ["figure", "value"], sorted(result["key_numbers"].items())))
    con.print(f"total {result['seconds']:.1f} s")
