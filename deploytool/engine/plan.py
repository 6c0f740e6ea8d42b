"""EngineBuildPlan: the whole TensorRT build configuration as plain data, decided before TensorRT loads.

Everything a build depends on (precision and whether the graph is lowered to it, flags, the
optimisation profile derived from the ONNX inputs, workspace, timing cache, which deploytool ops
become plugins) is computed here from the ONNX file and the options, validated, and printed by
`build-engine --dry-run`. engine/build.py only applies it, so this part is tested on machines
without TensorRT or a GPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from deploytool.artifacts import graph_signature, load_onnx, read_external_weights
from deploytool.dtypes import PRECISION_NAMES, PRECISIONS
from deploytool.engine import lowering
from deploytool.errors import BadInput
from deploytool.io import sha256_file
from deploytool.ops import DOMAIN, HARD_SELECT, ORT_DOMAIN, TEMPERED_SOFTMAX, all_nodes
from deploytool.signature import META_KEY, from_json

#: deploytool ops that have a TensorRT plugin (plugins/deploytool_trt_plugin.py)
PLUGIN_OPS = (TEMPERED_SOFTMAX, HARD_SELECT)
PLUGIN_PATH = "plugin"
FUNCTION_PATH = "local-function"
#: ahead-of-time Python plugins (tensorrt.plugin.aot_impl) appeared in TensorRT 10.9; every network
#: deploytool builds is strongly typed (the only kind TensorRT 11 builds), so precision lives in the graph
MIN_TENSORRT = "10.9"

#: the largest extent of any profile dim (batch or other): beyond it no GPU holds one input
MAX_DIM = 1 << 20
#: the largest builder workspace: 1 TiB, more than any GPU has
MAX_WORKSPACE_MIB = 1 << 20

#: input dtype -> the precision it means


@dataclass
class EngineBuildPlan:
    """What build-engine will do; `to_dict()` is the --dry-run output and part of the manifest."""

    onnx_path: str
    onnx_sha256: str
    precision: str
    #: "fp16"/"bf16" when an fp32 model is lowered in-graph before parsing (engine/lowering.py);
    #: None when the model's own types are the requested precision
    lower_to: str | None
    network_flags: list[str]
    cleared_builder_flags: list[str]
    #: one optimisation profile: input name -> {"min": shape, "opt": shape, "max": shape}
    profile: dict[str, dict[str, list[int]]]
    inputs: list[dict]
    workspace_mib: int
    timing_cache: str | None
    plugin_requested: bool
    #: how deploytool's ops enter the network: "plugin" (embedded Triton kernel) or "local-function"
    op_path: str
    plugin_ids: list[str]
    deploytool_nodes: list[str]
    #: lowering only: one {"from": tensors, "to": tensors} per router; every node on a path between
    #: them keeps float32 (the routing decision: logits -> TemperedSoftmax -> HardSelect)
    fp32_regions: list[dict[str, list[str]]] = field(default_factory=list)
    requires_tensorrt: str = f">={MIN_TENSORRT}"
    #: the model signature (as deploytool.signature.to_json writes it) and deploytool metadata of the
    #: ONNX model, copied into the engine's manifest so the engine is read like the model
    signature: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def plan_engine(onnx_path: str | Path, *, precision: str = "fp32", min_batch: int = 1, opt_batch: int = 64,
                max_batch: int = 1024, dims: dict[str, tuple[int, int, int]] | None = None,
                workspace_mib: int = 1024, timing_cache: str | Path | None = None,
                plugin: bool = True, check_lowering: bool = True) -> EngineBuildPlan:
    """Read the ONNX model and the options into a validated EngineBuildPlan (no TensorRT needed).

    Args:
        onnx_path: the exported model.
        precision: fp32, fp16 or bf16 (an fp32 model is lowered in-graph, routing kept in fp32).
        min_batch: the profile's smallest batch.
        opt_batch: the batch TensorRT tunes for.
        max_batch: the largest batch.
        dims: (min, opt, max) of every other dynamic dim by name (e.g. {"tokens": (1, 8, 64)}); a dim
            not given is fixed at the size of the export's example.
        workspace_mib: TensorRT's workspace.
        timing_cache: a timing cache file to read and update.
        plugin: use the fused plugin for deploytool's ops.
        check_lowering: lower once to prove the build can (a build, which lowers anyway, skips it).

    Returns:
        The EngineBuildPlan.

    Raises:
        BadInput: bad options, or a model the build could not take.
    """
    if precision not in PRECISIONS:
        raise BadInput(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    _check_batches(min_batch, opt_batch, max_batch)
    if not isinstance(workspace_mib, int) or not 1 <= workspace_mib <= MAX_WORKSPACE_MIB:
        raise BadInput(f"workspace must be a whole number of MiB from 1 to {MAX_WORKSPACE_MIB}, got {workspace_mib}")
    model = load_onnx(onnx_path)
    metadata = {p.key: p.value for p in model.metadata_props}
    examples = from_json(metadata[META_KEY], str(onnx_path)).dim_examples if META_KEY in metadata else {}
    inputs = _graph_inputs(model)
    _check_dims(dims, inputs)
    profile = _profile(inputs, (min_batch, opt_batch, max_batch), _dim_ranges(dims, examples))
    lower_to = _lower_to(_model_precision(inputs), precision)
    use_plugin, plugin_ids, names = _op_path(model, onnx_path, plugin)
    regions = _regions(model, onnx_path, lower_to, check_lowering)
    return EngineBuildPlan(
        onnx_path=str(onnx_path),
        onnx_sha256=sha256_file(onnx_path),
        precision=precision,
        lower_to=lower_to,
        network_flags=["STRONGLY_TYPED"],
        # TF32 would round float32 matmuls to 10 mantissa bits: parity with ONNX Runtime needs it off
        cleared_builder_flags=["TF32"] if precision == "fp32" else [],
        profile=profile,
        inputs=inputs,
        workspace_mib=workspace_mib,
        timing_cache=None if timing_cache is None else str(timing_cache),
        plugin_requested=plugin,
        op_path=PLUGIN_PATH if use_plugin else FUNCTION_PATH,
        plugin_ids=plugin_ids,
        deploytool_nodes=names,
        fp32_regions=regions,
        signature=metadata.get(META_KEY),
        metadata={k: v for k, v in metadata.items() if k != META_KEY},
    )


def _check_dims(dims: dict[str, tuple[int, int, int]] | None, inputs: list[dict]) -> None:
    """Refuse a dim in `dims` that the model does not have (it would otherwise be fixed at the example's
    size without a word)."""
    named = sorted({d for inp in inputs for d in inp["shape"][1:] if isinstance(d, str) and d})
    unknown = [name for name in dims or {} if name not in named]
    if unknown:
        raise BadInput(f"the model has no dynamic dim {unknown[0]!r} besides the batch; its dynamic dims are "
                       f"{', '.join(named) or 'none'}")


def _op_path(model, onnx_path: str | Path, plugin: bool) -> tuple[bool, list[str], list[str]]:
    """(whether the plugin runs deploytool's ops, its plugin ids, the deploytool nodes' names); ops that
    neither path can build are refused, and so are ONNX Runtime's own ops (an export with its MoE op)."""
    contrib = sorted({n.op_type for n in all_nodes(model.graph) if n.domain == ORT_DOMAIN})
    if contrib:
        raise BadInput(f"{onnx_path} holds ONNX Runtime's own op {', '.join(contrib)} ({ORT_DOMAIN}), which "
                       "TensorRT cannot build; export with --moe-op deploytool for an engine")
    ours = [n for n in model.graph.node if n.domain == DOMAIN]
    functions = {f.name for f in model.functions if f.domain == DOMAIN}
    no_body = sorted({n.op_type for n in ours} - functions)
    unknown = sorted({n.op_type for n in ours} - set(PLUGIN_OPS))
    if unknown and set(unknown) & set(no_body):
        raise BadInput(f"{onnx_path}: deploytool ops {', '.join(unknown)} have neither a plugin nor an ONNX "
                       "function body; re-export the model with deploytool export")
    use_plugin = plugin and any(n.op_type in PLUGIN_OPS for n in ours)
    if not use_plugin and no_body:
        raise BadInput(f"{onnx_path}: deploytool ops {', '.join(no_body)} have no ONNX function body, so they "
                       "need the plugin: build with it, or re-export with deploytool export")
    plugin_ids = sorted({f"{DOMAIN}::{n.op_type}" for n in ours if n.op_type in PLUGIN_OPS}) if use_plugin else []
    names = [n.name or f"{n.op_type}_{i}" for i, n in enumerate(model.graph.node) if n.domain == DOMAIN]
    return use_plugin, plugin_ids, names


def _regions(model, onnx_path: str | Path, lower_to: str | None, check_lowering: bool) -> list[dict[str, list[str]]]:
    """The regions that keep float32 when the model is lowered to `lower_to` (none when it is not);
    with `check_lowering`, the model is lowered once so that a plan that passes (--dry-run) is one the
    build can lower."""
    regions = lowering.routing_regions(list(model.graph.node)) if lower_to else []
    if lower_to and check_lowering:
        try:
            lowering.lower_precision(read_external_weights(model, onnx_path), lower_to, regions)
        except BadInput as exc:
            raise BadInput(f"{onnx_path}: {exc}") from None
    return regions


def _check_batches(min_batch: int, opt_batch: int, max_batch: int) -> None:
    for name, value in (("min batch", min_batch), ("opt batch", opt_batch), ("max batch", max_batch)):
        if not isinstance(value, int) or not 1 <= value <= MAX_DIM:
            raise BadInput(f"{name} must be a whole number from 1 to {MAX_DIM}, got {value}")
    if not min_batch <= opt_batch <= max_batch:
        raise BadInput(f"batch profile needs min <= opt <= max, got {min_batch} / {opt_batch} / {max_batch}")


def _graph_inputs(model) -> list[dict]:
    inputs = [{"name": m.name, "dtype": m.dtype, "shape": list(m.shape)} for m in graph_signature(model)[0]]
    if not inputs:
        raise BadInput("the ONNX model has no inputs")
    return inputs


def _dim_ranges(dims: dict[str, tuple[int, int, int]] | None, examples: dict[str, int]) -> dict[str, list[int]]:
    """(min, opt, max) per named dynamic dim: those given, checked, then the export examples' sizes."""
    ranges = {name: [size, size, size] for name, size in examples.items()}
    for name, values in (dims or {}).items():
        values = list(values)
        if len(values) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_DIM
                                   for v in values) \
                or not values[0] <= values[1] <= values[2]:
            raise BadInput(f"dim {name}: give min <= opt <= max, whole numbers from 1 to {MAX_DIM} (e.g. {name}=1:8:64), "
                           f"got {values}")
        ranges[name] = values
    return ranges


def _profile(inputs: list[dict], batch: tuple[int, int, int], dims: dict[str, list[int]]) -> dict:
    """Axis 0 of every input is the batch; every other dynamic axis takes its named range from `dims`."""
    profile = {}
    for inp in inputs:
        shape = inp["shape"]
        if not shape:
            raise BadInput(f"input {inp['name']} is a scalar; build-engine needs a batch axis")
        first = shape[0]
        if isinstance(first, int) and first > 0:
            if not batch[0] == batch[1] == batch[2] == first:
                raise BadInput(f"input {inp['name']} has a static batch of {first}: build with min, opt and max "
                               f"batch {first}, or re-export with a dynamic batch")
        ranges = []
        for axis, dim in enumerate(shape[1:], start=1):
            if isinstance(dim, int) and dim > 0:
                ranges.append([dim] * 3)
            elif isinstance(dim, str) and dim in dims:
                ranges.append(dims[dim])
            else:
                raise BadInput(f"input {inp['name']} axis {axis} is dynamic ({dim or 'unnamed'}) with no range: "
                               f"give its range as min:opt:max (e.g. {dim or 'NAME'}=1:8:64)")
        profile[inp["name"]] = {key: [b, *(r[k] for r in ranges)]
                                for k, (key, b) in enumerate(zip(("min", "opt", "max"), batch))}
    return profile


def _model_precision(inputs: list[dict]) -> str:
    floats = {PRECISION_NAMES[i["dtype"]] for i in inputs if i["dtype"] in PRECISION_NAMES}
    if len(floats) > 1:
        raise BadInput(f"the model mixes float input types {sorted(floats)}; export it in one precision")
    return floats.pop() if floats else "fp32"


def _lower_to(model_precision: str, precision: str) -> str | None:
    """None when the model already is in the requested precision; the precision to lower an fp32
    model to otherwise."""
    if model_precision == precision:
        return None
    if model_precision == "fp32":
        return precision
    raise BadInput(f"the model is {model_precision}; it cannot be built as {precision}: build it as "
                   f"{model_precision} or export it in {precision}")
