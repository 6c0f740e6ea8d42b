"""The manifest written beside every engine (`model.plan.json`): what it was built from, with what, for what.

A TensorRT engine only loads under the TensorRT version and on the GPU architecture it was built for;
the manifest records both so `deploytool doctor --engine` can say, before loading, whether it will.
"""

from __future__ import annotations

import datetime as _dt

from deploytool import __version__

SCHEMA = 1


def build_manifest(plan, *, machine: dict, op_path: str, plugin_layers: list[str], embedded_ptx: dict[str, dict[str, str]],
                   kernel_source_sha256: str | None, io: dict) -> dict:
    """The manifest of an engine just built from `plan` on `machine` (diagnostics.describe_machine()).

    `embedded_ptx` maps plugin id -> {"in->outs" dtype variant: sha256 of the PTX the AOT plugin
    handed TensorRT during this build}; the engine embeds the variant each plugin layer runs.

    Args:
        plan: the EngineBuildPlan built from.
        machine: the machine's description (machine.describe_machine()).
        op_path: how deploytool's ops were built (plugin or function).
        plugin_layers: names of the plugin layers.
        embedded_ptx: plugin id -> {dtype variant: sha256 of its PTX}.
        kernel_source_sha256: sha256 of the kernel source (None without the plugin).
        io: the network's inputs and outputs.

    Returns:
        The manifest, as written beside the engine.
    """

    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "deploytool": __version__,
        "tensorrt": machine.get("tensorrt"),
        "cuda": machine.get("cuda"),
        "gpu": machine.get("gpu"),
        "compute_capability": machine.get("compute_capability"),
        "precision": plan.precision,
        #: None, or the precision the fp32 model was lowered to in-graph (routing kept in fp32)
        "lowered_to": plan.lower_to,
        "profile": plan.profile,
        "io": io,
        "op_path": op_path,
        "plugin_ids": plan.plugin_ids if op_path == "plugin" else [],
        "plugin_layers": plugin_layers,
        "kernel_source_sha256": kernel_source_sha256 if op_path == "plugin" else None,
        "embedded_ptx_sha256": embedded_ptx if op_path == "plugin" else {},
        "onnx": {"path": plan.onnx_path, "sha256": plan.onnx_sha256},
        #: the ONNX model's signature (routers included) and metadata, read back by artifacts.open_artifact
        "signature": plan.signature,
        "metadata": plan.metadata,
        "plan": plan.to_dict(),
    }


def load_problems(manifest: dict, machine: dict) -> list[str]:
    """Why the engine described by `manifest` would not load on `machine`; empty when it should.

    Args:
        manifest: the engine's manifest.
        machine: this machine's description (machine.describe_machine()).

    Returns:
        One line per problem.
    """
    problems = []
    if not machine.get("tensorrt"):
        problems.append('TensorRT is not installed here (pip install "deploytool[tensorrt]")')
    elif machine["tensorrt"] != manifest.get("tensorrt"):
        problems.append(f"built with TensorRT {manifest.get('tensorrt')}, this machine has {machine['tensorrt']} "
                        "(engines load only under the TensorRT version that built them): rebuild here")
    if not machine.get("compute_capability"):
        problems.append("no CUDA GPU is visible here")
    elif machine["compute_capability"] != manifest.get("compute_capability"):
        problems.append(f"built for compute capability {manifest.get('compute_capability')} "
                        f"({manifest.get('gpu')}), this GPU is {machine['compute_capability']} "
                        f"({machine.get('gpu')}): rebuild on this GPU")
    return problems
