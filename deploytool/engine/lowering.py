"""Lower an fp32 ONNX model to fp16 or bf16 in the graph itself, the routing decision kept in fp32.

TensorRT 11 removed weak typing (the FP16/BF16 builder flags; deprecated since 10.12): every network
is strongly typed, so a tensor's precision is the type the ONNX graph gives it. build-engine
therefore lowers the model before TensorRT parses it, the way NVIDIA's ModelOpt AutoCast does:
float initializers and constants are converted, Casts are inserted where the precision changes, and
each router's decision (its logits -> TemperedSoftmax -> HardSelect) is computed in fp32. The
logits themselves come out of lower-precision layers, so a near-tie can still flip; the softmax
and the top-1 add no rounding of their own. Graph inputs and outputs keep their fp32 types, so
runners, Triton configs and parity checks see one interface at every precision.
"""

from __future__ import annotations

import numpy as np

from deploytool.dtypes import LOWER_PRECISIONS, NUMPY_TO_ONNX, PRECISION_DTYPES
from deploytool.errors import BadInput, first_line
from deploytool.ops import DOMAIN, HARD_SELECT, TEMPERED_SOFTMAX
from deploytool.ops.onnx_functions import attach

#: inputs that the ONNX spec requires in float32 whatever the data type (op -> input positions)
_FP32_INPUTS = {"Resize": {2}, "Upsample": {1}}
#: ops whose output type an attribute names
_TYPED_BY_ATTRIBUTE = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
                       "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "Multinomial": "dtype"}
#: float weights up to this many elements keep their data for shape inference, which reads some
#: (OneHot's depth, Range's bounds); larger ones are weights it never reads
_VALUES_READ_BY_INFERENCE = 64
#: protobuf cannot serialise a model past 2 GiB; such a model needs external data, which this pass does not write
_MAX_BYTES = (1 << 31) - (1 << 20)


def lower_precision(model, precision: str, fp32_regions: list[dict[str, list[str]]]):
    """A copy of `model` computing in `precision` ("fp16" or "bf16") outside `fp32_regions`.

    Each region is {"from": tensors, "to": tensors} (EngineBuildPlan.fp32_regions): every node on a
    path from one of its `from` tensors to one of its `to` tensors keeps float32, and so do
    constants that only such nodes read.

    Args:
        model: the float32 onnx.ModelProto (left unchanged).
        precision: "fp16" or "bf16".
        fp32_regions: the regions that keep float32.

    Returns:
        The lowered, checked onnx.ModelProto (metadata `deploytool.lowered_to` = precision).

    Raises:
        BadInput: why the model cannot be lowered (control flow, a local function outside the routing,
            a weight beyond the precision's range, a result over 2 GiB or that fails onnx.checker).
    """
    target = NUMPY_TO_ONNX[PRECISION_DTYPES[precision]] if precision in LOWER_PRECISIONS else None
    if target is None:
        raise BadInput(f"cannot lower to {precision!r}: choose fp16 or bf16")
    lowering = _Lowering(model, precision, target, fp32_regions)
    lowering.lower_nodes()
    lowering.cast_fp32_makers()
    lowering.restore_outputs()
    return lowering.finish()


class _Lowering:
    """One lowering's state: the copied graph (its nodes checked when made), the names it uses, the
    tensors converted so far and those that hold `precision` now. Its phases run in the order
    `lower_precision` calls them."""

    def __init__(self, model, precision: str, target: int, fp32_regions: list[dict[str, list[str]]]):
        import onnx

        self.precision, self.target = precision, target
        self.lowered = onnx.ModelProto()
        self.lowered.CopyFrom(model)
        self.graph = self.lowered.graph
        self.nodes = list(self.graph.node)
        self.kept = _kept_nodes(self.nodes, fp32_regions)
        self.check_nodes()  # before type inference, which a subgraph would fail less clearly
        self.types = _tensor_types(self.lowered, self.refuse)
        self.graph_inputs = {v.name for v in self.graph.input}
        self.initializers = {t.name: t for t in self.graph.initializer if t.name not in self.graph_inputs}
        self.taken = set(self.types) | {n for node in self.nodes for n in [*node.input, *node.output, node.name]}
        self.out_nodes: list = []
        self.converted: dict[tuple[str, int], str] = {}
        self.low: set[str] = set()  # tensors that now hold `precision`

    def refuse(self, problem: str, way_out: str = "build in fp32") -> BadInput:
        return BadInput(f"cannot lower this model to {self.precision} in-graph: {problem}; {way_out}")

    def fresh(self, base: str) -> str:
        """A tensor or node name the graph does not use yet (ONNX Runtime wants both unique)."""
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name

    def cast(self, source: str, result: str, to: int):
        from onnx import helper

        return helper.make_node("Cast", [source], [result], to=to, name=self.fresh(f"cast_{result}"))

    def as_type(self, name: str, to: int) -> str:
        """`name` converted to `to`: a weight's data is converted once, anything else gets a Cast."""
        from onnx import TensorProto

        if (name, to) not in self.converted:
            new = self.fresh(f"{name}__{'fp32' if to == TensorProto.FLOAT else self.precision}")
            if to != TensorProto.FLOAT and name in self.initializers:
                self.graph.initializer.append(_convert_tensor(self.initializers[name], new, self.precision, self.refuse))
            else:
                self.out_nodes.append(self.cast(name, new, to))
            self.converted[(name, to)] = new
        return self.converted[(name, to)]

    def check_nodes(self) -> None:
        """Refuse control flow, and a local function called outside the regions that keep float32."""
        import onnx

        local = {(f.domain, f.name) for f in self.lowered.functions}
        for i, node in enumerate(self.nodes):
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                raise self.refuse(f"node {node.name or node.op_type} holds a subgraph (control flow)")
            if i not in self.kept and (node.domain, node.op_type) in local:
                raise self.refuse(f"node {node.name or node.op_type} calls the local function {node.op_type} "
                                  "outside the routing")

    def lower_nodes(self) -> None:
        """Every node outside the kept regions computes in `precision`; its inputs converted as it needs."""
        from onnx import TensorProto

        for i, node in enumerate(self.nodes):
            fp32_only = range(len(node.input)) if i in self.kept else _FP32_INPUTS.get(node.op_type, ())
            for j, name in enumerate(node.input):
                if j in fp32_only:
                    if name in self.low:
                        node.input[j] = self.as_type(name, TensorProto.FLOAT)
                elif self.types.get(name) == TensorProto.FLOAT and name not in self.low:
                    node.input[j] = self.as_type(name, self.target)
            if i not in self.kept:
                _retype_attributes(node, self.target, self.precision, self.refuse)
                self.low.update(o for o in node.output if self.types.get(o) == TensorProto.FLOAT)
            self.out_nodes.append(node)

    def cast_fp32_makers(self) -> None:
        """Ops that make float32 whatever they read (RandomNormal without dtype, a LayerNormalization's
        statistics, ...): their float32 outputs are cast to `precision` where they are made."""
        from onnx import TensorProto

        after = _infer_types(self.lowered, self.out_nodes)  # outputs' declared types are the old ones: not used
        made_fp32 = {t for t in self.low if after.get(t) == TensorProto.FLOAT}
        repaired = []
        for node in self.out_nodes:
            repaired.append(node)
            for j, name in enumerate(node.output):
                if name in made_fp32:
                    node.output[j] = made = self.fresh(f"{name}__fp32")
                    repaired.append(self.cast(made, name, self.target))
        del self.graph.node[:]
        self.graph.node.extend(repaired)

    def restore_outputs(self) -> None:
        """The graph's outputs back to float32 at its edge, under the same names."""
        from onnx import TensorProto

        graph = self.graph
        producers = {o: node for node in graph.node for o in node.output}
        readers = _readers(graph.node)
        for name in dict.fromkeys(o.name for o in graph.output):
            if name in self.low:
                inner = self.fresh(f"{name}__{self.precision}")
                producer = producers[name]
                producer.output[:] = [inner if n == name else n for n in producer.output]
                for reader in readers.get(name, []):
                    reader.input[:] = [inner if n == name else n for n in reader.input]
                graph.node.append(self.cast(inner, name, TensorProto.FLOAT))

    def finish(self):
        """Unused weights and stale types dropped, the lowering recorded, the model checked."""
        import onnx

        graph, lowered = self.graph, self.lowered
        used = {n for node in graph.node for n in node.input} | self.graph_inputs | {o.name for o in graph.output}
        keep = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        del graph.value_info[:]  # stale types; TensorRT and the checker infer them again
        entry = lowered.metadata_props.add()
        entry.key, entry.value = "deploytool.lowered_to", self.precision
        if lowered.ByteSize() > _MAX_BYTES:
            raise self.refuse("the lowered model is over 2 GiB, more than one protobuf can hold")
        try:
            onnx.checker.check_model(lowered, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise self.refuse(f"the lowered graph does not check ({first_line(exc)})") from exc
        return lowered


def _kept_nodes(nodes, regions: list[dict[str, list[str]]]) -> set[int]:
    """Indices of the nodes that stay fp32: those between each region's ends, and constants (nodes
    without inputs) whose every reader stays fp32."""
    io = [(list(n.input), list(n.output)) for n in nodes]
    kept = {i for region in regions for i in layers_between(io, region)}
    readers, routing = _readers(nodes), {id(nodes[k]) for k in kept}
    for i, node in enumerate(nodes):
        read_by = {id(r) for o in node.output for r in readers.get(o, [])}
        if not node.input and read_by and read_by <= routing:  # a constant only the routing reads
            kept.add(i)
    return kept


def _readers(nodes) -> dict[str, list]:
    """Tensor name -> the nodes that read it."""
    readers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def _tensor_types(model, refuse) -> dict[str, int]:
    """Element type of every tensor of the main graph, or BadInput naming one that cannot be typed."""
    types = _infer_types(model)
    unknown = [o for node in model.graph.node for o in node.output if o and o not in types]
    if unknown:
        raise refuse(f"the type of {', '.join(unknown[:3])} cannot be inferred")
    return types


def _infer_types(model, nodes=None) -> dict[str, int]:
    """Shape inference's element types for `model`, or for its graph rewritten to `nodes` (whose
    outputs' declared types are then stale and left out). It runs on a copy without the data of
    large float weights (inference needs only their types and dims, and a model past 2 GiB cannot be
    handed to it; small ones stay, as OneHot's depth is read) and with deploytool's function bodies
    attached, so a model exported without them is typed by their definition."""
    import onnx
    from onnx import TensorProto, ValueInfoProto


    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
    work = onnx.ModelProto(ir_version=model.ir_version)
    work.opset_import.extend(model.opset_import)
    work.functions.extend(model.functions)
    work.graph.node.extend(model.graph.node if nodes is None else nodes)
    work.graph.input.extend(model.graph.input)
    work.graph.output.extend(model.graph.output if nodes is None else
                             [ValueInfoProto(name=o.name) for o in model.graph.output])
    work.graph.initializer.extend(
        TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)
        if t.data_type in floats and np.prod(t.dims) > _VALUES_READ_BY_INFERENCE else t
        for t in model.graph.initializer)
    attach(work)
    graph = onnx.shape_inference.infer_shapes(work).graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*graph.input, *graph.value_info, *graph.output] if v.type.tensor_type.elem_type}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def _retype_attributes(node, target: int, precision: str, refuse) -> None:
    """Ops that make float32 by attribute (Cast to float, float constants) make `target` instead."""
    from onnx import TensorProto, helper

    attr = _TYPED_BY_ATTRIBUTE.get(node.op_type)
    for a in node.attribute:
        if a.name == attr and a.i == TensorProto.FLOAT:
            a.i = target
    if node.op_type not in ("Constant", "ConstantOfShape"):
        return
    values = {a.name: a for a in node.attribute}
    if node.op_type == "ConstantOfShape" and "value" not in values:  # the default is a float32 zero
        node.attribute.append(helper.make_attribute("value", helper.make_tensor("value", TensorProto.FLOAT, [1], [0.0])))
        values["value"] = node.attribute[-1]
    if "value_float" in values or "value_floats" in values:  # Constant's float shorthands
        scalar = "value_float" in values
        data = [values["value_float"].f] if scalar else list(values["value_floats"].floats)
        node.ClearField("attribute")
        node.attribute.append(helper.make_attribute("value", helper.make_tensor(
            "value", TensorProto.FLOAT, [] if scalar else [len(data)], data)))
        values = {"value": node.attribute[-1]}
    if "value" in values and values["value"].t.data_type == TensorProto.FLOAT:
        tensor = values["value"].t
        tensor.CopyFrom(_convert_tensor(tensor, tensor.name, precision, refuse))


def _convert_tensor(tensor, name: str, precision: str, refuse):
    from onnx import TensorProto, numpy_helper

    values = numpy_helper.to_array(tensor).astype(np.float32)
    if precision == "fp16":
        with np.errstate(over="ignore"):  # overflow is the check below
            low = values.astype(np.float16)
        if np.isinf(low).sum() > np.isinf(values).sum():
            raise refuse(f"tensor {tensor.name or name} has values beyond the fp16 range (|x| > 65504)",
                         "build in bf16 or fp32")
        return numpy_helper.from_array(low, name)
    return TensorProto(name=name, data_type=TensorProto.BFLOAT16, dims=values.shape,
                       raw_data=bf16_bits(values).tobytes())


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded).astype("<u2")


def routing_regions(nodes) -> list[dict[str, list[str]]]:
    """One {"from", "to"} per router in graph `nodes`: from a TemperedSoftmax's logits to its probs
    and the outputs of the HardSelect nodes it feeds (directly or through other nodes, but never
    through another TemperedSoftmax or HardSelect, so the layers between two routers are not
    mistaken for routing). A HardSelect fed by no TemperedSoftmax is a region of its own."""
    readers = _readers(nodes)
    ours = [n for n in nodes if n.domain == DOMAIN]
    regions, claimed = [], set()
    for softmax in (n for n in ours if n.op_type == TEMPERED_SOFTMAX):
        ends, seen, frontier = list(softmax.output), set(), list(softmax.output)
        while frontier:
            for node in readers.get(frontier.pop(), []):
                if node.op_type == TEMPERED_SOFTMAX and node.domain == DOMAIN or id(node) in seen:
                    continue
                seen.add(id(node))
                if node.domain == DOMAIN and node.op_type == HARD_SELECT:  # the decision: stop here
                    ends.extend(node.output)
                    claimed.add(id(node))
                else:
                    frontier.extend(node.output)
        regions.append({"from": sorted(i for i in softmax.input if i), "to": sorted(o for o in ends if o)})
    for select in (n for n in ours if n.op_type == HARD_SELECT and id(n) not in claimed):
        regions.append({"from": sorted(i for i in select.input if i), "to": sorted(o for o in select.output if o)})
    return regions


def layers_between(layers: list[tuple[list[str], list[str]]], region: dict[str, list[str]]) -> list[int]:
    """Indices of the layers (given as (input tensor names, output tensor names), in network order)
    that read, directly or not, a `from` tensor and feed, directly or not, a `to` tensor (or are one).

    Args:
        layers: (inputs, outputs) of each layer, in network order.
        region: {"from": tensor names, "to": tensor names}.

    Returns:
        The indices of the layers in the region, ascending.
    """
    reached = set(region.get("from", []))
    forward = set()
    for i, (inputs, outputs) in enumerate(layers):
        if reached & set(inputs):
            forward.add(i)
            reached |= set(outputs)
    needed = set(region.get("to", []))
    between = []
    for i in reversed(range(len(layers))):
        inputs, outputs = layers[i]
        if i in forward and needed & set(outputs):
            between.append(i)
            needed |= set(inputs)
    return sorted(between)
