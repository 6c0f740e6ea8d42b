"""Turn each `deploytool::ByRows(x, few, many)` marker of an exported graph into an ONNX `If` on x's rows.

An export with moe_op="auto" traces an experts block twice, as ONNX Runtime's MoE op and as deploytool's
sparse graph, and joins the two results with the marker (`dispatch.exported_by_rows`). The choice has to
be made here, after export: `torch.cond` cannot carry `torch.onnx.ops.symbolic` nodes. Each lowering's own
nodes (those nothing else needs) move into its branch, so a call runs one lowering; what both or the rest
of the graph need (the routing, the rows) stays outside and is computed once.
"""

from __future__ import annotations

import copy
from typing import Any

from deploytool.errors import CheckFailed
from deploytool.ops import BY_ROWS, DOMAIN


def lower_by_rows(model: Any) -> int:
    """Replace every ByRows marker of `model`'s main graph by an If (in place).

    Args:
        model: an onnx.ModelProto.

    Returns:
        How many markers were replaced.

    Raises:
        CheckFailed: a marker whose output has no type in the graph (an If branch must declare it).
    """
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    nodes = [copy.deepcopy(n) for n in graph.node]  # the graph's own are cleared below
    markers = [i for i, n in enumerate(nodes) if n.domain == DOMAIN and n.op_type == BY_ROWS]
    if not markers:
        return 0
    producer = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    typed = {v.name: v for v in (*graph.value_info, *graph.output)}

    def cone(names: list[str]) -> set[int]:
        """The nodes `names` are computed from; a marker depends on its rows only (its results are branches)."""
        seen: set[int] = set()
        stack = [producer[n] for n in names if n in producer]
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            node = nodes[i]
            reads = node.input[:1] if i in markers else [*node.input, *_subgraph_inputs(node)]
            stack.extend(producer[n] for n in reads if n in producer)
        return seen

    needed = cone([o.name for o in graph.output])
    parts = {}
    for i in markers:
        few, many = (cone([nodes[i].input[slot]]) - needed for slot in (1, 2))
        parts[i] = (few - many, many - few)  # what both lowerings need stays outside, computed once
    owners: dict[int, int] = {}
    for part in (p for pair in parts.values() for p in pair):
        for j in part:
            owners[j] = owners.get(j, 0) + 1
    replacement: dict[int, list[Any]] = {}
    moved: set[int] = set()
    for i in markers:
        marker = nodes[i]
        out = marker.output[0]
        elem_type = typed[out].type.tensor_type.elem_type if out in typed else 0
        if not elem_type:
            raise CheckFailed(f"the {BY_ROWS} marker {marker.name or out} has no output type in the exported graph")
        few, many = ({j for j in part if owners[j] == 1} for part in parts[i])
        moved |= few | many

        def branch(members: set[int], result: str, label: str) -> Any:
            body = [nodes[j] for j in sorted(members)]
            infos = [typed[o] for n in body for o in n.output if o in typed and o != result]
            declared = helper.make_tensor_value_info(result, elem_type, None)
            return helper.make_graph(body, f"{out}_{label}", [], [declared], value_info=infos)

        rows = next(a.i for a in marker.attribute if a.name == "rows")
        prefix = f"{marker.name or out}_by_rows"
        graph.initializer.extend([numpy_helper.from_array(np.array(0, np.int64), f"{prefix}_axis0"),
                                  numpy_helper.from_array(np.array(rows, np.int64), f"{prefix}_limit")])
        replacement[i] = [
            helper.make_node("Shape", [marker.input[0]], [f"{prefix}_shape"], name=f"{prefix}_Shape"),
            helper.make_node("Gather", [f"{prefix}_shape", f"{prefix}_axis0"], [f"{prefix}_rows"],
                             name=f"{prefix}_Gather", axis=0),
            helper.make_node("Less", [f"{prefix}_rows", f"{prefix}_limit"], [f"{prefix}_few"], name=f"{prefix}_Less"),
            helper.make_node("If", [f"{prefix}_few"], [out], name=prefix,
                             then_branch=branch(few, marker.input[1], "few_rows"),
                             else_branch=branch(many, marker.input[2], "many_rows")),
        ]
    inside = {o for j in moved for o in nodes[j].output}
    kept = [v for v in graph.value_info if v.name not in inside]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    del graph.node[:]
    for i, node in enumerate(nodes):
        if i in replacement:
            graph.node.extend(replacement[i])
        elif i not in moved:
            graph.node.append(node)
    return len(markers)


def _subgraph_inputs(node: Any) -> list[str]:
    """Names a node's subgraphs read from the enclosing scope (an If or Loop already in the graph)."""
    names: list[str] = []
    for attribute in node.attribute:
        for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
            local = ({o for n in sub.node for o in n.output} | {i.name for i in sub.input}
                     | {t.name for t in sub.initializer})
            names += [name for n in sub.node for name in (*n.input, *_subgraph_inputs(n)) if name and name not in local]
    return names
