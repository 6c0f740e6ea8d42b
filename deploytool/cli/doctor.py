"""`deploytool doctor`: what this machine can do; with --engine, whether that engine will load here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from deploytool.cli.options import Json
from deploytool.cli.render import console, print_json, table

app = typer.Typer()


@app.command()
def doctor(
    engine: Annotated[Optional[Path], typer.Option("--engine", help="An engine (model.plan) to check against "
                                                   "this machine, using its model.plan.json.")] = None,
    json: Json = False,
) -> None:
    """Report Python, torch/CUDA, GPU, onnxruntime, TensorRT + plugins, triton, and which commands work."""
    from deploytool.diagnostics import doctor as run_doctor

    report = run_doctor(engine)
    if json:
        print_json(report)
    else:
        _show(report)
    if engine is not None and not report["engine"]["will_load"]:
        raise typer.Exit(1)


def _show(report: dict) -> None:
    from rich.markup import escape  # the verdict holds pip extras like [tensorrt], not markup

    con = console()
    torch, ort, trt = report["torch"], report["onnxruntime"], report["tensorrt"]
    gpu = report["gpu"]
    plugins = trt.get("plugins")
    con.print(table("this machine", ["component", "status"], [
        ("python", report["python"]),
        ("torch", torch["version"] and f"{torch['version']} (CUDA {torch['cuda'] or 'none'})"),
        ("gpu", gpu and f"{gpu['name']} (compute capability {gpu['compute_capability']})"),
        ("onnxruntime", ort["version"] and f"{ort['version']} ({', '.join(ort['providers'])})"),
        ("tensorrt", trt["version"]),
        ("deploytool plugins", "needs TensorRT" if not plugins
         else "registered" if plugins.get("registered") else plugins["error"]),
        ("triton", report["triton"] and report["triton"]["version"]),
    ]))
    con.print(table("commands", ["command", "works", "needs"], [
        (name, "yes" if c["works"] else "no", c["hint"]) for name, c in report["commands"].items()]))
    if "engine" in report:
        eng = report["engine"]
        built, here = eng["built"], eng["here"]
        con.print(table(f"engine {eng['path']}", ["", "built with", "here"], [
            ("tensorrt", built["tensorrt"], here["tensorrt"]),
            ("gpu", built["gpu"], here["gpu"]),
            ("compute capability", built["compute_capability"], here["compute_capability"]),
            ("deploytool ops", built["op_path"], eng["plugin"]),
        ]))
        verdict = "will load here" if eng["will_load"] else "will NOT load here: " + "; ".join(eng["problems"])
        con.print(escape(verdict))
