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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deploytool import __version__, io
from deploytool.artifacts import META_PREFIX, graph_signature
from deploytool.checkpoints import open_module
from deploytool.choices import DISPATCHES, MOE_OP_NODES, MOE_OPS
from deploytool.comparator import ParityReport, compare_runners
from deploytool.compare import check_tolerances
from deploytool.errors import BadInput, CheckFailed, first_line
from deploytool.export.by_rows import lower_by_rows
from deploytool.feeds import random_feed, sample_feed
from deploytool.ops import DOMAIN, HARD_SELECT, TEMPERED_SOFTMAX
from deploytool.ops.onnx_functions import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, attach
from deploytool.runners.ort import OnnxRuntimeRunner
from deploytool.runners.torch import TorchRunner
from deploytool.signature import BATCH, META_KEY, ModelSignature, is_static, to_json

if TYPE_CHECKING:
    from torch import nn

VALIDATION_BATCH = 256
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
        notes: what the export could not do as asked (an experts module ONNX Runtime's MoE op cannot run).
    """

    path: Path
    opset: int
    static_batch: int | None
    dispatch: str
    metadata: dict[str, str]
    signature: ModelSignature
    seconds: float
    validation: ParityReport | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Whether validation passed (True when the export was not validated)."""
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
                atol: float | None = None, rtol: float | None = None, seed: int = 0,
                top_k: int | None = None, moe_op: str = "deploytool") -> ExportResult:
    """Export a run directory, a Hugging Face MoE folder, or an nn.Module with deploytool routers to `path`, validated.

    Validation compares ONNX Runtime with PyTorch on held-out samples of `data` (the run's own data set
    by default) and on random samples at batch 1 and 256, every output and every router's decisions.

    Args:
        model: a run directory, a transformers save_pretrained folder (converted by from_hf; full-sequence
            forward over `input_ids`, no KV cache), or a module (then `example_inputs` is required).
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
        top_k: experts per token of a Hugging Face MoE model (a save_pretrained folder, or a model
            converted by from_hf); 1 commits every router to one expert; None keeps the model's k.
        moe_op: "deploytool" (the experts as `dispatch` says), "ort" (every experts module ONNX Runtime's
            com.microsoft::MoE op can compute becomes that one node: ONNX Runtime only, other runtimes
            lack the op) or "auto" (the op on batches below dispatch.AUTO_MIN_ROWS rows, deploytool's
            sparse graph from there on, chosen by an ONNX If on the row count); the experts it cannot
            compute keep sparse dispatch, each named in `notes`. Not with dense dispatch.

    Returns:
        The ExportResult (its `validation` holds the parity report).

    Raises:
        BadInput: a bad path, option, model or example input.
        CheckFailed: the export or its validation failed (`report` holds the ExportResult); nothing is
            left at `path` unless `keep_invalid`.
    """

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
        raise BadInput(f"unknown dispatch {dispatch!r}; choose {' or '.join(sorted(DISPATCHES, reverse=True))}")
    if moe_op not in MOE_OPS:
        raise BadInput(f"unknown MoE op {moe_op!r}; choose {', '.join(MOE_OPS)}")
    if moe_op in MOE_OP_NODES and dispatch == "dense":
        raise BadInput(f"MoE op {moe_op!r} runs only the chosen experts; it does not go with dense dispatch")
    module, example, source, sha256, run_config, own_dims = _resolve(model, checkpoint, example_inputs, top_k)
    io.refuse_overwrite(path, *([model, checkpoint] if isinstance(model, (str, Path)) else []))
    proto, metadata, signature, named, notes = to_onnx(
        module, example, opset=opset, static_batch=static_batch, dynamic_dims=dynamic_dims or own_dims or None,
        output_names=output_names, dispatch=dispatch, source=source, sha256=sha256, moe_op=moe_op)
    result = ExportResult(path, opset, static_batch, dispatch, metadata, signature, 0.0, notes=notes)
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


def _resolve(model: Any, checkpoint: str | Path | None, example_inputs: Any, top_k: int | None
             ) -> tuple[nn.Module, Any, str, str, dict | None, dict]:
    """(module, example inputs, source label, sha256 of its weights, run config or None, extra dynamic dims)."""
    from torch import nn

    if isinstance(model, nn.Module):
        if checkpoint is not None:
            raise BadInput("checkpoint= applies to a run directory; load the weights into your module instead")
        if example_inputs is None:
            raise BadInput(f"exporting a {type(model).__name__} module needs example_inputs= (a tensor, a tuple "
                           "of tensors or a dict), batch first")
        if top_k is not None:
            from deploytool.hf import set_top_k

            set_top_k(model, top_k)
        return model, example_inputs, f"module:{type(model).__name__}", state_dict_sha256(model), None, {}

    source = open_module(model, checkpoint=checkpoint, top_k=top_k)
    example = example_inputs if example_inputs is not None else source.example_inputs
    # absolute: tools that later read the source back (bench) run from another directory
    sha256 = io.sha256_file(source.weights[0]) if len(source.weights) == 1 else state_dict_sha256(source.module)
    return source.module, example, str(source.path.resolve()), sha256, source.run_config, source.dynamic_dims


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 of the module's weights: every tensor's name, dtype, shape and bytes, in state-dict order.
    Tied weights (an embedding shared with the LM head) are hashed under each name."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _save(proto, path: Path) -> None:
    path.write_bytes(proto.SerializeToString())


def to_onnx(module: nn.Module, example_inputs: Any, *, opset: int = DEFAULT_OPSET, static_batch: int | None = None,
            dynamic_dims: Mapping[str, Mapping[int, str]] | None = None, output_names: Sequence[str] | None = None,
            dispatch: str = "sparse", source: str = "", sha256: str = "", moe_op: str = "deploytool"):
    """(checked ModelProto, its deploytool metadata props, its signature, the NamedModule it came from,
    one line per experts module that kept deploytool's dispatch although `moe_op` asked for the MoE op).

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
        moe_op: "deploytool", "ort" (ONNX Runtime's MoE op for the experts it can run) or "auto" (the op
            below dispatch.AUTO_MIN_ROWS rows, the sparse graph from there on, by an ONNX If).

    Returns:
        The tuple above.

    Raises:
        BadInput: the module or its examples cannot be exported.
        CheckFailed: the exported graph lacks the routing ops or fails onnx.checker.
    """
    import onnx

    from deploytool.hf import dynamic_dims as hf_dynamic_dims
    from deploytool.hf import is_hf_model
    from deploytool.model_io import NamedModule, as_named_inputs

    example = _sized(as_named_inputs(module, example_inputs), static_batch)
    named = NamedModule(module, list(example), output_names=output_names,
                        keyword=isinstance(example_inputs, Mapping))
    if dynamic_dims is None and is_hf_model(module):
        dynamic_dims = hf_dynamic_dims(example)
    dims = _dynamic_dims(example, dynamic_dims, static_batch)
    proto, traced, notes = _trace(named, example, dims, dispatch=dispatch, moe_op=moe_op, opset=opset)
    signature = _graph_signature(proto, named, example, dims, traced)
    metadata = _write_metadata(proto, signature, source=source, sha256=sha256, opset=opset, dispatch=dispatch,
                               moe_op=moe_op)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise CheckFailed(f"the exported model fails onnx.checker: {first_line(exc)}") from exc
    return proto, metadata, signature, named, notes


def _trace(named, example: dict, dims: dict[str, dict[int, str]], *, dispatch: str, moe_op: str, opset: int):
    """(the ModelProto torch.onnx's dynamo export makes, with deploytool's local functions attached and its
    ByRows markers made Ifs; the traced signature; the MoE-op notes). Refuses a graph without the routing
    ops the module's routers must emit."""
    import torch

    from deploytool.model_io import module_signature
    from deploytool.nn import moe_op_mode

    module = named.model
    with export_mode(module, dispatch), moe_op_mode(module, moe_op) as notes:
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
    wanted = _routing_ops(named)
    if not wanted <= ops:
        raise CheckFailed(f"the exported graph lacks the deploytool routing ops {sorted(wanted - ops)} (found "
                          f"{sorted(ops)}); the model must route through deploytool routers")
    lower_by_rows(proto)
    attach(proto, opset)
    return proto, traced, notes


def _graph_signature(proto, named, example: dict, dims: dict[str, dict[int, str]], traced) -> ModelSignature:
    """The exported graph's signature: its tensors, the traced routers and dim examples, and the token
    vocabulary a Hugging Face model bounds its ids by. A dim asked to be dynamic that the graph fixed is
    refused."""
    from deploytool.hf import input_vocab as hf_vocab

    module = named.model
    inputs, outputs = graph_signature(proto)
    fixed = [(meta.name, axis, meta.shape[axis]) for meta in inputs for axis in dims.get(meta.name, {})
             if is_static(meta.shape[axis])]
    if fixed:
        name, axis, size = fixed[0]
        raise BadInput(f"input {name!r} dim {axis} cannot be dynamic: {type(module).__name__} computes with it at "
                       f"size {size} (a weight or a reshape fixes it); export it with that dim fixed")
    vocab = {n: size for n, size in hf_vocab(module).items() if n in example}
    return ModelSignature(tuple(inputs), tuple(outputs), traced.routers, traced.dim_examples, vocab)


def _write_metadata(proto, signature: ModelSignature, *, source: str, sha256: str, opset: int, dispatch: str,
                    moe_op: str) -> dict[str, str]:
    """Write deploytool's metadata props and the signature into `proto`; the props written (signature aside)."""

    metadata = {
        "version": __version__,
        "checkpoint_sha256": sha256,
        "source": source,
        "opset": str(opset),
        "dispatch": dispatch,
        "moe_op": moe_op,
    }
    for key, value in {**{META_PREFIX + k: v for k, v in metadata.items()}, META_KEY: to_json(signature)}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"routed model exported by deploytool {__version__} from {source}"
    return {META_PREFIX + k: v for k, v in metadata.items()}


def _routing_ops(named) -> set[str]:
    """The deploytool ops the graph must hold: a Router's TemperedSoftmax and HardSelect; a top-k router's
    TemperedSoftmax where it scores by softmax, HardSelect where it picks one expert."""
    from deploytool.nn import Router

    wanted: set[str] = set()
    for _, router in named.routers:
        if isinstance(router, Router):
            wanted |= {TEMPERED_SOFTMAX, HARD_SELECT}
            continue
        if router.rule.scoring == "softmax":
            wanted.add(TEMPERED_SOFTMAX)
        if router.rule.k == 1:
            wanted.add(HARD_SELECT)
    return wanted


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
    restored afterwards, so the caller's module is unchanged.

    Args:
        module: the routed model.
        dispatch: "dense", "sparse" or None.

    Yields:
        Nothing; the module is in export mode inside the block.
    """
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
    batch 1 and a larger batch. A static-batch export takes them in chunks of its batch.

    Args:
        signature: the exported model's signature.
        data: validation inputs as export_onnx takes them, or None.
        run_config: the run's config.json (its data set), or None.
        seed: seed of the split and the random samples.

    Returns:
        {label: feed}.

    Raises:
        BadInput: data that do not fit the signature.
    """

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

    Args:
        named: the NamedModule that was exported.
        onnx_path: the exported file.
        inputs: input sets by label.
        atol: absolute tolerance (None: by dtype).
        rtol: relative tolerance (None: by dtype).

    Returns:
        The ParityReport of onnxruntime against torch.
    """

    first = next(iter(inputs.values()))
    example = dict(first) if named.keyword else tuple(first[n] for n in named.names)
    runners = [TorchRunner(named.model, dispatch="dense", name="torch", example_inputs=example,
                           output_names=named.user_output_names),
               OnnxRuntimeRunner(onnx_path, device="cpu")]
    comparisons = compare_runners(runners, inputs, atol=atol, rtol=rtol, batch_size=VALIDATION_BATCH)
    return ParityReport(model=str(onnx_path), backends=[r.name for r in runners],
                        inputs={k: _rows(v) for k, v in inputs.items()}, comparisons=comparisons)


def _rows(feed: dict[str, np.ndarray]) -> int:
    return int(len(next(iter(feed.values()))))
