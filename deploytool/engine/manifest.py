"""The manifest written beside every engine (`model.plan.json`): what it was built from, with what, for what.

A TensorRT engine only loads under the TensorRT version and on the GPU architecture it was built for;
the manifest records both so `deploytool doctor --engine` can say, before loading, whether it will.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import TYPE_CHECKING

from deploytool.errors import BadInput
from deploytool.io import read_json

if TYPE_CHECKING:
    from deploytool.runners.base import TensorMeta

SCHEMA = 1


def manifest_path(engine_path: str | Path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def build_manifest(plan, *, machine: dict, op_path: str, plugin_layers: list[str], embedded_ptx: dict[str, dict[str, str]],
                   kernel_source_sha256: str | None, io: dict) -> dict:
    """The manifest of an engine just built from `plan` on `machine` (diagnostics.describe_machine()).

    `embedded_ptx` maps plugin id -> {"in->outs" dtype variant: sha256 of the PTX the AOT plugin
    handed TensorRT during this build}; the engine embeds the variant each plugin layer runs.
    """
    from deploytool import __version__

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
        "plan": plan.to_dict(),
    }


def read_manifest(engine_path: str | Path) -> dict:
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise BadInput(f"engine {engine_path} does not exist")
    path = manifest_path(engine_path)
    if not path.is_file():
        raise BadInput(f"engine {engine_path} has no manifest {path.name}; rebuild it with deploytool build-engine")
    manifest = read_json(path, "engine manifest")
    problem = _manifest_problem(manifest)
    if problem:
        raise BadInput(f"{path} is not a deploytool engine manifest ({problem}); "
                       "rebuild the engine with deploytool build-engine")
    return manifest


def _manifest_problem(manifest) -> str | None:
    """What a manifest lacks that readers (runner, package, doctor) rely on; None when whole."""
    if not isinstance(manifest, dict):
        return "not a JSON object"
    if "tensorrt" not in manifest:
        return "no tensorrt version"
    io = manifest.get("io")
    if not isinstance(io, dict):
        return "no io"
    for kind in ("inputs", "outputs"):
        tensors = io.get(kind)
        if not isinstance(tensors, list) or not tensors or not all(map(_is_tensor, tensors)):
            return f"io.{kind} is not a list of tensors with name, dtype and shape"
    profile = manifest.get("profile")
    if not isinstance(profile, dict):
        return "no profile"
    for name, shapes in profile.items():
        if not (isinstance(shapes, dict) and all(_is_shape(shapes.get(k)) for k in ("min", "opt", "max"))):
            return f"profile of {name!r} lacks integer min, opt and max shapes"
    return None


def _is_shape(shape) -> bool:
    return isinstance(shape, list) and bool(shape) and all(isinstance(d, int) and not isinstance(d, bool)
                                                           for d in shape)


def _is_tensor(t) -> bool:
    return (isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("dtype"), str)
            and isinstance(t.get("shape"), list) and all(isinstance(d, int) for d in t["shape"]))


def tensor_metas(manifest: dict, kind: str) -> list[TensorMeta]:
    """The engine's "inputs" or "outputs" as TensorMeta (a -1 dim is dynamic: None), from a read manifest."""
    from deploytool.runners.base import TensorMeta

    return [TensorMeta(t["name"], t["dtype"], tuple(None if d < 0 else d for d in t["shape"]))
            for t in manifest["io"][kind]]


def max_batch(manifest: dict) -> int | None:
    """The largest batch every input of the engine's profile accepts; None for an engine without a profile."""
    return min((shapes["max"][0] for shapes in manifest["profile"].values()), default=None)


def load_problems(manifest: dict, machine: dict) -> list[str]:
    """Why the engine described by `manifest` would not load on `machine`; empty when it should."""
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
