"""The hostile-input suite: what a new user (or a tampered file) throws at each command.

One file per command (test_load.py, test_verify.py, test_package.py, test_serve.py, test_cli.py). The
contract every case checks: the library raises one of deploytool's errors (BadInput for bad input) whose
message names the problem, the CLI prints one `error:` line with its exit code (`assert_one_line_error`
from tests/conftest.py), and nothing is written or deleted that should not be.

To add a case: build the input with a helper below (or a new one here), call the command, assert the
contract. Every model here is a hand-built ONNX graph of a few nodes: no torch, no training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_models import sign, tiny_onnx, token_onnx
from deploytool.signature import META_KEY


def edit_signature(path: Path, edit) -> Path:
    """Rewrite the deploytool signature stored in an ONNX file: `edit(data)` changes the parsed JSON in
    place (or returns a str written as the raw metadata value)."""
    model = onnx.load(str(path))
    entry = next(p for p in model.metadata_props if p.key == META_KEY)
    data = json.loads(entry.value)
    raw = edit(data)
    entry.value = raw if isinstance(raw, str) else json.dumps(data)
    onnx.save(model, str(path))
    return path


def resign(model, routers, examples=None):
    """Replace a ModelProto's signature with one made from its graph as it is now."""
    keep = [p for p in model.metadata_props if p.key != META_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    return sign(model, routers, examples)


def renamed_input(path: Path, name: str) -> Path:
    """tiny_onnx with its input `x` renamed to `name` (any string: quotes, shell syntax, ...)."""
    tiny_onnx(path)
    model = onnx.load(str(path))
    model.graph.input[0].name = name
    for node in model.graph.node:
        node.input[:] = [name if i == "x" else i for i in node.input]
    onnx.save(resign(model, [("router", 2)]), str(path))
    return path


def _routed_head(features: str, width: int) -> tuple[list, list, list]:
    """Nodes, initializers and outputs of `output` [batch, 3] and router `router` (2 experts) on a
    [batch, width] tensor named `features`."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(width, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=(width, 2)).astype(np.float32), "r")]
    nodes = [helper.make_node("MatMul", [features, "w"], ["output"]),
             helper.make_node("MatMul", [features, "r"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["router.probs"], axis=-1),
             helper.make_node("ArgMax", ["router.probs"], ["router.index"], axis=-1, keepdims=0)]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3]),
               helper.make_tensor_value_info("router.index", TensorProto.INT64, ["batch"]),
               helper.make_tensor_value_info("router.probs", TensorProto.FLOAT, ["batch", 2])]
    return nodes, inits, outputs


def embedding_onnx(path: Path, vocab: int = 10, *, computed_table: bool = False) -> Path:
    """ids int64 [batch, tokens] -> an embedding table of `vocab` rows (Gather) -> mean over tokens ->
    `output` and router `router`. With `computed_table` the table passes through an Identity first, so
    the model's vocabulary is not visible to deploytool (only ONNX Runtime meets a bad id)."""
    table = numpy_helper.from_array(np.random.default_rng(1).normal(size=(vocab, 4)).astype(np.float32), "table")
    nodes = ([helper.make_node("Identity", ["table"], ["table2"])] if computed_table else []) + [
        helper.make_node("Gather", ["table2" if computed_table else "table", "ids"], ["emb"], axis=0),
        helper.make_node("ReduceMean", ["emb"], ["pooled"], axes=[1], keepdims=0)]
    head, inits, outputs = _routed_head("pooled", 4)
    graph = helper.make_graph(nodes + head, "embedding",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "tokens"])],
                              outputs, [table, *inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(sign(model, [("router", 2)], {"batch": 2, "tokens": 5}), str(path))
    return path


def wide_onnx(path: Path, width: int) -> Path:
    """x float32 [batch, width] (any width: no weight grows with it) -> mean -> `output` and router `router`."""
    head, inits, outputs = _routed_head("pooled", 1)
    nodes = [helper.make_node("ReduceMean", ["x"], ["pooled"], axes=[1], keepdims=1)] + head
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(sign(model, [("router", 2)]), str(path))
    return path


def no_input_onnx(path: Path) -> Path:
    """A graph with no inputs at all (constants only), signed with a router."""
    probs = numpy_helper.from_array(np.array([[0.25, 0.75]], np.float32), "p")
    nodes = [helper.make_node("Constant", [], ["router.probs"], value=probs),
             helper.make_node("ArgMax", ["router.probs"], ["router.index"], axis=-1, keepdims=0),
             helper.make_node("Identity", ["router.probs"], ["output"])]
    graph = helper.make_graph(nodes, "constant", [], [
        helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 2]),
        helper.make_tensor_value_info("router.index", TensorProto.INT64, [1]),
        helper.make_tensor_value_info("router.probs", TensorProto.FLOAT, [1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(sign(model, [("router", 2)]), str(path))
    return path


@pytest.fixture
def tiny(tmp_path) -> Path:
    """x float32 [batch, 8] -> output [batch, 3], router `router` of 2 experts."""
    return tiny_onnx(tmp_path / "tiny.onnx")


@pytest.fixture
def tokens(tmp_path) -> Path:
    """x float32 [batch, tokens, 4], two token-level routers (see onnx_models.token_onnx)."""
    return token_onnx(tmp_path / "tokens.onnx")


@pytest.fixture
def embedding(tmp_path) -> Path:
    """ids int64 [batch, tokens] into an embedding of 10 rows."""
    return embedding_onnx(tmp_path / "embedding.onnx")


@pytest.fixture
def loop(tmp_path) -> Path:
    """`loop.onnx`, a symlink that points, through another link, back at itself."""
    (tmp_path / "loop.onnx").symlink_to(tmp_path / "other")
    (tmp_path / "other").symlink_to(tmp_path / "loop.onnx")
    return tmp_path / "loop.onnx"
