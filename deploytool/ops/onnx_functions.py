"""TemperedSoftmax and HardSelect as ONNX FunctionProtos built from standard ops.

A model carries them in `model.functions` (domain `deploytool`, same op names), so any runtime that
knows no deploytool kernel (stock ONNX Runtime, onnx.reference, TensorRT's parser without the plugin)
inlines the body; a runtime with a registered kernel of the same name may use that instead. The
bodies are dtype-generic (constants go through CastLike), so one function serves fp32, fp16 and bf16.
"""

from __future__ import annotations

from deploytool.ops import DOMAIN, HARD_SELECT, TEMPERED_SOFTMAX, VERSION

#: opsets the bodies are written for: ReduceMax takes its axes as an input from 18 on; 20 is torch's
#: native export opset (no version conversion), read by TensorRT 10 and ONNX Runtime >= 1.17
MIN_OPSET = 18
DEFAULT_OPSET = 20
MAX_OPSET = 23


def tempered_softmax_function(opset: int):
    """probs = exp(z) / sum exp(z), z = (logits - max logits) / temperature, over the last axis.

    The max is subtracted before the division: z <= 0 cannot overflow, where logits / temperature
    can in fp16 (1400 / 0.02 = 70000 > 65504, and inf - inf is NaN).
    """
    from onnx import AttributeProto, helper

    temperature = helper.make_node("Constant", [], ["t_float"])
    temperature.attribute.append(
        helper.make_attribute_ref("value_float", AttributeProto.FLOAT, ref_attr_name="temperature"))
    nodes = [
        temperature,
        helper.make_node("CastLike", ["t_float", "logits"], ["t"]),
        _int64_constant("last", [-1]),
        helper.make_node("ReduceMax", ["logits", "last"], ["logits_max"], keepdims=1),
        helper.make_node("Sub", ["logits", "logits_max"], ["shifted"]),
        helper.make_node("Div", ["shifted", "t"], ["z"]),
        helper.make_node("Exp", ["z"], ["e"]),
        helper.make_node("ReduceSum", ["e", "last"], ["total"], keepdims=1),
        helper.make_node("Div", ["e", "total"], ["probs"]),
    ]
    return helper.make_function(DOMAIN, TEMPERED_SOFTMAX, ["logits"], ["probs"], nodes,
                                [helper.make_opsetid("", opset)], attributes=["temperature"],
                                doc_string=tempered_softmax_function.__doc__)


def hard_select_function(opset: int):
    """index = ArgMax(probs, last axis; first maximum wins), mask = (index == arange(E)) in probs' dtype.

    The mask compares with a Range rather than using OneHot, whose spec excludes bfloat16.
    """
    from onnx import helper

    nodes = [
        helper.make_node("ArgMax", ["probs"], ["index_col"], axis=-1, keepdims=1, select_last_index=0),
        _int64_constant("last", [-1]),
        helper.make_node("Squeeze", ["index_col", "last"], ["index"]),
        helper.make_node("Shape", ["probs"], ["depth_1d"], start=-1),
        helper.make_node("Squeeze", ["depth_1d"], ["depth"]),
        _int64_constant("zero", []),
        _int64_constant("one", [], 1),
        helper.make_node("Range", ["zero", "depth", "one"], ["experts"]),
        helper.make_node("Equal", ["index_col", "experts"], ["hit"]),
        helper.make_node("CastLike", ["hit", "probs"], ["mask"]),
    ]
    return helper.make_function(DOMAIN, HARD_SELECT, ["probs"], ["mask", "index"], nodes,
                                [helper.make_opsetid("", opset)], doc_string=hard_select_function.__doc__)


def functions(opset: int) -> list:
    """Both FunctionProtos, importing the standard domain at `opset` (the model's own opset)."""
    return [tempered_softmax_function(opset), hard_select_function(opset)]


def attach(model, opset: int | None = None):
    """Add (or replace) the deploytool functions in `model` and import the `deploytool` domain.

    Args:
        model: the onnx.ModelProto (changed in place).
        opset: the standard-domain opset of the functions' bodies (default: the model's).

    Returns:
        `model`.
    """
    from onnx import helper

    if opset is None:
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    ours = {f.name for f in functions(opset)}
    kept = [f for f in model.functions if not (f.domain == DOMAIN and f.name in ours)]
    del model.functions[:]
    model.functions.extend([*kept, *functions(opset)])
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, VERSION))
    return model


def _int64_constant(name: str, values: list[int], scalar: int | None = None):
    """An int64 Constant: 1-D `values`, or a scalar when `values` is [] (0 unless `scalar` is given)."""
    from onnx import TensorProto, helper

    dims, vals = ([], [scalar or 0]) if not values else ([len(values)], values)
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, dims, vals))
