"""`build_engine`: apply an EngineBuildPlan with the TensorRT API and write the engine plus its manifest.

Everything that can be decided without TensorRT is in plan.py; this layer only talks to TensorRT
(>= 10.9, written against the documented 10.x/11.x Python API). It checks for TensorRT and a GPU
before touching any file, and writes the engine, manifest and timing cache atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deploytool import machine
from deploytool.artifacts import ENGINE_SUFFIXES, load_onnx, manifest_path, read_external_weights
from deploytool.dtypes import TENSORRT_DTYPES
from deploytool.engine import lowering, plugins
from deploytool.engine.manifest import build_manifest
from deploytool.engine.plan import FUNCTION_PATH, MIN_TENSORRT, PLUGIN_PATH, EngineBuildPlan, plan_engine
from deploytool.errors import BadInput, CheckFailed, MissingDependency
from deploytool.io import atomic_path, check_parent_dir, refuse_overwrite, write_bytes, write_json
from deploytool.ops import DOMAIN

INSTALL = 'pip install "deploytool[tensorrt]" on a machine with an NVIDIA GPU and driver'


@dataclass
class EngineBuildResult:
    engine: str
    manifest: str
    #: the path the ONNX parser actually took for deploytool's ops (it may differ from the plan's wish)
    op_path: str
    plugin_layers: list[str]
    plan: EngineBuildPlan

    def to_dict(self) -> dict:
        return {"engine": self.engine, "manifest": self.manifest, "op_path": self.op_path,
                "plugin_layers": self.plugin_layers, "plan": self.plan.to_dict()}


def build_engine(onnx_path: str | Path, out: str | Path | None = None, *, precision: str = "fp32",
                 min_batch: int = 1, opt_batch: int = 64, max_batch: int = 1024,
                 dims: dict[str, tuple[int, int, int]] | None = None, workspace_mib: int = 1024,
                 timing_cache: str | Path | None = None, plugin: bool = True,
                 dry_run: bool = False) -> EngineBuildPlan | EngineBuildResult:
    """Build a TensorRT engine from an ONNX model; with dry_run, return the plan and touch nothing.

    The output paths are checked first, dry run or not: a plan that passes is one the build accepts,
    and a real build refuses them before its long run rather than after.

    Args:
        onnx_path: the exported model.
        out: the engine file (.plan, .engine or .trt); its manifest goes beside it.
        precision: fp32, fp16 or bf16.
        min_batch: the profile's smallest batch.
        opt_batch: the batch TensorRT tunes for.
        max_batch: the largest batch.
        dims: (min, opt, max) of other dynamic dims by name (see engine.plan.plan_engine).
        workspace_mib: TensorRT's workspace.
        timing_cache: a timing cache file, read if present and written back.
        plugin: use the fused plugin.
        dry_run: return the plan only.

    Returns:
        The EngineBuildPlan (dry run) or the EngineBuildResult.

    Raises:
        BadInput: bad paths or options, a model the build cannot take.
        MissingDependency: no TensorRT or GPU.
        CheckFailed: TensorRT failed to parse or build.
    """

    for what, path in (("engine", out), ("timing cache", timing_cache)):
        if path is not None:
            check_parent_dir(path)
            refuse_overwrite(path, onnx_path)
    if out is not None and Path(out).suffix.lower() not in ENGINE_SUFFIXES:
        raise BadInput(f"engine path {out} is not an engine file name; end it with {', '.join(ENGINE_SUFFIXES)} "
                       "(e.g. model.plan)")
    if timing_cache is not None and (Path(timing_cache).suffix.lower() in NOT_TIMING_CACHES
                                     or (out is not None and Path(timing_cache).resolve() == Path(out).resolve())):
        raise BadInput(f"timing cache {timing_cache} names another kind of file (a model, engine, image or JSON), "
                       "which the build would overwrite; give a file such as model.cache")
    plan = plan_engine(onnx_path, precision=precision, min_batch=min_batch, opt_batch=opt_batch,
                       max_batch=max_batch, dims=dims, workspace_mib=workspace_mib, timing_cache=timing_cache,
                       plugin=plugin, check_lowering=dry_run)
    if dry_run:
        return plan
    if out is None:
        raise BadInput("give the engine path to write (e.g. model.plan)")
    trt = require_tensorrt_and_gpu()
    return _build(trt, plan, Path(out))


#: suffixes of files a timing cache never is (the build writes the cache back over whatever is there)
NOT_TIMING_CACHES = (".onnx", ".plan", ".engine", ".trt", ".json", ".png", ".safetensors", ".npz", ".toml", ".md")


def require_tensorrt_and_gpu(purpose: str = "build-engine"):
    """The tensorrt module, or MissingDependency naming everything that is missing, in one line."""
    import importlib


    missing = []
    try:
        trt = importlib.import_module("tensorrt")
    except Exception:  # ImportError, or a broken install (missing libnvinfer) raising anything on import
        trt = None
        missing.append("TensorRT")
    if machine.gpu() is None:
        missing.append("an NVIDIA GPU with a working CUDA driver")
    if missing:
        raise MissingDependency(f"{purpose} needs {' and '.join(missing)}: {INSTALL}")
    if _version_tuple(trt.__version__) < _version_tuple(MIN_TENSORRT):
        raise MissingDependency(f"TensorRT {trt.__version__} is too old; deploytool needs >= {MIN_TENSORRT}: "
                                'pip install -U "deploytool[tensorrt]"')
    return trt


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def _build(trt, plan: EngineBuildPlan, out: Path) -> EngineBuildResult:
    plugin_module = plugins.load_plugins() if plan.op_path == PLUGIN_PATH else None
    if plugin_module is not None:
        plugin_module.EMBEDDED_PTX.clear()  # record only what this build compiles

    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, plan.network_flags))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(_model_bytes(plan), plan.onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CheckFailed(f"TensorRT could not parse {plan.onnx_path}: {errors}")
    plugin_layers = [network.get_layer(i).name for i in range(network.num_layers)
                     if network.get_layer(i).type == trt.LayerType.PLUGIN_V3]
    op_path = PLUGIN_PATH if plugin_layers else FUNCTION_PATH

    config = builder.create_builder_config()
    for name in plan.cleared_builder_flags:
        config.clear_flag(getattr(trt.BuilderFlag, name))
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_mib << 20)
    profile = builder.create_optimization_profile()
    for name, shapes in plan.profile.items():
        profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    cache_path = Path(plan.timing_cache) if plan.timing_cache else None
    if cache_path is not None:
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            raise BadInput(f"timing cache {cache_path} is unreadable or from another GPU/TensorRT: "
                           "delete it or give another timing cache")

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CheckFailed(f"TensorRT could not build the engine: {logger.last_error or 'no error message'}")

    manifest = build_manifest(
        plan, machine=machine.describe_machine(), op_path=op_path, plugin_layers=plugin_layers,
        embedded_ptx=dict(plugin_module.EMBEDDED_PTX) if plugin_module and plugin_layers else {},
        kernel_source_sha256=plugins.kernel_source_sha256(), io=_io(trt, network))
    meta_path = write_engine(out, bytes(serialized), manifest)
    if cache_path is not None:
        write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    return EngineBuildResult(str(out), str(meta_path), op_path, plugin_layers, plan)


def write_engine(out: Path, engine: bytes, manifest: dict) -> Path:
    """Write the engine, then its manifest (returned): a failed engine write leaves the old pair as it was,
    never a new manifest describing the old engine.

    Args:
        out: the engine path.
        engine: the serialized engine.
        manifest: its manifest.

    Returns:
        The manifest's path.
    """

    with atomic_path(manifest_path(out)) as meta_tmp:
        write_json(meta_tmp, manifest)
        write_bytes(out, engine)
    return manifest_path(out)


def _model_bytes(plan: EngineBuildPlan) -> bytes:
    """The ONNX model as the parser should see it: lowered to the plan's precision if it asks, and
    with deploytool's nodes marked for the path the plan takes.

    onnx-tensorrt imports a node whose op has a local function as a plugin when a plugin creator of
    that name is registered under the node's `plugin_namespace` attribute (default ""), and inlines
    the function otherwise; `aot=1` asks a Python plugin for its AOT implementation. So on the
    plugin path deploytool nodes get both attributes, and on the function path neither. (Some 10.x
    parsers prefer a registered plugin over a local function regardless; the build reports the
    path the parser really took.)
    """
    import onnx


    # lowering converts the weights, so it needs them in memory; otherwise the parser reads external
    # data itself, relative to the model's path
    model = load_onnx(plan.onnx_path)
    if plan.lower_to:
        model = lowering.lower_precision(read_external_weights(model, plan.onnx_path), plan.lower_to, plan.fp32_regions)
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        kept = [a for a in node.attribute if a.name not in ("plugin_namespace", "aot")]
        del node.attribute[:]
        node.attribute.extend(kept)
        if f"{DOMAIN}::{node.op_type}" in plan.plugin_ids:
            node.attribute.extend([onnx.helper.make_attribute("plugin_namespace", DOMAIN),
                                   onnx.helper.make_attribute("aot", 1)])
    return model.SerializeToString()


def _network_flags(trt, names: list[str]) -> int:
    """Bit mask of NetworkDefinitionCreationFlag names. TensorRT 11 types every network strongly and
    may drop the STRONGLY_TYPED member; the flag is then implied, not missing."""
    flags = 0
    strong_only = _version_tuple(trt.__version__)[0] >= 11
    for name in names:
        flag = getattr(trt.NetworkDefinitionCreationFlag, name, None)
        if flag is None and name == "STRONGLY_TYPED" and strong_only:
            continue
        if flag is None:
            raise MissingDependency(f"TensorRT {trt.__version__} has no network flag {name}; "
                                    f'pip install "tensorrt>={MIN_TENSORRT}"')
        flags |= 1 << int(flag)
    return flags


#: TensorRT names these data types as NumPy does (trt.float16 is "float16"): dtypes.TENSORRT_DTYPES
DTYPE_NAMES = TENSORRT_DTYPES


def dtype_name(trt, dtype) -> str:
    """NumPy/torch spelling of a TensorRT data type; used by the manifest, the runner and the plugins.

    Args:
        trt: the tensorrt module.
        dtype: a trt.DataType.

    Returns:
        Its name, as dtypes.TENSORRT_DTYPES spells it.
    """
    names = {getattr(trt, name): name for name in DTYPE_NAMES if hasattr(trt, name)}
    return names[dtype]


def _io(trt, network) -> dict:
    def meta(tensor):
        return {"name": tensor.name, "dtype": dtype_name(trt, tensor.dtype), "shape": list(tensor.shape)}

    return {"inputs": [meta(network.get_input(i)) for i in range(network.num_inputs)],
            "outputs": [meta(network.get_output(i)) for i in range(network.num_outputs)]}


def _logger(trt):
    """A trt.ILogger that keeps the last error for the one-line failure message."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.last_error = None

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.last_error = msg

    return Logger()
