"""TensorRT plugins for deploytool's ops, backed by the fused Triton kernel compiled to PTX (AOT).

Registers `deploytool::TemperedSoftmax` (logits -> probs) and `deploytool::HardSelect`
(probs -> mask, int64 index) with TensorRT's Python plugin API (tensorrt.plugin, TensorRT >= 10.9).
Only ahead-of-time implementations are registered: at build time the kernel is compiled for the
tensor dtypes TensorRT picked and the PTX is embedded in the engine, which then runs without Python
(C++ servers included). Plugin attributes are not serialized into AOT engines, so the temperature is
baked into the launch as an int32 extra argument (its float32 bits).

The ONNX parser maps a `TemperedSoftmax` / `HardSelect` node to these plugins when the node carries
`plugin_namespace="deploytool"` and `aot=1` (deploytool.engine.build adds both) and the plugin is
registered; otherwise it inlines the node's ONNX function. Loaded by
deploytool.engine.plugins.load_plugins(); shipped in the wheel as deploytool/_data/plugins/.

No `from __future__ import annotations` here: tensorrt.plugin validates these signatures with
issubclass() on the annotation objects, which string annotations would break.
"""

import hashlib
from typing import List, Tuple, Union

import tensorrt as trt
import tensorrt.plugin as trtp

from deploytool import ops
from deploytool.engine.build import dtype_name
from deploytool.kernels import triton_kernel

TEMPERED_SOFTMAX = f"{ops.DOMAIN}::{ops.TEMPERED_SOFTMAX}"
HARD_SELECT = f"{ops.DOMAIN}::{ops.HARD_SELECT}"
PLUGIN_IDS = (TEMPERED_SOFTMAX, HARD_SELECT)
_FLOATS = "FP32|FP16|BF16"

#: plugin id -> {"in->outs" dtype variant: sha256 of its PTX}, for every variant compiled in this process
#: (read by the engine manifest; TensorRT embeds the variant each plugin layer runs)
EMBEDDED_PTX: dict = {}


@trtp.register(TEMPERED_SOFTMAX)
def tempered_softmax_desc(logits: trtp.TensorDesc, temperature: float) -> trtp.TensorDesc:
    return logits.like()


@trtp.autotune(TEMPERED_SOFTMAX)
def tempered_softmax_types(logits: trtp.TensorDesc,
                           outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
    return [trtp.AutoTuneCombination(f"{_FLOATS}, {_FLOATS}")]


@trtp.aot_impl(TEMPERED_SOFTMAX)
def tempered_softmax_aot(logits: trtp.TensorDesc, temperature: float, outputs: Tuple[trtp.TensorDesc],
                         tactic: int) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams,
                                               trtp.SymExprs]:
    n_rows, n_cols, known_cols = _rows_cols(logits)
    dtypes = (dtype_name(trt, logits.dtype), dtype_name(trt, outputs[0].dtype))
    kernel = triton_kernel.compile_ptx(dtypes[0], probs_dtype=dtypes[1], n_cols=known_cols)
    return _launch(TEMPERED_SOFTMAX, dtypes, kernel, n_rows, n_cols, triton_kernel.temperature_bits(temperature))


@trtp.register(HARD_SELECT)
def hard_select_desc(probs: trtp.TensorDesc) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
    leading = tuple(probs.shape_expr[i] for i in range(probs.ndim - 1))
    return probs.like(), trtp.from_shape_expr(leading, dtype=trt.int64)


@trtp.autotune(HARD_SELECT)
def hard_select_types(probs: trtp.TensorDesc,
                      outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
    return [trtp.AutoTuneCombination(f"{_FLOATS}, {_FLOATS}, INT64")]


@trtp.aot_impl(HARD_SELECT)
def hard_select_aot(probs: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc],
                    tactic: int) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams,
                                          trtp.SymExprs]:
    n_rows, n_cols, known_cols = _rows_cols(probs)
    dtypes = tuple(dtype_name(trt, t.dtype) for t in (probs, *outputs))
    kernel = triton_kernel.compile_ptx(dtypes[0], mask_dtype=dtypes[1], index_dtype=dtypes[2], n_cols=known_cols)
    return _launch(HARD_SELECT, dtypes, kernel, n_rows, n_cols, 0)


def _rows_cols(desc: trtp.TensorDesc):
    """(rows as a shape expression, experts as a shape expression, experts as an int when static)."""
    shape = desc.shape_expr
    n_cols = shape[desc.ndim - 1]
    n_rows = trtp.ShapeExpr(1)
    for i in range(desc.ndim - 1):
        n_rows = n_rows * shape[i]
    known = n_cols.constant_value() if not n_cols.is_fake and n_cols.is_constant else None
    return n_rows, n_cols, known


def _launch(plugin_id: str, dtypes: tuple, kernel, n_rows, n_cols, temp_bits: int):
    """Launch geometry (triton_kernel.grid, symbolically) plus the kernel's int32 extra arguments in
    its order: n_rows, n_cols, temperature bits. TensorRT passes inputs, these, then outputs."""
    params = trtp.KernelLaunchParams()
    params.grid_x = trtp.cdiv(n_rows, kernel.blocks.block_b)
    params.block_x = kernel.num_warps * 32
    params.shared_mem = kernel.shared
    extra = trtp.SymIntExprs(3)
    extra[0] = trtp.SymInt32(n_rows)
    extra[1] = trtp.SymInt32(n_cols)
    extra[2] = trtp.SymInt32(temp_bits)
    variant = f"{dtypes[0]}->{','.join(dtypes[1:])}"
    EMBEDDED_PTX.setdefault(plugin_id, {})[variant] = hashlib.sha256(kernel.ptx.encode()).hexdigest()
    return kernel.name.encode(), kernel.ptx.encode(), params, extra
