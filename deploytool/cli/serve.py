"""`deploytool package` (a Triton model repository) and `deploytool serve` (a live Triton server)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from deploytool.cli.options import Json
from deploytool.cli.render import console, print_json, table

app = typer.Typer()

Target = Annotated[Path, typer.Argument(
    help="A run directory, a Hugging Face MoE folder (exported first), an .onnx file or a TensorRT engine (.plan).")]
MaxBatch = Annotated[int, typer.Option("--max-batch", help="Triton max_batch_size (0: no batching).")]
DynamicBatching = Annotated[bool, typer.Option("--dynamic-batching", help="Let Triton batch requests together.")]
PreferredBatch = Annotated[str, typer.Option("--preferred-batch", help="Preferred batch sizes, e.g. 8,32.")]
QueueDelay = Annotated[int, typer.Option("--max-queue-delay-us", help="Longest wait to fill a batch (us).")]
Instances = Annotated[int, typer.Option("--instances", help="Model instances (parallel executions).")]
TopK = Annotated[Optional[int], typer.Option(
    "--top-k", help="A Hugging Face folder's experts per token (1: one expert; default: the model's own k).")]


@app.command()
def package(
    target: Target,
    repository: Annotated[Path, typer.Option("--repository", help="Model repository directory.")],
    name: Annotated[str, typer.Option("--name", help="Model name (letters, digits, . _ -).")],
    max_batch: MaxBatch = 64,
    dynamic_batching: DynamicBatching = False,
    preferred_batch: PreferredBatch = "8,32",
    max_queue_delay_us: QueueDelay = 100,
    instances: Instances = 1,
    backend: Annotated[str, typer.Option("--backend", help="auto, tensorrt, onnxruntime or python.")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing model of that name.")] = False,
    top_k: TopK = None,
    json: Json = False,
) -> None:
    """Write a Triton Inference Server model repository entry (config.pbtxt, model, README.md)."""
    from deploytool.serving.repository import package as write_package

    result = write_package(target, repository, name, max_batch=max_batch, dynamic_batching=dynamic_batching,
                           preferred_batch=preferred_batch, max_queue_delay_us=max_queue_delay_us,
                           instances=instances, backend=backend, force=force, top_k=top_k)
    if json:
        print_json(result.to_dict())
        return
    runtime = f" (deploytool runtime: {result.runtime_backend})" if result.runtime_backend else ""
    rows = [("model", str(result.model_dir)), ("backend", result.backend + runtime),
            ("max_batch_size", result.config["max_batch_size"]),
            ("config", "validated with Triton's ModelConfig schema" if result.validated
             else "not validated (install tritonclient to check it against Triton's schema)"),
            *[("file", f) for f in result.files]]
    con = console()
    con.print(table(f"Triton model {result.name}", ["", "value"], rows))
    con.print(f"serve it: see {result.readme}")


@app.command()
def serve(
    target: Target,
    port: Annotated[int, typer.Option("--port", help="HTTP port (KServe v2).")] = 8000,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0 for every interface).")]
    = "127.0.0.1",
    grpc_port: Annotated[Optional[int], typer.Option("--grpc-port", help="gRPC port (default: the HTTP port + 1).")]
    = None,
    name: Annotated[str, typer.Option("--name", help="Model name in the URL /v2/models/NAME.")] = "model",
    max_batch: MaxBatch = 64,
    dynamic_batching: DynamicBatching = False,
    preferred_batch: PreferredBatch = "8,32",
    max_queue_delay_us: QueueDelay = 100,
    instances: Instances = 1,
    top_k: TopK = None,
) -> None:
    """Serve a model with Triton Inference Server (HTTP and gRPC) until Ctrl-C."""
    from deploytool.serving.server import serve as run_server

    def ready(server) -> None:
        typer.echo(f"serving {server.name}: http://{server.http_url}/v2/models/{server.name}, "
                   f"gRPC {server.grpc_url} (Ctrl-C to stop)", err=True)

    run_server(target, port=port, host=host, grpc_port=grpc_port, name=name, max_batch=max_batch,
               dynamic_batching=dynamic_batching, preferred_batch=preferred_batch,
               max_queue_delay_us=max_queue_delay_us, instances=instances, on_ready=ready, top_k=top_k)
    typer.echo("server stopped", err=True)
