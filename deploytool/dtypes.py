"""The one dtype table: every spelling of every dtype the tool meets, and the maps between them.

A dtype is named by its NumPy name everywhere inside deploytool ("float32", "bfloat16" although NumPy
has none). This module alone translates: ONNX element types and their ONNX Runtime strings, Triton
Inference Server's data types (config.pbtxt), the short precision names of engines ("fp16"), the
Triton language's pointer element types (the fused kernel), and the names TensorRT's data types share
with NumPy. tests/test_layers.py fails on a dtype map anywhere else.
"""

from __future__ import annotations

#: one row per dtype: (onnx.TensorProto element type, ONNX's lower-case name, NumPy dtype name, Triton
#: server data type, short precision name or None, Triton language element type or None); bfloat16 by
#: name: NumPy has none
_TABLE = ((1, "float", "float32", "TYPE_FP32", "fp32", "fp32"), (2, "uint8", "uint8", "TYPE_UINT8", None, None),
          (3, "int8", "int8", "TYPE_INT8", None, None), (4, "uint16", "uint16", "TYPE_UINT16", None, None),
          (5, "int16", "int16", "TYPE_INT16", None, None), (6, "int32", "int32", "TYPE_INT32", None, "i32"),
          (7, "int64", "int64", "TYPE_INT64", None, "i64"), (9, "bool", "bool", "TYPE_BOOL", None, None),
          (10, "float16", "float16", "TYPE_FP16", "fp16", "fp16"), (11, "double", "float64", "TYPE_FP64", None, None),
          (12, "uint32", "uint32", "TYPE_UINT32", None, None), (13, "uint64", "uint64", "TYPE_UINT64", None, None),
          (16, "bfloat16", "bfloat16", "TYPE_BF16", "bf16", "bf16"))

#: onnx.TensorProto element type -> NumPy dtype name
ONNX_DTYPES = {row[0]: row[2] for row in _TABLE}
#: ONNX Runtime's type strings ("tensor(float)") -> NumPy dtype name
ORT_DTYPES = {f"tensor({row[1]})": row[2] for row in _TABLE}
#: NumPy dtype name -> onnx.TensorProto element type
NUMPY_TO_ONNX = {row[2]: row[0] for row in _TABLE}
#: NumPy dtype name -> Triton Inference Server data type (model_configuration.md "Datatypes")
TRITON_DTYPES = {row[2]: row[3] for row in _TABLE}
#: Triton Inference Server data type -> NumPy dtype name
NUMPY_OF_TRITON = {row[3]: row[2] for row in _TABLE}
#: NumPy dtype name of a float -> its short precision name ("float16" -> "fp16")
PRECISION_NAMES = {row[2]: row[4] for row in _TABLE if row[4]}
#: short precision name -> NumPy dtype name ("fp16" -> "float16")
PRECISION_DTYPES = {short: numpy for numpy, short in PRECISION_NAMES.items()}
#: the precisions an engine builds in, the first its default
PRECISIONS = tuple(PRECISION_DTYPES)
#: the precisions coarser than float32 an fp32 model is lowered to in-graph
LOWER_PRECISIONS = tuple(p for p in PRECISIONS if p != "fp32")
#: NumPy dtype name -> the Triton language's pointer element type (the fused kernel's AOT signature)
TRITON_LANG_TYPES = {row[2]: row[5] for row in _TABLE if row[5]}
#: the TensorRT data types deploytool reads, by their name, which TensorRT shares with NumPy (trt.float16)
TENSORRT_DTYPES = ("float32", "float16", "bfloat16", "int32", "int64", "int8", "uint8", "bool")
