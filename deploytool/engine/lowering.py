"""Lower an fp32 ONNX model to fp16 or bf16 in the graph itself, the routing decision kept in fp32.

TensorRT 11 removed weak typing (the FP16/BF16 builder flags; deprecated since 10.12): every network
is strongly typed, so a tensor's precision is the type the ONNX graph gives it. build-engine
therefore lowers the model before TensorRT parses it, the way NVIDIA's ModelOpt AutoCast does:
float initializers are converted, Casts are inserted where the precision changes, and the nodes
between the router logits and the routing outputs (TemperedSoftmax, HardSelect and anything
between) stay in fp32 so lower precision cannot flip a routing decision by itself. Graph inputs and
outputs keep their fp32 types, so runners, Triton configs and parity checks see one interface at
every precision. Works on TensorRT 10.8+ and 11 alike.
"""

from __future__ import annotations

import numpy as np

from deploytool.errors import BadInput

#: inputs that the ONNX spec requires in float32 whatever the data type (op -> input positions)
_FP32_INPUTS = {"Resize": {2}, "Upsample": {1}}
#: ops whose output type an attribute names
_TYPED_BY_ATTRIBUTE = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
                       "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "Multinomial": "dtype"}


def lowering_problem(model, fp32_region: dict[str, list[str]]) -> str | None:
    """Why this model cannot be lowered in-graph (None when it can)."""
    import onnx

    from deploytool.engine.plan import layers_between

    nodes = list(model.graph.node)
    kept = set(layers_between([(list(n.input), list(n.output)) for n in nodes], fp32_region))
    local = {(f.domain, f.name) for f in model.functions}
    for i, node in enumerate(nodes):
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return f"node {node.name or node.op_type} holds a subgraph (control flow)"
        if i not in kept and (node.domain, node.op_type) in local:
            return f"node {node.name or node.op_type} calls the local function {node.op_type} outside the routing"
    return None


def lower_precision(model, precision: str, fp32_region: dict[str, list[str]]):
    """A copy of `model` computing in `precision` ("fp16" or "bf16") outside `fp32_region`.

    `fp32_region` is {"from": tensors, "to": tensors} (EngineBuildPlan.fp32_region): every node on a
    path from a `from` tensor to a `to` tensor keeps float32. Raises BadInput when the model cannot
    be lowered (control flow, local functions outside the region, weights beyond the target range).
    """
    import onnx
    from onnx import TensorProto, helper

    from deploytool.engine.plan import layers_between

    target = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}.get(precision)
    if target is None:
        raise BadInput(f"cannot lower to {precision!r}: choose fp16 or bf16")
    problem = lowering_problem(model, fp32_region)
    if problem:
        raise BadInput(f"cannot lower this model to {precision} in-graph: {problem}; build --precision fp32")
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    graph = lowered.graph
    floats = _float_tensors(lowered)
    initializers = {t.name: t for t in graph.initializer}
    nodes = list(graph.node)
    kept = set(layers_between([(list(n.input), list(n.output)) for n in nodes], fp32_region))

    out_nodes: list = []
    converted: dict[tuple[str, int], str] = {}
    low: set[str] = set()  # tensors that now hold `precision`

    def as_type(name: str, to: int) -> str:
        """`name` converted to `to`: an initializer's data is converted once, anything else gets a Cast."""
        key = (name, to)
        if key not in converted:
            suffix = "fp32" if to == TensorProto.FLOAT else precision
            converted[key] = new = f"{name}__{suffix}"
            if to != TensorProto.FLOAT and name in initializers:
                graph.initializer.append(_convert_initializer(initializers[name], new, precision))
            else:
                out_nodes.append(helper.make_node("Cast", [name], [new], to=to, name=f"cast_{new}"))
        return converted[key]

    for i, node in enumerate(nodes):
        if i in kept:
            for j, name in enumerate(node.input):
                if name in low:
                    node.input[j] = as_type(name, TensorProto.FLOAT)
            out_nodes.append(node)
            continue
        for j, name in enumerate(node.input):
            if name in floats and name not in low and j not in _FP32_INPUTS.get(node.op_type, ()):
                node.input[j] = as_type(name, target)
        _retype_attributes(node, target, precision)
        low.update(o for o in node.output if o in floats)
        out_nodes.append(node)

    del graph.node[:]
    graph.node.extend(out_nodes)
    for output in graph.output:  # back to float32 at the graph's edge
        if output.name in low:
            inner = f"{output.name}__{precision}"
            for node in graph.node:
                node.input[:] = [inner if n == output.name else n for n in node.input]
                node.output[:] = [inner if n == output.name else n for n in node.output]
            graph.node.append(helper.make_node("Cast", [inner], [output.name], to=TensorProto.FLOAT,
                                               name=f"cast_{output.name}"))
    used = {n for node in graph.node for n in node.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    del graph.value_info[:]  # stale types; TensorRT and the checker infer them again
    entry = lowered.metadata_props.add()
    entry.key, entry.value = "deploytool.lowered_to", precision
    try:
        onnx.checker.check_model(lowered, full_check=True)
    except onnx.checker.ValidationError as exc:
        from deploytool.errors import first_line

        raise BadInput(f"lowering this model to {precision} gives an invalid graph ({first_line(exc)}); "
                       "build --precision fp32") from exc
    return lowered


def _float_tensors(model) -> set[str]:
    """Names of the float32 tensors of the main graph (inputs, initializers, everything inferred)."""
    import onnx
    from onnx import TensorProto

    inferred = onnx.shape_inference.infer_shapes(model).graph
    values = [*inferred.input, *inferred.value_info, *inferred.output]
    names = {v.name for v in values if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    return names | {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}


def _retype_attributes(node, target: int, precision: str) -> None:
    """Ops that make float32 by attribute (Cast to float, float constants) make `target` instead."""
    from onnx import TensorProto

    attr = _TYPED_BY_ATTRIBUTE.get(node.op_type)
    for a in node.attribute:
        if a.name == attr and a.i == TensorProto.FLOAT:
            a.i = target
        elif node.op_type in ("Constant", "ConstantOfShape") and a.name == "value" and \
                a.t.data_type == TensorProto.FLOAT:
            a.t.CopyFrom(_convert_initializer(a.t, a.t.name, precision))


def _convert_initializer(tensor, name: str, precision: str):
    from onnx import TensorProto, numpy_helper

    values = numpy_helper.to_array(tensor).astype(np.float32)
    if precision == "fp16":
        with np.errstate(over="ignore"):  # overflow is the check below
            low = values.astype(np.float16)
        if np.isinf(low).sum() > np.isinf(values).sum():
            raise BadInput(f"tensor {tensor.name or name} has values beyond the fp16 range (|x| > 65504); "
                           "build --precision bf16 or fp32")
        out = numpy_helper.from_array(low, name)
    else:
        out = TensorProto(name=name, data_type=TensorProto.BFLOAT16, dims=values.shape,
                          raw_data=bf16_bits(values).tobytes())
    return out


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded).astype("<u2")
