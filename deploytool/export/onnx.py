"""Export a routed model to ONNX with the deploytool ops, then validate it against PyTorch.

The routing step becomes two custom nodes (deploytool::TemperedSoftmax, deploytool::HardSelect,
emitted by deploytool.ops.functional under torch.onnx's dynamo export) whose bodies travel with the
model as local functions, so every ONNX runtime can run it. The model is exported in evaluation mode
with dense dispatch (an ONNX graph has no cheap per-row dispatch: every expert runs, the one-hot mask
selects). The file lands at its target only after onnx.checker and validation pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deploytool import io
from deploytool.errors import BadInput, CheckFailed, first_line
from deploytool.ops import DOMAIN, HARD_SELECT, TEMPERED_SOFTMAX
from deploytool.ops.onnx_functions import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET
from deploytool.runners import INPUT_NAME, OUTPUT_NAMES
from deploytool.runners.base import TensorMeta

if TYPE_CHECKING:
    from torch import nn

    from deploytool.parity import ParityReport

VALIDATION_BATCH = 256
META_PREFIX = "deploytool."


@dataclass
class ExportResult:
    path: Path
    opset: int
    static_batch: int | None
    metadata: dict[str, str]
    seconds: float
    validation: ParityReport | None = None

    @property
    def passed(self) -> bool:
        return self.validation is None or self.validation.passed

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "validation"}
        out["validation"] = self.validation.to_dict() if self.validation else None
        out["passed"] = self.passed
        return out


def export_onnx(model: str | Path | nn.Module, path: str | Path, *, checkpoint: str | Path | None = None,
                opset: int = DEFAULT_OPSET, static_batch: int | None = None, validate: bool = True,
                keep_invalid: bool = False, data: str | Path | np.ndarray | None = None,
                atol: float | None = None, rtol: float | None = None, seed: int = 0) -> ExportResult:
    """Export a run directory (or an nn.Module using deploytool.nn.Router) to `path`, validated.

    The input is `x [batch, features]` (batch fixed to `static_batch` if given), the outputs
    `output`, `index`, `probs`. Validation compares ONNX Runtime with PyTorch on held-out rows of
    `data` (the run's own data set by default) and random rows at batch 1 and 256; when it fails,
    CheckFailed(report=result) is raised and nothing is left at `path` unless `keep_invalid`.
    """
    from deploytool.compare import check_tolerances

    start = time.perf_counter()
    path = io.check_parent_dir(path)
    if path.suffix.lower() != ".onnx":
        raise BadInput(f"--out {path} must end in .onnx (tools downstream tell models from engines by suffix)")
    check_tolerances(atol, rtol)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise BadInput(f"opset {opset} is not supported; use {MIN_OPSET}..{MAX_OPSET}")
    if static_batch is not None and static_batch < 1:
        raise BadInput(f"static batch must be >= 1, got {static_batch}")
    module, source, sha256, run_config = _resolve(model, checkpoint)
    proto, metadata = to_onnx(module, opset=opset, static_batch=static_batch, source=source, sha256=sha256)
    result = ExportResult(path, opset, static_batch, metadata, 0.0)
    with io.atomic_path(path) as tmp:
        _save(proto, tmp)
        if validate:
            inputs = validation_inputs(module, data, run_config, seed)
            result.validation = validate_export(module, tmp, inputs, atol=atol, rtol=rtol)
            result.validation.model = str(path)
        result.seconds = round(time.perf_counter() - start, 3)
        if not result.passed and not keep_invalid:
            raise CheckFailed(f"exported model failed validation, not written to {path}: "
                              + " | ".join(result.validation.failures()), report=result)
    if not result.passed:
        raise CheckFailed(f"exported model failed validation (kept at {path} by --keep-invalid): "
                          + " | ".join(result.validation.failures()), report=result)
    return result


def _resolve(model: Any, checkpoint: str | Path | None) -> tuple[nn.Module, str, str, dict | None]:
    """(module, source label, sha256 of its weights, run config or None)."""
    from torch import nn

    if isinstance(model, nn.Module):
        if checkpoint is not None:
            raise BadInput("checkpoint= applies to a run directory; load the weights into your module instead")
        return model, f"module:{type(model).__name__}", state_dict_sha256(model), None
    from deploytool.training import load_model, load_run

    run = load_run(model)
    weights = Path(checkpoint) if checkpoint else run.weights
    # absolute: tools that later read the source back (bench) run from another directory
    return load_model(run.path, weights), str(Path(run.path).resolve()), io.sha256_file(weights), run.config


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 of the module's weights as a safetensors file would hold them."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return hashlib.sha256(save(tensors)).hexdigest()


def _save(proto, path: Path) -> None:
    path.write_bytes(proto.SerializeToString())


def to_onnx(module: nn.Module, *, opset: int = DEFAULT_OPSET, static_batch: int | None = None,
            source: str = "", sha256: str = ""):
    """The checked ModelProto and its deploytool metadata props."""
    import onnx
    import torch

    from deploytool import __version__
    from deploytool.ops.onnx_functions import attach
    from deploytool.runners.torch import in_features_of, outputs_as_dict

    routers = _routers(module)
    in_features = in_features_of(module)
    example = torch.randn(static_batch or 2, in_features)
    with export_mode(module) as temperatures:
        with torch.no_grad():
            returned = outputs_as_dict(module(example))
        if tuple(returned) != OUTPUT_NAMES:
            raise BadInput(f"{type(module).__name__}.forward returns {len(returned)} output(s); export needs "
                           f"({', '.join(OUTPUT_NAMES)}), e.g. a deploytool.nn.RoutedOutput")
        dynamic = None if static_batch else ({0: torch.export.Dim("batch")},)
        with _quiet_torch():
            program = torch.onnx.export(module, (example,), dynamo=True, input_names=[INPUT_NAME],
                                        output_names=list(OUTPUT_NAMES), dynamic_shapes=dynamic,
                                        opset_version=opset, optimize=True, verbose=False)
    proto = program.model_proto
    ops = {n.op_type for n in proto.graph.node if n.domain == DOMAIN}
    if not {TEMPERED_SOFTMAX, HARD_SELECT} <= ops:
        raise CheckFailed(f"the exported graph lacks the deploytool routing ops (found {sorted(ops)}); "
                          "the model must route through deploytool.nn.Router")
    attach(proto, opset)
    metadata = {
        "version": __version__,
        "temperature": ",".join(f"{t:g}" for t in temperatures),
        "experts": ",".join(str(r.n_experts) for r in routers),
        "in_features": str(in_features),
        "checkpoint_sha256": sha256,
        "source": source,
        "opset": str(opset),
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, value
    proto.doc_string = f"routed model exported by deploytool {__version__} from {source}"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise CheckFailed(f"the exported model fails onnx.checker: {first_line(exc)}") from exc
    return proto, {META_PREFIX + k: v for k, v in metadata.items()}


def _routers(module: nn.Module) -> list:
    from deploytool.nn import Router

    routers = [m for m in module.modules() if isinstance(m, Router)]
    if not routers:
        raise BadInput(f"{type(module).__name__} has no deploytool.nn.Router: there is no routing to export")
    return routers


@contextlib.contextmanager
def export_mode(module: nn.Module) -> Iterator[list[float]]:
    """Eval, hard routing and dense dispatch (ONNX has no per-row dispatch); yields the temperatures.

    Everything is restored afterwards, so the caller's module is unchanged.
    """
    from deploytool.nn import dispatch_mode, routing_mode

    routers = _routers(module)
    was_training = module.training
    try:
        module.eval()
        with routing_mode(module, "hard"), dispatch_mode(module, "dense"):
            yield [r.temperature for r in routers]
    finally:
        module.train(was_training)


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """torch.onnx logs warnings (missing torchvision, capture strategies) that are no news to a user."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch.fx", "torch._export")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def validation_inputs(module: nn.Module, data: str | Path | np.ndarray | None, run_config: dict | None,
                      seed: int = 0) -> dict[str, np.ndarray]:
    """Held-out rows (when a data set is known) and random rows at batch 1 and a larger batch.

    The same sets serve a static-batch export: run_batched feeds it in padded chunks of its batch.
    """
    from deploytool.parity import check_inputs, load_inputs
    from deploytool.runners.torch import in_features_of

    n_features = in_features_of(module)
    label = held_out = None
    if data is not None:
        label, held_out = load_inputs(data, seed=seed)
    elif run_config is not None:
        label, held_out = load_inputs(run_config.get("dataset", "digits"), seed=run_config.get("seed", seed),
                                      **run_config.get("data_options", {}))
    inputs: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(seed)
    mean, std = 0.0, 1.0
    if held_out is not None:
        held_out = check_inputs(held_out, n_features, what=f"{label} rows")
        mean, std = held_out.mean(0), held_out.std(0) + 1e-3
        if len(held_out):
            inputs[label] = held_out
    for batch in (1, VALIDATION_BATCH):
        inputs[f"random batch {batch}"] = (mean + std * rng.standard_normal((batch, n_features))).astype(np.float32)
    return inputs


def validate_export(module: nn.Module, onnx_path: str | Path, inputs: dict[str, np.ndarray], *,
                    atol: float | None = None, rtol: float | None = None) -> ParityReport:
    """ONNX Runtime (CPU) against the module with dense dispatch, on every input set.

    A static-batch model is fed in chunks of its own batch (parity.run_batched pads the last one).
    """
    from deploytool.parity import ParityReport, compare_runners
    from deploytool.runners.ort import OnnxRuntimeRunner
    from deploytool.runners.torch import TorchRunner

    runners = [TorchRunner(module, dispatch="dense", name="torch"),
               OnnxRuntimeRunner(onnx_path, device="cpu")]
    comparisons = compare_runners(runners, inputs, atol=atol, rtol=rtol, batch_size=VALIDATION_BATCH)
    return ParityReport(str(onnx_path), [r.name for r in runners], {k: len(v) for k, v in inputs.items()},
                        comparisons)


def load_onnx(path: str | Path):
    """The ModelProto at `path` (external data not loaded); a missing path, a directory, a run
    directory, or an empty, truncated or non-ONNX file is BadInput."""
    from deploytool.runners.ort import check_onnx_file

    onnx = _onnx()
    path = check_onnx_file(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise BadInput(f"{path} is not an ONNX model (or is truncated): {type(exc).__name__}") from exc
    if not proto.graph.node:  # an empty file parses as an empty model
        raise BadInput(f"{path} is not an ONNX model (or is truncated): it has no graph")
    return proto


def read_external_weights(model, onnx_path: str | Path):
    """`model` (from load_onnx) with its external data, if any, read in from beside `onnx_path`;
    a missing or short weights file is BadInput."""
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    if any(uses_external_data(t) for t in model.graph.initializer):
        onnx = _onnx()
        try:
            load_external_data_for_model(model, str(Path(onnx_path).resolve().parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise BadInput(f"{onnx_path}: its external weights cannot be read ({first_line(exc)})") from exc
    return model


#: onnx.TensorProto element type -> NumPy dtype name (bfloat16 by name: NumPy has none)
ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
               10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}


def graph_signature(model) -> tuple[list[TensorMeta], list[TensorMeta]]:
    """(inputs, outputs) of a ModelProto's graph; initializers listed as inputs are not inputs."""
    onnx = _onnx()
    graph = model.graph
    initializers = {t.name for t in graph.initializer}

    def meta(value) -> TensorMeta:
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
        dtype = ONNX_DTYPES.get(tensor.elem_type) or onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
        return TensorMeta(value.name, dtype, dims)

    return [meta(v) for v in graph.input if v.name not in initializers], [meta(v) for v in graph.output]


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The model's metadata props; a missing, non-ONNX or truncated file is BadInput."""
    return {p.key: p.value for p in load_onnx(path).metadata_props}


def _onnx():
    from deploytool.deps import require

    return require("onnx", "reading ONNX models")
