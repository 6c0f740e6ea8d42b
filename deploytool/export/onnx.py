"""Export a routed model to ONNX with the deploytool ops, then validate it against PyTorch.

The routing step becomes two custom nodes (deploytool::TemperedSoftmax, deploytool::HardSelect,
emitted by deploytool.ops.functional under torch.onnx's dynamo export) whose bodies travel with the
model as local functions, so every ONNX runtime can run it. Any routed model exports: inputs of any
rank and dtype (from example inputs; a run directory knows its own), the model's own outputs under
their names, and every router's `index` and `probs` as outputs beside them. That model signature is
written into the metadata, where every later step reads it. With sparse dispatch (the default) each
expert runs only on the rows routed to it. The file lands at its target only after onnx.checker and
validation pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deploytool import io
from deploytool.artifacts import META_PREFIX
from deploytool.errors import BadInput, CheckFailed, first_line
from deploytool.ops import DOMAIN, HARD_SELECT, TEMPERED_SOFTMAX
from deploytool.ops.onnx_functions import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET
from deploytool.signature import BATCH, META_KEY, ModelSignature, is_static, to_json

if TYPE_CHECKING:
    from torch import nn

    from deploytool.compare import ParityReport

VALIDATION_BATCH = 256
DISPATCHES = ("sparse", "dense")
#: the largest static batch an export accepts: beyond it the example alone outgrows memory
MAX_STATIC_BATCH = 65536


@dataclass
class ExportResult:
    """What `export_onnx` wrote.

    Attributes:
        path: the ONNX file.
        opset: the standard-domain opset.
        static_batch: the fixed batch, or None for a dynamic one.
        dispatch: "sparse" (each expert runs on its rows only) or "dense".
        metadata: the deploytool metadata props written into the model.
        signature: the model signature (inputs, outputs, routers).
        seconds: export plus validation time.
        validation: the parity report of ONNX Runtime against PyTorch (None when not validated).
    """

    path: Path
    opset: int
    static_batch: int | None
    dispatch: str
    metadata: dict[str, str]
    signature: ModelSignature
    seconds: float
    validation: ParityReport | None = None

    @property
    def passed(self) -> bool:
        return self.validation is None or self.validation.passed

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("validation", "signature")}
        out["signature"] = self.signature.to_dict()
        out["validation"] = self.validation.to_dict() if self.validation else None
        out["passed"] = self.passed
        return out


def export_onnx(model: str | Path | nn.Module, path: str | Path, *, checkpoint: str | Path | None = None,
                example_inputs: Any = None, output_names: Sequence[str] | None = None,
                dynamic_dims: Mapping[str, Mapping[int, str]] | None = None, dispatch: str = "sparse",
                opset: int = DEFAULT_OPSET, static_batch: int | None = None, validate: bool = True,
                keep_invalid: bool = False, data: str | Path | np.ndarray | Mapping | None = None,
                atol: float | None = None, rtol: float | None = None, seed: int = 0) -> ExportResult:
    """Export a run directory, or an nn.Module that routes through deploytool.nn.Router, to `path`, validated.

    Validation compares ONNX Runtime with PyTorch on held-out samples of `data` (the run's own data set
    by default) and on random samples at batch 1 and 256, every output and every router's decisions.

    Args:
        model: a run directory, or a module (then `example_inputs` is required).
        path: the .onnx file to write; it appears only when export and validation pass.
        checkpoint: another weights file for a run directory.
        example_inputs: a tensor, a tuple of tensors (named after forward's parameters) or a dict of
            keyword tensors; batch first. A run directory knows its own.
        output_names: names for the model's own output tensors, in the order forward returns them
            (default: a lone tensor is `output`, NamedTuple/dict fields keep their names, tuples are
            numbered `output_0`, ...). Every router adds `<module path>.index` and `.probs`.
        dynamic_dims: extra dynamic dims per input, {input: {axis: name}} (e.g. {"x": {1: "tokens"}});
            axis 0 of every input is the dynamic `batch` unless `static_batch`.
        dispatch: "sparse" (default): each expert runs only on the rows (tokens) routed to it;
            "dense": every expert runs on every row and a one-hot mask selects, which can win at
            batch 1 or on runtimes that handle data-dependent shapes poorly.
        opset: the standard-domain opset, MIN_OPSET..MAX_OPSET.
        static_batch: fix the batch dim to this size.
        validate: compare with PyTorch before the file lands.
        keep_invalid: keep the file even when validation fails.
        data: validation inputs (a data set name, .npz, array or dict of arrays).
        atol: absolute tolerance (default by dtype).
        rtol: relative tolerance (default by dtype).
        seed: seed of the data split and the random samples.

    Returns:
        The ExportResult (its `validation` holds the parity report).

    Raises:
        BadInput: a bad path, option, model or example input.
        CheckFailed: the export or its validation failed (`report` holds the ExportResult); nothing is
            left at `path` unless `keep_invalid`.
    """
    from deploytool.compare import check_tolerances

    start = time.perf_counter()
    path = io.check_parent_dir(path)
    if path.suffix.lower() != ".onnx":
        raise BadInput(f"output {path} must end in .onnx (tools downstream tell models from engines by suffix)")
    check_tolerances(atol, rtol)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise BadInput(f"opset {opset} is not supported; use {MIN_OPSET}..{MAX_OPSET}")
    if static_batch is not None and not 1 <= static_batch <= MAX_STATIC_BATCH:
        raise BadInput(f"static batch must be between 1 and {MAX_STATIC_BATCH}, got {static_batch}")
    if dispatch not in DISPATCHES:
        raise BadInput(f"unknown dispatch {dispatch!r}; choose {' or '.join(DISPATCHES)}")
    module, example, source, sha256, run_config = _resolve(model, checkpoint, example_inputs)
    io.refuse_overwrite(path, *([model, checkpoint] if run_config is not None else []))
    proto, metadata, signature, named = to_onnx(
        module, example, opset=opset, static_batch=static_batch, dynamic_dims=dynamic_dims,
        output_names=output_names, dispatch=dispatch, source=source, sha256=sha256)
    result = ExportResult(path, opset, static_batch, dispatch, metadata, signature, 0.0)
    with io.atomic_path(path) as tmp:
        _save(proto, tmp)
        if validate:
            inputs = validation_inputs(signature, data, run_config, seed)
            result.validation = validate_export(named, tmp, inputs, atol=atol, rtol=rtol)
            result.validation.model = str(path)
        result.seconds = round(time.perf_counter() - start, 3)
        if not result.passed and not keep_invalid:
            raise CheckFailed(f"exported model failed validation, not written to {path}: "
                              + " | ".join(result.validation.failures()), report=result)
    if not result.passed:
        raise CheckFailed(f"exported model failed validation (kept at {path} by keep_invalid): "
                          + " | ".join(result.validation.failures()), report=result)
    return result


def _resolve(model: Any, checkpoint: str | Path | None, example_inputs: Any
             ) -> tuple[nn.Module, Any, str, str, dict | None]:
    """(module, example inputs, source label, sha256 of its weights, run config or None)."""
    from torch import nn

    if isinstance(model, nn.Module):
        if checkpoint is not None:
            raise BadInput("checkpoint= applies to a run directory; load the weights into your module instead")
        if example_inputs is None:
            raise BadInput(f"exporting a {type(model).__name__} module needs example_inputs= (a tensor, a tuple "
                           "of tensors or a dict), batch first")
        return model, example_inputs, f"module:{type(model).__name__}", state_dict_sha256(model), None
    from deploytool.artifacts import builtin_run
    from deploytool.models import example_inputs as run_examples
    from deploytool.training import load_model

    run = builtin_run(model)
    weights = Path(checkpoint) if checkpoint else run.weights
    example = example_inputs if example_inputs is not None else run_examples(run.config)
    # absolute: tools that later read the source back (bench) run from another directory
    return (load_model(run.path, weights), example, str(Path(run.path).resolve()), io.sha256_file(weights),
            run.config)


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 of the module's weights as a safetensors file would hold them."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return hashlib.sha256(save(tensors)).hexdigest()


def _save(proto, path: Path) -> None:
    path.write_bytes(proto.SerializeToString())


def to_onnx(module: nn.Module, example_inputs: Any, *, opset: int = DEFAULT_OPSET, static_batch: int | None = None,
            dynamic_dims: Mapping[str, Mapping[int, str]] | None = None, output_names: Sequence[str] | None = None,
            dispatch: str = "sparse", source: str = "", sha256: str = ""):
    """(checked ModelProto, its deploytool metadata props, its signature, the NamedModule it came from).

    Args:
        module: the routed model.
        example_inputs: as export_onnx takes them.
        opset: standard-domain opset.
        static_batch: fix the batch dim to this size (None: dynamic).
        dynamic_dims: extra dynamic dims, {input: {axis: name}}.
        output_names: names of the model's own outputs.
        dispatch: "sparse" or "dense".
        source: where the model came from (recorded in the metadata).
        sha256: its weights' sha256 (recorded).

    Returns:
        The tuple above.

    Raises:
        BadInput: the module or its examples cannot be exported.
        CheckFailed: the exported graph lacks the routing ops or fails onnx.checker.
    """
    import onnx
    import torch

    from deploytool import __version__
    from deploytool.artifacts import graph_signature
    from deploytool.model_io import NamedModule, as_named_inputs, module_signature
    from deploytool.ops.onnx_functions import attach
    from deploytool.signature import ModelSignature

    example = _sized(as_named_inputs(module, example_inputs), static_batch)
    named = NamedModule(module, list(example), output_names=output_names,
                        keyword=isinstance(example_inputs, Mapping))
    dims = _dynamic_dims(example, dynamic_dims, static_batch)
    with export_mode(module, dispatch):
        traced = module_signature(named, example, dynamic=dims)  # also checks every router runs once
        shapes = tuple({axis: torch.export.Dim(name) for axis, name in dims[n].items()} or None for n in example)
        with _quiet_torch():
            try:
                program = torch.onnx.export(named, tuple(example.values()), dynamo=True,
                                            input_names=list(example), output_names=named.output_names,
                                            dynamic_shapes=(shapes,), opset_version=opset, optimize=True,
                                            verbose=False)
            except BadInput:
                raise
            except Exception as exc:  # torch.export's many error types: one line, the model's fault
                raise BadInput(f"torch.onnx could not export {type(module).__name__}: {_export_error(exc)}") from exc
    proto = program.model_proto
    ops = {n.op_type for n in proto.graph.node if n.domain == DOMAIN}
    if not {TEMPERED_SOFTMAX, HARD_SELECT} <= ops:
        raise CheckFailed(f"the exported graph lacks the deploytool routing ops (found {sorted(ops)}); "
                          "the model must route through deploytool.nn.Router")
    attach(proto, opset)
    inputs, outputs = graph_signature(proto)
    fixed = [(meta.name, axis, meta.shape[axis]) for meta in inputs for axis in dims.get(meta.name, {})
             if is_static(meta.shape[axis])]
    if fixed:
        name, axis, size = fixed[0]
        raise BadInput(f"input {name!r} dim {axis} cannot be dynamic: {type(module).__name__} computes with it at "
                       f"size {size} (a weight or a reshape fixes it); export it with that dim fixed")
    signature = ModelSignature(tuple(inputs), tuple(outputs), traced.routers, traced.dim_examples)
    metadata = {
        "version": __version__,
        "checkpoint_sha256": sha256,
        "source": source,
        "opset": str(opset),
        "dispatch": dispatch,
    }
    for key, value in {**{META_PREFIX + k: v for k, v in metadata.items()}, META_KEY: to_json(signature)}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"routed model exported by deploytool {__version__} from {source}"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise CheckFailed(f"the exported model fails onnx.checker: {first_line(exc)}") from exc
    return proto, {META_PREFIX + k: v for k, v in metadata.items()}, signature, named


def _export_error(exc: BaseException) -> str:
    """The line of a torch.onnx export error that names the cause (its summary), not the boilerplate."""
    text = str(exc)
    if "## Exception summary" in text:
        rest = [ln.strip() for ln in text.split("## Exception summary", 1)[1].splitlines() if ln.strip()]
        if rest:
            return rest[0][:400]
    return first_line(exc)[:400]


def _sized(example: dict, static_batch: int | None) -> dict:
    """Examples at the batch the export traces with: `static_batch`, or at least 2 (torch.export
    specialises a dynamic dim whose example is 1), by repeating samples."""
    want = static_batch
    batches = {int(t.shape[0]) for t in example.values()}
    if len(batches) > 1:
        raise BadInput(f"example inputs have different batch sizes {sorted(batches)}; give one batch")
    have = batches.pop()
    if have == 0:
        raise BadInput("example inputs are an empty batch; give at least one sample")
    if want is None:
        want = max(have, 2)
    if want == have:
        return example
    reps = -(-want // have)
    return {k: t.repeat(reps, *([1] * (t.dim() - 1)))[:want] for k, t in example.items()}


def _dynamic_dims(example: dict, dynamic_dims: Mapping[str, Mapping[int, str]] | None,
                  static_batch: int | None) -> dict[str, dict[int, str]]:
    """{input: {axis: dim name}}: the batch (unless static) plus what the caller asked for."""
    if dynamic_dims is not None and (not isinstance(dynamic_dims, Mapping)
                                     or not all(isinstance(v, Mapping) for v in dynamic_dims.values())):
        raise BadInput(f"dynamic dims must map input names to {{axis: dim name}}, e.g. {{'x': {{1: 'tokens'}}}}; "
                       f"got {dynamic_dims!r}")
    extra = dict(dynamic_dims or {})
    unknown = sorted(set(extra) - set(example))
    if unknown:
        raise BadInput(f"dynamic dims name input(s) {unknown}; the model's inputs are {list(example)}")
    dims: dict[str, dict[int, str]] = {}
    for name, tensor in example.items():
        axes = {} if static_batch else {0: BATCH}
        for axis, dim in dict(extra.get(name, {})).items():
            if not isinstance(axis, int) or isinstance(axis, bool):
                raise BadInput(f"dynamic dims of input {name!r}: axis {axis!r} must be a whole number")
            if not 1 <= axis < tensor.dim():
                raise BadInput(f"input {name!r} has {tensor.dim()} dims; dynamic axis {axis} must be 1..{tensor.dim() - 1} "
                               "(axis 0 is the batch)")
            if not str(dim).isidentifier():
                raise BadInput(f"dynamic dim name {dim!r} must be an identifier (e.g. tokens)")
            if tensor.shape[axis] < 2:
                raise BadInput(f"input {name!r} axis {axis} has size {tensor.shape[axis]} in the example; give an "
                               "example of size >= 2 there so it can stay dynamic")
            axes[axis] = str(dim)
        dims[name] = axes
    return dims


@contextlib.contextmanager
def export_mode(module: nn.Module, dispatch: str | None = None) -> Iterator[None]:
    """Eval mode, hard routing and `dispatch` (None: the model's own) on every RoutedExperts; all
    restored afterwards, so the caller's module is unchanged."""
    from deploytool.nn import dispatch_mode, routing_mode

    was_training = module.training
    try:
        module.eval()
        with routing_mode(module, "hard"), dispatch_mode(module, dispatch):
            yield
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


def validation_inputs(signature: ModelSignature, data: Any, run_config: dict | None,
                      seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Input sets keyed by label: held-out samples (when a data set is known) and random samples at
    batch 1 and a larger batch. A static-batch export takes them in chunks of its batch."""
    from deploytool.feeds import random_feed, sample_feed

    sets: dict[str, dict[str, np.ndarray]] = {}
    held_out = None
    if data is not None or (run_config or {}).get("dataset"):
        label, held_out = sample_feed(signature, data=data, run_config=run_config, seed=seed)
        sets[label] = held_out
    for batch in (1, VALIDATION_BATCH):
        sets[f"random batch {batch}"] = random_feed(signature, batch, seed=seed + batch, like=held_out)
    return sets


def validate_export(named, onnx_path: str | Path, inputs: dict[str, dict[str, np.ndarray]], *,
                    atol: float | None = None, rtol: float | None = None) -> ParityReport:
    """ONNX Runtime (CPU) against the module with dense dispatch, on every input set.

    A static-batch model is fed in chunks of its own batch (parity.run_batched pads the last one).
    """
    from deploytool.compare import ParityReport, compare_runners
    from deploytool.runners.ort import OnnxRuntimeRunner
    from deploytool.runners.torch import TorchRunner

    first = next(iter(inputs.values()))
    example = dict(first) if named.keyword else tuple(first[n] for n in named.names)
    runners = [TorchRunner(named.model, dispatch="dense", name="torch", example_inputs=example,
                           output_names=named.user_output_names),
               OnnxRuntimeRunner(onnx_path, device="cpu")]
    comparisons = compare_runners(runners, inputs, atol=atol, rtol=rtol, batch_size=VALIDATION_BATCH)
    return ParityReport(str(onnx_path), [r.name for r in runners], {k: _rows(v) for k, v in inputs.items()},
                        comparisons)


def _rows(feed: dict[str, np.ndarray]) -> int:
    return int(len(next(iter(feed.values()))))
