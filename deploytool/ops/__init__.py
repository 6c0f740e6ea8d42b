"""The definition of deploytool's two ops, TemperedSoftmax and HardSelect.

`reference` holds their float64 NumPy semantics; every implementation (torch, ONNX function,
Triton kernel, TensorRT plugin) is tested against it.
"""

DOMAIN = "deploytool"
VERSION = 1
TEMPERED_SOFTMAX = "TemperedSoftmax"
HARD_SELECT = "HardSelect"
