"""TensorRT for tests on machines without it: NVIDIA's real `tensorrt.plugin` over a stand-in core.

TensorRT's libraries cannot be installed here, but the layer a build calls into for a Python plugin
is plain Python: `tensorrt.plugin` in the tensorrt-cu12-bindings wheel (the dev extra installs it;
only its compiled core needs libnvinfer). `installed()` puts that real package in sys.modules over
a small stand-in for the compiled core: enums, the plugin registry, dimension expressions that can
be evaluated for concrete sizes, and a builder, ONNX parser and network that record what
deploytool asks of them. The parser and builder drive plugin layers through the calls TensorRT
makes for an ahead-of-time quick plugin, in its order, so the real `tensorrt.plugin` code and
deploytool's plugin module run as they would in a build. The C++ side (PTX JIT, engines that run)
is not imitated: the "engine" is a JSON record of what the build embedded.

API names follow TensorRT 11.4's Python bindings (checked against the symbol names in its
tensorrt.so), which have no weak-typing builder flags (FP16, BF16, OBEY_PRECISION_CONSTRAINTS...)
and no per-layer precision: setting one fails here as it would there.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import numpy.typing  # noqa: F401  (tensorrt.plugin reads np.typing without importing it)

from deploytool.artifacts import ONNX_DTYPES

BINDINGS = importlib.util.find_spec("tensorrt_bindings")
SKIP_REASON = "needs tensorrt-cu12-bindings (pip install -e '.[dev]' on Linux x86-64)"
#: the GPU the fake machine reports (deploytool.machine.gpu)
H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}

_OPS = {"SUM": lambda a, b: a + b, "SUB": lambda a, b: a - b, "PROD": lambda a, b: a * b,
        "FLOOR_DIV": lambda a, b: a // b, "CEIL_DIV": lambda a, b: -(-a // b), "MAX": max, "MIN": min,
        "EQUAL": lambda a, b: int(a == b), "LESS": lambda a, b: int(a < b)}
_BUILDER_FLAGS = ("DEBUG GPU_FALLBACK DISABLE_TIMING_CACHE EDITABLE_TIMING_CACHE TF32 SPARSE_WEIGHTS SAFETY_SCOPE "
                     "VERSION_COMPATIBLE ERROR_ON_TIMING_CACHE_MISS DISABLE_COMPILATION_CACHE STRIP_PLAN "
                  "REFIT_IDENTICAL WEIGHT_STREAMING REFIT_INDIVIDUAL STRICT_NANS MONITOR_MEMORY")
#: ops whose float inputs must share one type in a strongly typed network (a scatter's data and updates too)
_SAME_TYPE_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "MatMul", "Gemm", "Max", "Min", "Sum", "Mean", "Concat",
                  "ScatterND", "ScatterElements", "Where"}


class _Member:
    def __init__(self, enum: str, name: str, value: int):
        self.enum, self.name, self.value = enum, name, value

    def __int__(self):
        return self.value

    def __repr__(self):
        return f"{self.enum}.{self.name}"


def _enum(trt, name: str, members: str):
    setattr(trt, name, type(name, (), {m: _Member(name, m, i) for i, m in enumerate(members.split())}))


class Expr:
    """An IDimensionExpr that evaluates for concrete sizes: `expr.fn({"B": 7})`."""

    def __init__(self, text: str, fn, const: int | None = None):
        self.text, self.fn, self.const = text, fn, const

    def is_constant(self):
        return self.const is not None

    def get_constant_value(self):
        return self.const

    def is_size_tensor(self):
        return False

    def __repr__(self):
        return self.text


def evaluate(expr, **sizes) -> int:
    """Value of an expression (Expr, or the SymExprImpl tensorrt.plugin hands TensorRT) at these sizes."""
    return getattr(expr, "expr", expr).fn(sizes)


class ExprBuilder:
    """TensorRT's IExprBuilder over Expr."""

    def symbol(self, name: str) -> Expr:
        return Expr(name, lambda env: env[name])

    def constant(self, value: int) -> Expr:
        return Expr(str(value), lambda env: value, value)

    def operation(self, op, a: Expr, b: Expr) -> Expr:
        fn = _OPS[op.name]
        const = fn(a.const, b.const) if a.is_constant() and b.is_constant() else None
        return Expr(f"{op.name}({a.text},{b.text})", lambda env: fn(a.fn(env), b.fn(env)), const)

    def dims(self, shape) -> list[Expr]:
        """Expressions for an ONNX-style shape: ints are constants, names (or -1) symbols."""
        return [self.constant(d) if isinstance(d, int) and d >= 0 else self.symbol(str(d)) for d in shape]


def _fake_core(version: str) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    _enum(trt, "DataType", "FLOAT HALF INT8 INT32 BOOL UINT8 FP8 BF16 INT64 INT4 FP4")
    _enum(trt, "TensorFormat", "LINEAR CHW2 HWC8 CHW4 CHW16 CHW32 DHWC8 CDHW32 HWC DLA_LINEAR DLA_HWC4 HWC16 DHWC")
    _enum(trt, "DimensionOperation", " ".join(_OPS))
    _enum(trt, "PluginFieldType", "FLOAT16 FLOAT32 FLOAT64 INT8 INT16 INT32 CHAR DIMS UNKNOWN BF16 INT64 FP8 INT4 FP4")
    _enum(trt, "QuickPluginCreationRequest", "UNKNOWN PREFER_JIT PREFER_AOT STRICT_JIT STRICT_AOT")
    _enum(trt, "TensorRTPhase", "BUILD RUNTIME")
    _enum(trt, "PluginArgType", "INT")
    _enum(trt, "PluginArgDataType", "INT8 INT16 INT32")
    _enum(trt, "LayerType", "CONSTANT MATRIX_MULTIPLY ELEMENTWISE SOFTMAX TOPK PLUGIN_V3 OTHER")
    _enum(trt, "MemoryPoolType", "WORKSPACE DLA_MANAGED_SRAM DLA_LOCAL_DRAM DLA_GLOBAL_DRAM TACTIC_DRAM")
    _enum(trt, "TensorIOMode", "NONE INPUT OUTPUT")
    _enum(trt, "NetworkDefinitionCreationFlag", "STRONGLY_TYPED PREFER_AOT_PYTHON_PLUGINS PREFER_JIT_PYTHON_PLUGINS")
    _enum(trt, "BuilderFlag", _BUILDER_FLAGS)
    dt = trt.DataType
    for name, member in (("float32", dt.FLOAT), ("float16", dt.HALF), ("bfloat16", dt.BF16), ("int8", dt.INT8),
                         ("int32", dt.INT32), ("int64", dt.INT64), ("bool", dt.BOOL), ("uint8", dt.UINT8)):
        setattr(trt, name, member)

    class Interface:  # pybind base classes: plugin classes and loggers derive from them
        def __init__(self, *args, **kwargs):
            pass

    for name in ("IPluginV3 IPluginV3QuickCore IPluginV3QuickBuild IPluginV3QuickRuntime IPluginV3QuickAOTBuild "
                 "IPluginCreatorV3Quick ISymExpr IExprBuilder ITensor").split():
        setattr(trt, name, type(name, (Interface,), {}))

    class ILogger(Interface):
        pass

    _enum(ILogger, "Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE")

    class Logger(ILogger):
        WARNING = ILogger.Severity.WARNING

        def log(self, severity, message):
            pass

    class Dims(tuple):
        MAX_DIMS = 8

        def __new__(cls, shape=()):
            return super().__new__(cls, () if isinstance(shape, int) else tuple(shape))

    class PluginTensorDesc:
        def __init__(self, type=None, format=None, dims=(), scale=-1.0):
            self.type, self.format, self.dims, self.scale = type, format, Dims(dims), scale

    class DynamicPluginTensorDesc:
        def __init__(self, desc, min=(), opt=(), max=()):
            self.desc, self.min, self.opt, self.max = desc, Dims(min), Dims(opt), Dims(max)

    class PluginField:
        def __init__(self, name, data=None, type=None):
            self.name, self.data, self.type = name, data, type

    class Registry:
        def __init__(self):
            self.creators = {}

        def register_creator(self, creator, namespace):
            self.creators[(creator.name, creator.plugin_version, namespace)] = creator
            return True

        def get_creator(self, name, version, namespace=""):
            return self.creators.get((name, version, namespace))

    registry = Registry()
    trt.__dict__.update(
        ILogger=ILogger, Logger=Logger, IDimensionExpr=Expr, Dims=Dims, DimsExprs=lambda n: [None] * n,
        PluginTensorDesc=PluginTensorDesc, DynamicPluginTensorDesc=DynamicPluginTensorDesc, PluginField=PluginField,
        PluginFieldCollection=list, get_plugin_registry=lambda: registry)
    _add_builder(trt)
    return trt


@contextlib.contextmanager
def installed(version: str = "11.4.0.106"):
    """sys.modules["tensorrt"] (stand-in core) and ["tensorrt.plugin"] (NVIDIA's code) for the block."""
    plugin_dir = Path(BINDINGS.submodule_search_locations[0]) / "plugin"
    trt = _fake_core(version)
    spec = importlib.util.spec_from_file_location("tensorrt.plugin", plugin_dir / "__init__.py",
                                                  submodule_search_locations=[str(plugin_dir)])
    trtp = importlib.util.module_from_spec(spec)
    trt.plugin = trtp
    saved = {n: m for n, m in sys.modules.items() if n == "tensorrt" or n.startswith("tensorrt.")}
    sys.modules.update({"tensorrt": trt, "tensorrt.plugin": trtp})
    try:
        spec.loader.exec_module(trtp)
        yield trt
    finally:
        for name in [n for n in sys.modules if n == "tensorrt" or n.startswith("tensorrt.")]:
            del sys.modules[name]
        sys.modules.update(saved)


@contextlib.contextmanager
def on_h100(version: str = "11.4.0.106"):
    """installed(), on a machine that reports an H100, with deploytool's kernels compiled for sm_90
    and its plugin module loaded afresh. Skips where Triton cannot compile (none, or the interpreter)."""
    import pytest

    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    from deploytool import diagnostics, machine
    from deploytool.engine import plugins
    from deploytool.kernels import triton_kernel

    if triton_kernel.interpreting():
        pytest.skip("this process runs the Triton interpreter; it cannot compile")
    real_compile = triton_kernel.compile_ptx
    with installed(version) as trt, pytest.MonkeyPatch.context() as mp:
        mp.setattr(triton_kernel, "compile_ptx", lambda *a, **k: real_compile(
            *a, target=GPUTarget("cuda", 90, 32), ptx_limit=80, **k))
        mp.setattr(machine, "gpu", lambda: H100)  # build-engine and describe_machine look it up here
        mp.setattr(diagnostics, "gpu", lambda: H100)  # doctor imported it by name
        mp.delitem(sys.modules, plugins.PLUGIN_MODULE, raising=False)
        try:
            yield trt
        finally:
            sys.modules.pop(plugins.PLUGIN_MODULE, None)


# --- one plugin layer, as the ONNX parser creates it and the builder configures it ---------------

def create_plugin(trt, op_type: str, namespace: str, attrs: dict, request):
    """What onnx-tensorrt does for a node whose op matches a quick-plugin creator: fill the fields the
    creator declares from the node's attributes, converted to the declared type (an ONNX float
    attribute is float32), and create the plugin with the node's AOT/JIT request."""
    creator = trt.get_plugin_registry().get_creator(op_type, "1", namespace)
    fields = []
    for declared in creator.field_names:
        assert declared.type == trt.PluginFieldType.FLOAT64, f"{declared.name}: only float fields are imitated"
        value = np.float64(np.float32(attrs[declared.name]))
        fields.append(trt.PluginField(declared.name, np.array([value]), declared.type))
    return creator.create_plugin(op_type, namespace, fields, trt.TensorRTPhase.BUILD, request), fields


class PluginLayer:
    """A plugin layer: output types and shapes at parse time, kernel and launch at build time."""

    def __init__(self, trt, plugin, in_dtype, in_shape: tuple, fields=()):
        self.trt, self.plugin, self.in_dtype, self.in_shape, self.fields = trt, plugin, in_dtype, in_shape, fields
        self.builder = ExprBuilder()
        self.in_exprs = self.builder.dims(in_shape)
        self.out_types = plugin.get_output_data_types([in_dtype], [len(in_shape)])
        self.out_exprs = plugin.get_output_shapes([self.in_exprs], [], self.builder)

    def build(self, opt_rows: int = 64):
        """The builder's side: pick the format combination matching the (strongly typed) tensors,
        configure, choose a tactic, then ask for launch parameters and the kernel."""
        trt = self.trt

        def dyn(dtype, exprs):
            known = [e.const if e.is_constant() else -1 for e in exprs]
            opt = [d if d >= 0 else opt_rows for d in known]
            return trt.DynamicPluginTensorDesc(trt.PluginTensorDesc(dtype, trt.TensorFormat.LINEAR, known),
                                               opt, opt, opt)

        in_out = [dyn(self.in_dtype, self.in_exprs)] + [dyn(t, e) for t, e in zip(self.out_types, self.out_exprs)]
        offered = self.plugin.get_supported_format_combinations(in_out, 1)
        n = len(in_out)
        self.combos = [tuple((d.type, d.format) for d in offered[i:i + n]) for i in range(0, len(offered), n)]
        wanted = tuple((d.desc.type, trt.TensorFormat.LINEAR) for d in in_out)
        assert wanted in self.combos, f"no supported combination for {wanted}: {self.combos}"
        self.plugin.configure_plugin(in_out[:1], in_out[1:])
        self.plugin.set_tactic((self.plugin.get_valid_tactics() or [0])[0])

        class SymExprSetter:
            nbSymExprs = 0

            def __init__(self):
                self.args = {}

            def __setitem__(self, i, sym):
                self.args[i] = sym

        self.launch, setter = types.SimpleNamespace(), SymExprSetter()
        self.plugin.get_launch_params([self.in_exprs], in_out, 1, self.launch, setter, self.builder)
        self.extra = [setter.args[i] for i in range(setter.nbSymExprs)]
        self.kernel_name, self.ptx = self.plugin.get_kernel([d.desc for d in in_out[:1]],
                                                            [d.desc for d in in_out[1:]])
        return self


# --- builder, network and ONNX parser that record what deploytool asks of them ------------------

def _add_builder(trt):
    class Tensor:
        """`shape` as TensorRT reports it (-1 for a dynamic dimension); `dims` keeps the ONNX names."""

        def __init__(self, name, dtype, dims):
            self.name, self.dtype, self.dims = name, dtype, list(dims)

        shape = property(lambda self: [d if isinstance(d, int) else -1 for d in self.dims])

    class Layer:
        __slots__ = ("name", "type", "inputs", "outputs", "plugin")  # no per-layer precision in TensorRT 11

        def __init__(self, name, type, inputs, outputs, plugin=None):
            self.name, self.type, self.inputs, self.outputs, self.plugin = name, type, inputs, outputs, plugin

        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))

        def get_input(self, i):
            return self.inputs[i]

        def get_output(self, i):
            return self.outputs[i]

    class Network:
        def __init__(self, flags):
            self.flags, self.layers, self.inputs, self.outputs = flags, [], [], []

        num_layers = property(lambda self: len(self.layers))
        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))

        def get_layer(self, i):
            return self.layers[i]

        def get_input(self, i):
            return self.inputs[i]

        def get_output(self, i):
            return self.outputs[i]

    class OnnxParser:
        """Imports each node as a layer. A deploytool node becomes a plugin layer when a creator of its
        op is registered under its `plugin_namespace` attribute (default ""), with the request its
        `aot` attribute names; otherwise its model-local function is inlined, one layer per node,
        named after the function's nodes (as onnx-tensorrt does)."""

        def __init__(self, network, logger):
            self.network, self.logger, self.errors = network, logger, []

        num_errors = property(lambda self: len(self.errors))

        def get_error(self, i):
            return self.errors[i]

        def parse(self, model_bytes, path=None):
            import onnx

            try:
                model = onnx.load_from_string(model_bytes)
            except Exception as exc:  # the real parser reports, it does not raise
                self.errors.append(f"could not read the model: {exc}")
                return False
            graph = onnx.shape_inference.infer_shapes(model).graph
            values = [*graph.input, *graph.value_info, *graph.output]
            dtypes = {v.name: ONNX_DTYPES[v.type.tensor_type.elem_type] for v in values}
            self.shapes = {v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param or -1
                                    for d in v.type.tensor_type.shape.dim] for v in values}
            # weights are constants, not network inputs, even when the graph also lists them as inputs
            tensors = {t.name: Tensor(t.name, getattr(trt, ONNX_DTYPES[t.data_type]), list(t.dims))
                       for t in graph.initializer}
            for value in graph.input:
                if value.name not in tensors:
                    tensors[value.name] = self._tensor(value.name, dtypes)
                    self.network.inputs.append(tensors[value.name])
            functions = {(f.domain, f.name): f for f in model.functions}
            for node in graph.node:
                inputs = [tensors[n] for n in node.input if n in tensors]
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                namespace = attrs.get("plugin_namespace", b"").decode()
                registry = trt.get_plugin_registry()
                if node.domain == "deploytool" and registry.get_creator(node.op_type, "1", namespace):
                    request = trt.QuickPluginCreationRequest.STRICT_AOT if attrs.get("aot") else \
                        trt.QuickPluginCreationRequest.UNKNOWN
                    plugin, fields = create_plugin(trt, node.op_type, namespace, attrs, request)
                    layer = PluginLayer(trt, plugin, inputs[0].dtype, inputs[0].dims, fields)
                    outs = [Tensor(n, t, self.shapes.get(n, [])) for n, t in zip(node.output, layer.out_types)]
                    self.network.layers.append(Layer(node.name, trt.LayerType.PLUGIN_V3, inputs, outs, layer))
                elif (node.domain, node.op_type) in functions:
                    self._inline(functions[(node.domain, node.op_type)], node, tensors, dtypes)
                    continue
                else:
                    floats = {t.dtype for t in inputs} & {trt.float32, trt.float16, trt.bfloat16}
                    if node.op_type in _SAME_TYPE_OPS and len(floats) > 1:  # strong typing inserts no casts
                        self.errors.append(f"{node.name or node.op_type}: inputs of mixed types {sorted(map(str, floats))}")
                        return False
                    unknown = [n for n in node.output if n not in dtypes]
                    if unknown:
                        self.errors.append(f"{node.name or node.op_type}: cannot tell the type of {unknown}")
                        return False
                    outs = [self._tensor(n, dtypes) for n in node.output]
                    self.network.layers.append(Layer(node.name, trt.LayerType.OTHER, inputs, outs))
                tensors.update({t.name: t for t in outs})
            self.network.outputs.extend(tensors[v.name] for v in graph.output)
            return True

        def _tensor(self, name, dtypes):
            """Inside an inlined function body types are not inferred here; they count as float32."""
            return Tensor(name, getattr(trt, dtypes.get(name, "float32")), self.shapes.get(name, []))

        def _inline(self, function, call, tensors, dtypes):
            rename = dict(zip(function.input, call.input)) | dict(zip(function.output, call.output))
            for k, fnode in enumerate(function.node):
                name = lambda n: rename.get(n, f"{call.name}/{n}")  # noqa: E731
                inputs = [tensors[name(n)] for n in fnode.input if name(n) in tensors]
                outs = [self._tensor(name(n), dtypes) for n in fnode.output]
                self.network.layers.append(Layer(f"{call.name}/{fnode.op_type}_{k}", trt.LayerType.OTHER, inputs, outs))
                tensors.update({t.name: t for t in outs})

    class TimingCache:
        def __init__(self, data: bytes):
            self.data = data

        def serialize(self):
            return self.data + b"+timings"

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, min, opt, max):
            self.shapes[name] = {"min": list(min), "opt": list(opt), "max": list(max)}

    class Config:
        def __init__(self):
            self.flags, self.pools, self.profiles, self.cache = {"TF32"}, {}, [], None

        def set_flag(self, flag):
            self.flags.add(flag.name)

        def clear_flag(self, flag):
            self.flags.discard(flag.name)

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool.name] = size

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        #: set by a test to make the next build fail as TensorRT does: an error logged, None returned
        fail_with: str | None = None

        def __init__(self, logger):
            self.logger = logger
            trt.last_build = self

        def create_network(self, flags=0):
            self.network = Network(flags)
            return self.network

        def create_builder_config(self):
            self.config = Config()
            return self.config

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            if Builder.fail_with:
                self.logger.log(trt.ILogger.Severity.ERROR, Builder.fail_with)
                return None
            kernels = {layer.name: layer.plugin.build().kernel_name.decode()
                       for layer in network.layers if layer.plugin is not None}
            record = {"flags": sorted(config.flags), "pools": config.pools, "kernels": kernels,
                      "profiles": [p.shapes for p in config.profiles]}
            return json.dumps(record).encode()

    trt.__dict__.update(Builder=Builder, OnnxParser=OnnxParser)
