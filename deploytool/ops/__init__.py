"""The definition of deploytool's ops (TemperedSoftmax, HardSelect; the ByRows marker an export resolves),
and the names of the ONNX Runtime op some exports hold.

`reference` holds the float64 NumPy semantics of the two routing ops; every implementation (torch, ONNX
function, Triton kernel, TensorRT plugin) is tested against it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

DOMAIN = "deploytool"
VERSION = 1
TEMPERED_SOFTMAX = "TemperedSoftmax"
HARD_SELECT = "HardSelect"
#: a marker that joins two lowerings of the same block, `ByRows(x, few_rows_result, many_rows_result)`;
#: export replaces it by an ONNX If on x's row count (deploytool.export.by_rows), so no model holds it
BY_ROWS = "ByRows"
#: ONNX Runtime's contrib domain and its fused mixture-of-experts op (CPU and CUDA; not in TensorRT)
ORT_DOMAIN = "com.microsoft"
ORT_MOE_OP = "MoE"


def all_nodes(graph: Any) -> Iterator[Any]:
    """Every node of an ONNX graph, those inside control flow's subgraphs (If, Loop, Scan) included.

    Args:
        graph: an onnx.GraphProto.

    Yields:
        Each NodeProto, a node before the nodes of its subgraphs.
    """
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from all_nodes(attribute.g)
            for sub in attribute.graphs:
                yield from all_nodes(sub)
