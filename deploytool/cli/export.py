"""`deploytool export`: run directory -> validated ONNX model with the deploytool ops."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from deploytool.cli.options import Json, OutFile
from deploytool.cli.render import console, print_json
from deploytool.cli.verify import Atol, Rtol, show_parity
from deploytool.ops.onnx_functions import DEFAULT_OPSET

app = typer.Typer()


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(
        help="A training run directory, or a Hugging Face MoE model's save_pretrained folder.")],
    out: OutFile,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset of the standard domain.")] = DEFAULT_OPSET,
    static_batch: Annotated[Optional[int], typer.Option(
        "--static-batch", help="Fix the batch dimension to this size (default: dynamic batch).")] = None,
    dispatch: Annotated[str, typer.Option(
        "--dispatch", help="sparse: each expert runs only on the rows (tokens) routed to it; dense: every expert "
                           "runs and a one-hot mask selects, which can win at batch 1 (see docs/benchmarks.md).")]
    = "sparse",
    dynamic: Annotated[Optional[list[str]], typer.Option(
        "--dynamic", help="Make another input dim dynamic, INPUT:AXIS=NAME (e.g. x:1=tokens); repeatable.")] = None,
    validate: Annotated[bool, typer.Option("--validate/--no-validate",
                                           help="Compare ONNX Runtime with PyTorch right after export.")] = True,
    keep_invalid: Annotated[bool, typer.Option("--keep-invalid",
                                               help="Keep the file even when validation fails.")] = False,
    data: Annotated[Optional[str], typer.Option(
        "--data", help="Held-out data for validation (default: the run's own data set).")] = None,
    moe_op: Annotated[str, typer.Option(
        "--moe-op", help="deploytool: the experts as --dispatch says; ort: ONNX Runtime's fused com.microsoft::MoE "
                         "op for every experts module it can compute (ONNX Runtime only), the others named; "
                         "auto: the op on small batches, deploytool's sparse graph on large ones (an ONNX If).")]
    = "deploytool",
    top_k: Annotated[Optional[int], typer.Option(
        "--top-k", help="Experts per token of a Hugging Face MoE model (1: commit to one expert; default: the "
                        "model's own k).")] = None,
    atol: Atol = None,
    rtol: Rtol = None,
    json: Json = False,
) -> None:
    """Export to ONNX (custom ops + their function bodies), validate against PyTorch; exit 1 on failure."""
    from deploytool.errors import CheckFailed
    from deploytool.export.onnx import export_onnx

    try:
        result = export_onnx(run_dir, out, opset=opset, static_batch=static_batch, dispatch=dispatch,
                             dynamic_dims=parse_dynamic(dynamic or []), validate=validate,
                             keep_invalid=keep_invalid, data=data, atol=atol, rtol=rtol, top_k=top_k,
                             moe_op=moe_op)
    except CheckFailed as exc:
        if exc.report is not None:
            _show(exc.report.to_dict(), json)
        raise
    _show(result.to_dict(), json)


def _show(result: dict, json: bool) -> None:
    if json:
        print_json(result)
        return
    if result["validation"]:
        show_parity(result["validation"], False, title="validation")
    con = console()
    routers = ", ".join(f"{r['path']} ({_picks(r)}{r['n_experts']} experts, T={r['temperature']:g})"
                        for r in result["signature"]["routers"])
    con.print(f"{'wrote' if result['passed'] else 'validation failed for'} {result['path']} (opset {result['opset']}, "
              f"batch {result['static_batch'] or 'dynamic'}, {_dispatch(result)}; routers: {routers}) "
              f"in {result['seconds']:.1f} s")
    for note in result.get("notes", []):
        con.print(f"note: {note}")


def _dispatch(result: dict) -> str:
    moe_op = result["metadata"].get("deploytool.moe_op", "deploytool")
    return f"{result['dispatch']} dispatch" + {"ort": ", ONNX Runtime's MoE op",
                                                "auto": ", ONNX Runtime's MoE op on small batches"}.get(moe_op, "")


def _picks(router: dict) -> str:
    k = router.get("k", 1)
    return "" if k == 1 else f"top-{k} of "


def parse_dynamic(values: list[str]) -> dict[str, dict[int, str]]:
    """INPUT:AXIS=NAME strings as {input: {axis: name}}; a malformed one is BadInput."""
    from deploytool.errors import BadInput

    dims: dict[str, dict[int, str]] = {}
    for value in values:
        where, _, name = value.partition("=")
        tensor, _, axis = where.rpartition(":")
        if not tensor or not axis.isdigit() or not name:
            raise BadInput(f"--dynamic {value!r}: give INPUT:AXIS=NAME, e.g. x:1=tokens")
        dims.setdefault(tensor, {})[int(axis)] = name
    return dims
