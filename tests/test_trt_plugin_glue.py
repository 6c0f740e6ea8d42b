"""deploytool's TensorRT plugins, driven through TensorRT's own `tensorrt.plugin` package.

Each plugin is walked through the calls TensorRT's builder makes for an ahead-of-time quick plugin
(tests/fake_tensorrt.py: NVIDIA's real tensorrt.plugin over a stand-in core). What this proves: the
plugins pass TensorRT 11.4's decorator validation, their shape and launch expressions evaluate to
a launch that covers every row, the temperature arrives as the float32 bits of the node attribute,
and the PTX entry takes exactly the arguments TensorRT passes (inputs, int32 extra args, outputs).
What it cannot: the C++ side (PTX JIT, the engine running).
"""

from __future__ import annotations

import re

import fake_tensorrt
import numpy as np
import pytest
from fake_tensorrt import PluginLayer, create_plugin, evaluate

pytestmark = pytest.mark.skipif(fake_tensorrt.BINDINGS is None, reason=fake_tensorrt.SKIP_REASON)


@pytest.fixture(scope="module")
def trt_env():
    """(stand-in tensorrt, real tensorrt.plugin, deploytool's plugin module compiling for an H100)."""
    from deploytool.engine import plugins

    with fake_tensorrt.on_h100() as trt:
        yield trt, trt.plugin, plugins.load_plugins()


def _build_layer(trt, op_type: str, attrs: dict, in_dtype, in_shape: tuple) -> PluginLayer:
    plugin, fields = create_plugin(trt, op_type, "deploytool", attrs, trt.QuickPluginCreationRequest.STRICT_AOT)
    return PluginLayer(trt, plugin, in_dtype, in_shape, fields).build()


def _entry_params(ptx: bytes, name: bytes) -> list[str]:
    text, kernel = ptx.decode(), name.decode()
    head = re.search(rf"\.entry\s+{re.escape(kernel)}\s*\(", text)
    assert head is not None, f"no .entry {kernel} in the PTX"
    return [p.split()[1] for p in text[head.end():text.index(")", head.end())].split(",")]


def _assert_launch_covers_rows(layer, cfg, in_shape: tuple):
    from deploytool.kernels import triton_kernel

    assert evaluate(layer.launch.block_x.expr) == cfg.num_warps * 32
    for v in (layer.launch.grid_y, layer.launch.grid_z, layer.launch.block_y, layer.launch.block_z):
        assert evaluate(v.expr) == 1
    for sizes in ({"B": 1}, {"B": 7}, {"B": 4096}, {"B": 65537}):
        rows = int(np.prod([sizes.get(d, d) if isinstance(d, str) else d for d in in_shape[:-1]]))
        grid = evaluate(layer.launch.grid_x.expr, **sizes)
        assert grid == triton_kernel.grid(rows, cfg)[0]
        assert (grid - 1) * cfg.block_b < rows <= grid * cfg.block_b  # every row, no idle program
        assert [evaluate(e.expr, **sizes) for e in layer.extra[:2]] == [rows, in_shape[-1]]


# --- the tests -------------------------------------------------------------------------------------

def test_tensorrt_plugin_accepts_both_plugins_and_registers_their_creators(trt_env):
    trt, trtp, module = trt_env
    registry = trt.get_plugin_registry()
    assert set(registry.creators) == {("TemperedSoftmax", "1", "deploytool"), ("HardSelect", "1", "deploytool")}
    fields = registry.get_creator("TemperedSoftmax", "1", "deploytool").field_names
    assert [(f.name, f.type) for f in fields] == [("temperature", trt.PluginFieldType.FLOAT64)]
    assert registry.get_creator("HardSelect", "1", "deploytool").field_names == []
    assert trtp.op.deploytool.TemperedSoftmax.aot_impl_func is module.tempered_softmax_aot
    assert trtp.op.deploytool.HardSelect.aot_impl_func is module.hard_select_aot


@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
def test_tempered_softmax_builds_a_launch_tensorrt_accepts(trt_env, dtype_name):
    from deploytool.kernels import triton_kernel

    trt, _, module = trt_env
    dtype = getattr(trt, dtype_name)
    layer = _build_layer(trt, "TemperedSoftmax", {"temperature": 0.7}, dtype, ("B", 8))
    assert layer.out_types == [dtype]
    assert [evaluate(e, B=37) for e in layer.out_exprs[0]] == [37, 8]
    # the FP32|FP16|BF16 pairs are dependent: input and output share the type
    assert {c[0][0] for c in layer.combos} == {trt.float32, trt.float16, trt.bfloat16}
    assert all(c[0][0] == c[1][0] for c in layer.combos) and len(layer.combos) == 3

    cfg = triton_kernel.blocks(None, 8)
    _assert_launch_covers_rows(layer, cfg, ("B", 8))
    assert all(e.dtype == trt.PluginArgDataType.INT32 for e in layer.extra)
    # the temperature reaches the kernel as the float32 bits of the node's attribute
    assert evaluate(layer.extra[2].expr) == int(np.float32(0.7).view(np.int32))
    # TensorRT passes input pointer, the extra int32 args, output pointer: the PTX entry takes exactly those
    assert _entry_params(layer.ptx, layer.kernel_name) == [".u64", ".u32", ".u32", ".u32", ".u64"]
    assert f"{dtype_name}->{dtype_name}" in module.EMBEDDED_PTX["deploytool::TemperedSoftmax"]


def test_hard_select_describes_mask_and_int64_index_and_launches_over_leading_axes(trt_env):
    from deploytool.kernels import triton_kernel

    trt, _, module = trt_env
    layer = _build_layer(trt, "HardSelect", {}, trt.float16, ("B", 3, 64))
    assert layer.fields == []
    assert layer.out_types == [trt.float16, trt.int64]
    mask, index = ([evaluate(e, B=5) for e in exprs] for exprs in layer.out_exprs)
    assert mask == [5, 3, 64] and index == [5, 3]
    assert all(c[2][0] == trt.int64 for c in layer.combos)

    cfg = triton_kernel.blocks(None, 64)
    _assert_launch_covers_rows(layer, cfg, ("B", 3, 64))
    assert evaluate(layer.extra[2].expr) == 0
    assert _entry_params(layer.ptx, layer.kernel_name) == [".u64", ".u32", ".u32", ".u32", ".u64", ".u64"]
    assert "float16->float16,int64" in module.EMBEDDED_PTX["deploytool::HardSelect"]


def test_large_expert_counts_use_the_looping_kernel_under_the_same_contract(trt_env):
    from deploytool.kernels import triton_kernel

    trt, _, _ = trt_env
    layer = _build_layer(trt, "TemperedSoftmax", {"temperature": 20.0}, trt.float32, ("B", 5000))
    cfg = triton_kernel.blocks(None, 5000)
    assert not cfg.one_block
    _assert_launch_covers_rows(layer, cfg, ("B", 5000))
    assert _entry_params(layer.ptx, layer.kernel_name) == [".u64", ".u32", ".u32", ".u32", ".u64"]


def test_a_jit_request_is_refused_because_only_the_aot_implementation_exists(trt_env):
    trt, _, _ = trt_env
    creator = trt.get_plugin_registry().get_creator("HardSelect", "1", "deploytool")
    with pytest.raises(ValueError, match="JIT implementation requested"):
        creator.create_plugin("HardSelect", "deploytool", [], trt.TensorRTPhase.BUILD,
                              trt.QuickPluginCreationRequest.STRICT_JIT)
