"""EngineBuildPlan from real (small) ONNX files, without TensorRT."""

from __future__ import annotations

import hashlib
import inspect
import json
import sys

import onnx
import pytest
from onnx import TensorProto, helper

from deploytool.engine.build import _model_bytes
from deploytool.engine.plan import layers_between, plan_engine
from deploytool.errors import BadInput
from deploytool.io import sha256_file


def write_routing_model(path, *, batch="batch", features=16, experts=4, elem=TensorProto.FLOAT,
                        functions=True, extra_dynamic=False):
    """x[batch, features] -> MatMul -> TemperedSoftmax -> HardSelect, the deploytool nodes in domain
    `deploytool` with (placeholder) function bodies, as the exporter writes them."""
    weight = helper.make_tensor("w", elem, [features, experts], [0.0] * (features * experts))
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["logits"], name="router"),
        helper.make_node("TemperedSoftmax", ["logits"], ["probs"], domain="deploytool", name="softmax",
                         temperature=0.5),
        helper.make_node("HardSelect", ["probs"], ["mask", "index"], domain="deploytool", name="select"),
    ]
    second = "feat" if extra_dynamic else features
    graph = helper.make_graph(
        nodes, "routing", [helper.make_tensor_value_info("x", elem, [batch, second])],
        [helper.make_tensor_value_info("probs", elem, [batch, experts]),
         helper.make_tensor_value_info("index", TensorProto.INT64, [batch])], initializer=[weight])
    bodies = [
        helper.make_function("deploytool", "TemperedSoftmax", ["logits"], ["probs"],
                             [helper.make_node("Softmax", ["logits"], ["probs"])], [helper.make_opsetid("", 20)],
                             attributes=["temperature"]),
        helper.make_function("deploytool", "HardSelect", ["probs"], ["mask", "index"],
                             [helper.make_node("Identity", ["probs"], ["mask"]),
                              helper.make_node("ArgMax", ["probs"], ["index"], axis=-1, keepdims=0)],
                             [helper.make_opsetid("", 20)]),
    ]
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("deploytool", 1)],
                              functions=bodies if functions else [])
    onnx.save(model, str(path))
    return path


@pytest.fixture
def model(tmp_path):
    return write_routing_model(tmp_path / "model.onnx")


def test_fp32_plan_is_strongly_typed_with_dynamic_batch_profile_and_plugins(model):
    plan = plan_engine(model, min_batch=2, opt_batch=32, max_batch=512, workspace_mib=256)
    assert plan.typing == "strong" and plan.network_flags == ["STRONGLY_TYPED"] and plan.builder_flags == []
    assert plan.cleared_builder_flags == ["TF32"]
    assert plan.profile == {"x": {"min": [2, 16], "opt": [32, 16], "max": [512, 16]}}
    assert plan.op_path == "plugin"
    assert plan.plugin_ids == ["deploytool::HardSelect", "deploytool::TemperedSoftmax"]
    assert plan.deploytool_nodes == ["softmax", "select"]
    assert plan.onnx_sha256 == sha256_file(model)
    assert plan.workspace_mib == 256 and plan.timing_cache is None
    json.dumps(plan.to_dict())  # the --dry-run output


def test_no_plugin_plans_the_local_function_path(model):
    plan = plan_engine(model, plugin=False)
    assert plan.op_path == "local-function" and plan.plugin_ids == [] and not plan.plugin_requested


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_lowering_an_fp32_model_uses_weak_typing_with_routing_pinned_to_fp32(model, precision):
    plan = plan_engine(model, precision=precision)
    assert plan.typing == "weak" and plan.network_flags == []
    assert plan.builder_flags == [precision.upper(), "OBEY_PRECISION_CONSTRAINTS"]
    assert plan.requires_tensorrt == ">=10.8,<11"  # TensorRT 11 builds strongly typed networks only


def test_fp16_model_builds_strongly_typed_as_fp16_and_refuses_fp32(tmp_path):
    path = write_routing_model(tmp_path / "half.onnx", elem=TensorProto.FLOAT16)
    assert plan_engine(path, precision="fp16").typing == "strong"
    with pytest.raises(BadInput, match="model is fp16"):
        plan_engine(path, precision="fp32")


@pytest.mark.parametrize("batches", [(8, 4, 16), (1, 64, 32), (0, 1, 2), (1, 1, -3)])
def test_batch_profile_out_of_order_or_below_one_is_bad_input(model, batches):
    lo, opt, hi = batches
    with pytest.raises(BadInput, match="batch"):
        plan_engine(model, min_batch=lo, opt_batch=opt, max_batch=hi)


def test_static_batch_model_needs_that_batch_everywhere(tmp_path):
    path = write_routing_model(tmp_path / "static.onnx", batch=8)
    with pytest.raises(BadInput, match="static batch of 8"):
        plan_engine(path)
    assert plan_engine(path, min_batch=8, opt_batch=8, max_batch=8).profile["x"]["max"] == [8, 16]


def test_dynamic_axis_besides_batch_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="dynamic axes"):
        plan_engine(write_routing_model(tmp_path / "m.onnx", extra_dynamic=True))


def test_unknown_precision_missing_file_and_garbage_are_bad_input(model, tmp_path):
    with pytest.raises(BadInput, match="unknown precision"):
        plan_engine(model, precision="int8")
    with pytest.raises(BadInput, match="does not exist"):
        plan_engine(tmp_path / "nope.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a model")
    with pytest.raises(BadInput, match=r"not an ONNX model \(or is truncated\)"):
        plan_engine(garbage)


def test_empty_onnx_file_is_not_an_onnx_model_rather_than_a_model_without_inputs(tmp_path):
    """protobuf parses zero bytes as an empty ModelProto: the check must say the file is not a model."""
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(BadInput, match=r"not an ONNX model \(or is truncated\)"):
        plan_engine(empty)


def test_ops_without_function_bodies_need_the_plugin(tmp_path):
    path = write_routing_model(tmp_path / "bare.onnx", functions=False)
    assert plan_engine(path).op_path == "plugin"
    with pytest.raises(BadInput, match="no ONNX function body"):
        plan_engine(path, plugin=False)


def test_parser_input_names_the_plugin_only_on_the_plugin_path(model):
    """TensorRT's parser takes a node to a plugin when it carries plugin_namespace; else it inlines the function."""
    plugged = onnx.load_from_string(_model_bytes(plan_engine(model)))
    attrs = {n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute} for n in plugged.graph.node}
    assert attrs["softmax"] == {"temperature": pytest.approx(0.5), "plugin_namespace": b"deploytool", "aot": 1}
    assert attrs["select"] == {"plugin_namespace": b"deploytool", "aot": 1}
    assert "plugin_namespace" not in attrs["router"]
    plain = onnx.load_from_string(_model_bytes(plan_engine(model, plugin=False)))
    assert all(a.name != "plugin_namespace" for n in plain.graph.node for a in n.attribute)


def test_function_path_strips_plugin_attributes_left_by_another_tool(tmp_path):
    """The parser prefers a registered plugin named by plugin_namespace over the local function, so
    --no-plugin must not leave one in place."""
    path = write_routing_model(tmp_path / "tagged.onnx")
    model = onnx.load(str(path))
    model.graph.node[1].attribute.extend([helper.make_attribute("plugin_namespace", "deploytool"),
                                          helper.make_attribute("aot", 1)])
    onnx.save(model, str(path))
    plain = onnx.load_from_string(_model_bytes(plan_engine(path, plugin=False)))
    assert not {"plugin_namespace", "aot"} & {a.name for n in plain.graph.node for a in n.attribute}
    assert helper.get_attribute_value(plain.graph.node[1].attribute[0]) == pytest.approx(0.5)  # temperature kept


def test_weak_typing_pins_the_region_between_routing_inputs_and_outputs(model):
    assert plan_engine(model, precision="fp16").fp32_region == {"from": ["logits"], "to": ["index", "mask", "probs"]}
    assert plan_engine(model).fp32_region == {}  # strong typing: types come from the model


def test_layers_between_finds_function_layers_whatever_their_names():
    """On the local-function path the parser names layers after the function's inner nodes, so the
    routing layers are found by dataflow: after the router, before the experts."""
    layers = [
        (["x"], ["logits"]),                 # 0 router MatMul: feeds logits, not pinned
        ([], ["t_float"]),                   # 1 Constant inside the function
        (["t_float", "logits"], ["t"]),      # 2 CastLike
        (["logits", "t"], ["z"]),            # 3 Div
        (["z"], ["z_max"]),                  # 4 ReduceMax
        (["z", "z_max"], ["probs"]),         # 5 ... softmax
        (["probs"], ["index"]),              # 6 ArgMax (HardSelect)
        (["probs", "index"], ["mask"]),      # 7 one-hot
        (["x", "mask"], ["expert_out"]),     # 8 experts: downstream, not pinned
        (["logits"], ["aux"]),               # 9 reads logits but feeds no routing output
    ]
    assert layers_between(layers, {"from": ["logits"], "to": ["index", "mask", "probs"]}) == [2, 3, 4, 5, 6, 7]
    assert layers_between(layers, {}) == []


# --- the TensorRT plugin module, against a stand-in for tensorrt.plugin --------------------------
# The stand-in enforces what tensorrt.plugin's _validate.py checks when the decorators run
# (NVIDIA/TensorRT python/packaging/bindings_wheel/tensorrt/plugin/_validate.py) and records the
# functions, so the plugin's registration contract and its AOT launch description are tested here.

class _Expr:
    """A symbolic dimension: an int, or a name for a dynamic one."""

    def __init__(self, value):
        self.value = value
        self.is_fake = False

    def __mul__(self, other):
        other = other.value if isinstance(other, _Expr) else other
        if isinstance(self.value, int) and isinstance(other, int):
            return _Expr(self.value * other)
        return _Expr(other if self.value == 1 else self.value if other == 1 else f"({self.value}*{other})")

    @property
    def is_constant(self):
        return isinstance(self.value, int)

    def constant_value(self):
        return self.value


def _fake_tensorrt():
    import types
    import typing

    trt = types.ModuleType("tensorrt")
    trt.float32, trt.float16, trt.bfloat16, trt.int64 = "float32", "float16", "bfloat16", "int64"
    trtp = types.ModuleType("tensorrt.plugin")
    trtp.registry = {}

    class TensorDesc:
        def __init__(self, shape_expr=(), dtype=None):
            self.shape_expr, self.dtype = tuple(shape_expr), dtype

        ndim = property(lambda self: len(self.shape_expr))

        def like(self):
            return TensorDesc(self.shape_expr, self.dtype)

    class AutoTuneCombination:
        def __init__(self, io_types):
            self.io_types = [t.strip() for t in io_types.split(",")]

    class SymExprs(list):
        def __init__(self, n):
            super().__init__([None] * n)

    class SymIntExprs(SymExprs):
        pass

    class SymInt32:
        def __init__(self, value):
            self.value = value.value if isinstance(value, (_Expr, SymInt32)) else value

    class KernelLaunchParams:
        def __init__(self):
            self.grid_x = self.block_x = 1
            self.shared_mem = 0

    def cdiv(a, b):
        return f"cdiv({a.value},{b})"

    def names(fn):
        return list(inspect.signature(fn).parameters)

    def register(plugin_id):
        def decorator(fn):
            sig = inspect.signature(fn)
            tensors, attrs = [], []
            for name, param in sig.parameters.items():
                ann = param.annotation
                assert inspect.isclass(ann), f"{name}: annotation {ann!r} is not a class (string annotations?)"
                if issubclass(ann, TensorDesc):
                    assert not attrs, "TensorDesc args come first"
                    tensors.append(name)
                else:
                    assert ann in (int, float, bytes, bool, str), f"attribute {name}: unsupported type {ann}"
                    attrs.append(name)
            ret = sig.return_annotation
            outs = typing.get_args(ret) if typing.get_origin(ret) is tuple else (ret,)
            assert all(inspect.isclass(o) and issubclass(o, TensorDesc) for o in outs)
            trtp.registry[plugin_id] = {"register": fn, "tensors": tensors, "attrs": attrs}
            return fn
        return decorator

    def autotune(plugin_id):
        def decorator(fn):
            entry = trtp.registry[plugin_id]
            assert names(fn) == entry["tensors"] + ["outputs"]
            ret = inspect.signature(fn).return_annotation
            assert typing.get_origin(ret) is list and typing.get_args(ret) == (AutoTuneCombination,), ret
            entry["autotune"] = fn
            return fn
        return decorator

    def aot_impl(plugin_id):
        def decorator(fn):
            entry = trtp.registry[plugin_id]
            # TensorRT calls it with every registered attribute, positionally (_plugin_class.py)
            assert names(fn) == entry["tensors"] + entry["attrs"] + ["outputs", "tactic"]
            ret = inspect.signature(fn).return_annotation
            args = typing.get_args(ret)
            assert typing.get_origin(ret) is tuple and len(args) == 4
            assert issubclass(args[2], KernelLaunchParams) and issubclass(args[3], SymExprs)
            entry["aot"] = fn
            return fn
        return decorator

    trtp.__dict__.update(
        TensorDesc=TensorDesc, AutoTuneCombination=AutoTuneCombination, SymExprs=SymExprs, SymIntExprs=SymIntExprs,
        SymInt32=SymInt32, KernelLaunchParams=KernelLaunchParams, ShapeExpr=_Expr, cdiv=cdiv,
        from_shape_expr=lambda shape, dtype: TensorDesc(shape, dtype), register=register, autotune=autotune,
        aot_impl=aot_impl)
    trt.plugin = trtp
    return trt, trtp


@pytest.fixture
def plugin_module(monkeypatch, request):
    """deploytool's plugin module, loaded by load_plugins() against the stand-in, compiling for an H100."""
    import functools

    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    from deploytool.engine import plugins
    from deploytool.kernels import triton_kernel

    if triton_kernel.interpreting():
        pytest.skip("this process runs the Triton interpreter; it cannot compile")
    trt, trtp = _fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.setattr(triton_kernel, "compile_ptx", functools.partial(
        triton_kernel.compile_ptx, target=GPUTarget("cuda", 90, 32), ptx_limit=80))
    sys.modules.pop(plugins.PLUGIN_MODULE, None)
    request.addfinalizer(lambda: sys.modules.pop(plugins.PLUGIN_MODULE, None))
    return plugins.load_plugins(), trtp


def test_plugins_register_with_the_signatures_tensorrt_validates(plugin_module):
    module, trtp = plugin_module
    assert set(trtp.registry) == set(module.PLUGIN_IDS) == {"deploytool::TemperedSoftmax", "deploytool::HardSelect"}
    assert trtp.registry["deploytool::TemperedSoftmax"]["attrs"] == ["temperature"]
    assert trtp.registry["deploytool::HardSelect"]["attrs"] == []
    assert all({"register", "autotune", "aot"} <= set(entry) for entry in trtp.registry.values())


def test_tempered_softmax_aot_launch_covers_every_row_and_passes_the_temperature_bits(plugin_module):
    from deploytool.kernels import triton_kernel

    module, trtp = plugin_module
    entry = trtp.registry["deploytool::TemperedSoftmax"]
    logits = trtp.TensorDesc((_Expr("B"), _Expr(8)), "float16")
    (probs,) = (entry["register"](logits, temperature=0.7),)
    assert probs.dtype == "float16" and [e.value for e in probs.shape_expr] == ["B", 8]
    assert entry["autotune"](logits, (probs,))[0].io_types == ["FP32|FP16|BF16"] * 2
    name, ptx, params, extra = entry["aot"](logits, 0.7, (probs,), 0)
    cfg = triton_kernel.blocks(None, 8)
    assert isinstance(name, bytes) and f".entry {name.decode()}(".encode() in ptx
    assert params.grid_x == f"cdiv(B,{cfg.block_b})" and params.block_x == cfg.num_warps * 32
    assert all(isinstance(e, trtp.SymInt32) for e in extra)  # TensorRT refuses other SymIntExpr types
    assert [e.value for e in extra] == ["B", 8, triton_kernel.temperature_bits(0.7)]
    assert module.EMBEDDED_PTX["deploytool::TemperedSoftmax"] == {
        "float16->float16": hashlib.sha256(ptx).hexdigest()}


def test_hard_select_aot_describes_mask_and_int64_index_over_leading_axes(plugin_module):
    module, trtp = plugin_module
    entry = trtp.registry["deploytool::HardSelect"]
    probs = trtp.TensorDesc((_Expr("B"), _Expr("S"), _Expr(64)), "float32")
    mask, index = entry["register"](probs)
    assert mask.dtype == "float32" and index.dtype == "int64"
    assert [e.value for e in index.shape_expr] == ["B", "S"]
    assert entry["autotune"](probs, (mask, index))[0].io_types == ["FP32|FP16|BF16", "FP32|FP16|BF16", "INT64"]
    name, ptx, params, extra = entry["aot"](probs, (mask, index), 0)
    assert [e.value for e in extra] == ["(B*S)", 64, 0]
    assert params.grid_x.startswith("cdiv((B*S),")
    assert set(module.EMBEDDED_PTX["deploytool::HardSelect"]) == {"float32->float32,int64"}
