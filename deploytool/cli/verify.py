"""`deploytool verify`: routing-aware parity between backends; also renders export's validation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from deploytool.cli.options import Backends, Data, Json
from deploytool.cli.render import console, print_json, table

app = typer.Typer()

Atol = Annotated[Optional[float], typer.Option("--atol", help="Absolute tolerance (default: by dtype).")]
_STATS = [("max abs", "max_abs"), ("mean abs", "mean_abs"), ("p99 abs", "p99_abs"), ("max rel", "max_rel"),
          ("mean rel", "mean_rel"), ("p99 rel", "p99_rel"), ("atol", "atol"), ("rtol", "rtol"),
          ("smallest passing atol", "min_atol"), ("rows compared", "rows")]
Rtol = Annotated[Optional[float], typer.Option("--rtol", help="Relative tolerance (default: by dtype).")]


@app.command()
def verify(
    models: Annotated[list[Path], typer.Argument(
        help="The ONNX model (or a TensorRT engine); several exports of one model (e.g. sparse and dense) "
             "are compared with each other too.")],
    checkpoint: Annotated[Optional[Path], typer.Option(
        "--checkpoint", "-c", help="Run directory (or its model.safetensors) for the torch backends.")] = None,
    backends: Backends = "torch,onnxruntime",
    data: Data = None,
    samples: Annotated[Optional[int], typer.Option("--samples", "-n", help="Rows to compare.")] = None,
    atol: Atol = None,
    rtol: Rtol = None,
    json: Json = False,
) -> None:
    """Compare every pair of backends per output and per routing decision; exit 1 on a failure."""
    from deploytool.errors import CheckFailed
    from deploytool.parity import verify as run_verify

    options = {"samples": samples} if samples is not None else {}
    report = run_verify(models, checkpoint=checkpoint, backends=backends, data=data, atol=atol, rtol=rtol, **options)
    show_parity(report.to_dict(), json)
    if not report.passed:
        raise CheckFailed("parity failed: " + " | ".join(report.failures()))


def show_parity(report: dict[str, Any], json: bool, title: str = "parity") -> None:
    """One table per comparison (outputs) plus its routing line; or the whole dict as JSON."""
    if json:
        print_json(report)
        return
    con = console()
    for c in report["comparisons"]:
        verdict = "PASS" if c["passed"] else "FAIL"
        outs = c["outputs"]
        rows = [(label, *(o[key] for o in outs)) for label, key in _STATS]
        rows.append(("result", *("pass" if o["passed"] else f"FAIL {o['note']}".strip() for o in outs)))
        con.print(table(f"{title}: {c['candidate']} vs {c['reference']} on {c['inputs']}: {verdict}",
                        ["", *(o["name"] for o in outs)], rows))
        for r in c["routing"]:
            buckets = ", ".join(f"[{b['lo']:g}, {b['hi']:g}): {b['flips']}" for b in r["buckets"] if b["flips"])
            con.print(f"router {r['router']}: {r['agreement']:.2f}% agree over {r['rows']} decisions, {r['flips']} "
                      f"flips ({r['tie_breaks']} tie-breaks below margin {r['tie_margin']:.3g} or after one, "
                      f"{r['failures']} failures)" + (f"; flips by reference margin: {buckets}" if buckets else ""))
        for note in c["notes"]:
            con.print(f"note: {note}")
    for note in report.get("notes", []):
        con.print(f"note: {note}")
    con.print(f"{title}: {'PASS' if report['passed'] else 'FAIL'}")
