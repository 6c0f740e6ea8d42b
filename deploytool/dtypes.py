"""The one dtype table: ONNX element types, their ONNX Runtime spelling, and NumPy dtype names."""

from __future__ import annotations

#: (onnx.TensorProto element type, ONNX's lower-case name, NumPy dtype name; bfloat16 by name: NumPy has none)
_TABLE = ((1, "float", "float32"), (2, "uint8", "uint8"), (3, "int8", "int8"), (4, "uint16", "uint16"),
          (5, "int16", "int16"), (6, "int32", "int32"), (7, "int64", "int64"), (9, "bool", "bool"),
          (10, "float16", "float16"), (11, "double", "float64"), (12, "uint32", "uint32"),
          (13, "uint64", "uint64"), (16, "bfloat16", "bfloat16"))

#: onnx.TensorProto element type -> NumPy dtype name
ONNX_DTYPES = {code: numpy for code, _, numpy in _TABLE}
#: ONNX Runtime's type strings ("tensor(float)") -> NumPy dtype name
ORT_DTYPES = {f"tensor({name})": numpy for _, name, numpy in _TABLE}
#: NumPy dtype name -> onnx.TensorProto element type
NUMPY_TO_ONNX = {numpy: code for code, _, numpy in _TABLE}
