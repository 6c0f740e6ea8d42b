"""ONNX Runtime's MoE op for deploytool's own RoutedExperts, and moe_op="auto": the op on small batches,
the sparse graph on large ones, chosen by an ONNX If built from the ByRows marker after export."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from torch import nn  # noqa: E402

import deploytool  # noqa: E402
from deploytool.dispatch import AUTO_MIN_ROWS  # noqa: E402
from deploytool.errors import BadInput, CheckFailed  # noqa: E402
from deploytool.models import MoETransformer, RoutedMLP  # noqa: E402
from deploytool.nn import Router, RoutedExperts  # noqa: E402
from deploytool.ops import all_nodes  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ops(path) -> tuple[list[str], list[str]]:
    """(the main graph's op types, every op type including those inside If branches)."""
    graph = onnx.load(str(path)).graph
    return [n.op_type for n in graph.node], [n.op_type for n in all_nodes(graph)]


def _run(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _mlp(seed=0) -> RoutedMLP:
    torch.manual_seed(seed)
    return RoutedMLP(16, 5, n_experts=4, expert_hidden=32, width=16).eval()


def test_auto_runs_the_op_below_the_row_limit_and_the_sparse_graph_from_it(tmp_path):
    model = _mlp()
    result = deploytool.export_onnx(model, tmp_path / "auto.onnx", example_inputs=torch.randn(4, 16), moe_op="auto")
    main, every = _ops(tmp_path / "auto.onnx")
    assert result.passed and not result.notes
    assert main.count("If") == 1 and "MoE" not in main and "NonZero" not in main  # both lowerings in branches
    assert every.count("MoE") == 1 and "NonZero" in every
    assert main.count("HardSelect") >= 1  # the routing, computed once, outside the If
    for rows in (1, AUTO_MIN_ROWS - 1, AUTO_MIN_ROWS, 3 * AUTO_MIN_ROWS):
        x = np.random.default_rng(rows).standard_normal((rows, 16)).astype(np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(_run(tmp_path / "auto.onnx", x), want, atol=1e-5, rtol=1e-5, err_msg=str(rows))


def test_ort_makes_the_routed_mlp_one_moe_node_on_initializer_weights(tmp_path):
    result = deploytool.export_onnx(_mlp(), tmp_path / "ort.onnx", example_inputs=torch.randn(4, 16), moe_op="ort")
    graph = onnx.load(str(tmp_path / "ort.onnx")).graph
    main = [n.op_type for n in graph.node]
    assert result.passed and main.count("MoE") == 1 and "NonZero" not in main
    moe = next(n for n in graph.node if n.op_type == "MoE")
    initializers = {t.name for t in graph.initializer}
    assert all(name in initializers for name in moe.input[2:] if name)  # no op copies the experts per call
    assert "Concat" not in main and "Unsqueeze" not in main


class Experts(nn.Module):
    """Routed experts of your own whose widths differ: input 12, output `out`, inner widths 20 and 28."""

    def __init__(self, out: int, act=nn.ReLU, tail=(), bias=True):
        super().__init__()
        torch.manual_seed(1)
        experts = [nn.Sequential(nn.Linear(12, h, bias=bias), act(), nn.Linear(h, out), *[t() for t in tail])
                   for h in (20, 28, 20)]
        self.routed = RoutedExperts(Router(12, 3), experts, dispatch="sparse")

    def forward(self, x):
        return self.routed(x).output


@pytest.mark.parametrize("out,act,tail,bias", [(12, nn.ReLU, (), True), (7, nn.SiLU, (nn.ReLU,), True),
                                               (19, nn.ReLU, (nn.Tanh,), False)])
def test_the_op_takes_experts_narrower_or_wider_than_their_input(tmp_path, out, act, tail, bias):
    model = Experts(out, act, tail, bias).eval()
    result = deploytool.export_onnx(model, tmp_path / "m.onnx", example_inputs=torch.randn(4, 12), moe_op="ort")
    assert result.passed and not result.notes and _ops(tmp_path / "m.onnx")[0].count("MoE") == 1
    x = np.random.default_rng(0).standard_normal((50, 12)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(_run(tmp_path / "m.onnx", x), model(torch.from_numpy(x)).numpy(), atol=1e-5)


class Relu6Linear(nn.Linear):
    pass


@pytest.mark.parametrize("make,why", [
    (lambda: Experts(12, nn.GELU), "GELU is not one the op computes exactly"),
    (lambda: Experts(12, nn.ReLU6), "ReLU6 is not one the op computes exactly"),
    (lambda: Experts(12, tail=(lambda: nn.Softmax(-1),)), "not Linear -> ReLU/SiLU -> Linear"),
])
def test_experts_the_op_cannot_compute_keep_sparse_dispatch_and_are_named(tmp_path, make, why):
    result = deploytool.export_onnx(make().eval(), tmp_path / "m.onnx", example_inputs=torch.randn(4, 12),
                                    moe_op="auto")
    assert result.passed and len(result.notes) == 1 and why in result.notes[0] and "routed" in result.notes[0]
    assert "MoE" not in _ops(tmp_path / "m.onnx")[1] and "If" not in _ops(tmp_path / "m.onnx")[0]


def test_linear_subclasses_and_hooks_keep_sparse_dispatch(tmp_path):
    subclass = Experts(12).eval()
    subclass.routed.experts[1][0].__class__ = Relu6Linear
    hooked = Experts(12).eval()
    hooked.routed.experts[0][2].register_forward_hook(lambda *a: None)
    for model, why in ((subclass, "not Linear"), (hooked, "hook")):
        result = deploytool.export_onnx(model, tmp_path / "m.onnx", example_inputs=torch.randn(4, 12), moe_op="ort")
        assert result.passed and why in result.notes[0]
        (tmp_path / "m.onnx").unlink()


def test_auto_on_a_token_model_with_two_routers(tmp_path):
    torch.manual_seed(0)
    model = MoETransformer(16, 3, n_experts=4, expert_hidden=32, d_model=16, layers=2).eval()
    auto = deploytool.export_onnx(model, tmp_path / "a.onnx", example_inputs=torch.randn(2, 4, 4), moe_op="auto")
    assert auto.passed and not auto.notes and len(auto.signature.routers) == 2
    assert _ops(tmp_path / "a.onnx")[0].count("If") == 2 and _ops(tmp_path / "a.onnx")[1].count("MoE") == 2


def test_auto_converts_a_hugging_face_mixtral_with_one_if_per_layer(tmp_path):
    pytest.importorskip("transformers")
    from hf_models import tiny_model

    model = deploytool.from_hf(tiny_model("mixtral"), top_k=2)
    result = deploytool.export_onnx(model, tmp_path / "m.onnx", example_inputs=torch.randint(0, 256, (2, 12)),
                                    moe_op="auto")
    main, every = _ops(tmp_path / "m.onnx")
    assert result.passed and not result.notes and main.count("If") == 2 and every.count("MoE") == 2


def test_dense_dispatch_with_the_op_and_unknown_ops_are_refused(tmp_path):
    for moe_op in ("ort", "auto"):
        with pytest.raises(BadInput, match="does not go with dense dispatch"):
            deploytool.export_onnx(_mlp(), tmp_path / "m.onnx", example_inputs=torch.randn(4, 16), dispatch="dense",
                                   moe_op=moe_op)
    with pytest.raises(BadInput, match="unknown MoE op 'bogus'"):
        deploytool.export_onnx(_mlp(), tmp_path / "m.onnx", example_inputs=torch.randn(4, 16), moe_op="bogus")
    assert not (tmp_path / "m.onnx").exists()


def test_an_moe_op_left_on_a_module_does_not_leak_into_a_default_export(tmp_path):
    model = _mlp()
    model.routed.moe_op = "ort"
    del RoutedExperts.moe_layout  # a module from before the attribute: the export sets it for its duration
    try:
        result = deploytool.export_onnx(model, tmp_path / "m.onnx", example_inputs=torch.randn(4, 16))
    finally:
        RoutedExperts.moe_layout = None
    assert result.passed and "MoE" not in _ops(tmp_path / "m.onnx")[1]
    assert model.routed.moe_op == "ort" and "moe_layout" not in model.routed.__dict__  # restored


def test_an_engine_plan_refuses_onnx_runtime_ops_inside_an_if(tmp_path):
    from deploytool.engine.plan import plan_engine

    deploytool.export_onnx(_mlp(), tmp_path / "auto.onnx", example_inputs=torch.randn(4, 16), moe_op="auto")
    with pytest.raises(BadInput, match="ONNX Runtime's own op MoE"):
        plan_engine(tmp_path / "auto.onnx")


def _marker_graph(typed: bool = True):
    """y = ByRows(x, few = (x + 1) * 3, many = x * 2) + s, s = x * 5 also needed by both branches' inputs, and
    `few`'s inner value x + 1 also a graph output (so it must stay outside)."""
    from onnx import TensorProto, helper, numpy_helper

    f = lambda name, v: numpy_helper.from_array(np.array(v, np.float32), name)  # noqa: E731
    nodes = [helper.make_node("Mul", ["x", "five"], ["s"]),
             helper.make_node("Add", ["x", "one"], ["x1"]),
             helper.make_node("Mul", ["x1", "three"], ["few_tmp"]),
             helper.make_node("Add", ["few_tmp", "s"], ["few"]),
             helper.make_node("Mul", ["x", "two"], ["many_tmp"]),
             helper.make_node("Add", ["many_tmp", "s"], ["many"]),
             helper.make_node("ByRows", ["x", "few", "many"], ["y"], domain="deploytool", rows=4)]
    info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", 3]) for n in ("few", "many", "s", "few_tmp")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3]) if typed
                               else helper.make_empty_tensor_value_info("y"),
                               helper.make_tensor_value_info("x1", TensorProto.FLOAT, ["b", 3])],
                              [f("one", 1), f("two", 2), f("three", 3), f("five", 5)], value_info=info)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("deploytool", 1)])


def test_by_rows_becomes_an_if_whose_branches_hold_only_their_own_nodes(tmp_path):
    from deploytool.export.by_rows import lower_by_rows

    model = _marker_graph()
    assert lower_by_rows(model) == 1
    onnx.checker.check_model(model, full_check=True)
    by_op = {n.op_type: n for n in model.graph.node}
    branches = {a.name: a.g for a in by_op["If"].attribute}
    then, other = branches["then_branch"], branches["else_branch"]
    assert [n.output[0] for n in then.node] == ["few_tmp", "few"]
    assert [n.output[0] for n in other.node] == ["many_tmp", "many"]
    outside = [n.output[0] for n in model.graph.node]
    assert "s" in outside and "x1" in outside and "ByRows" not in by_op  # shared and graph outputs stay outside
    onnx.save(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for rows, want in ((3, lambda x: (x + 1) * 3 + 5 * x), (4, lambda x: 2 * x + 5 * x)):
        x = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
        np.testing.assert_allclose(session.run(["y"], {"x": x})[0], want(x))


def test_an_untyped_marker_is_refused_in_one_line():
    from deploytool.export.by_rows import lower_by_rows

    with pytest.raises(CheckFailed, match="has no output type"):
        lower_by_rows(_marker_graph(typed=False))


def test_auto_exports_a_half_precision_model_whose_block_output_is_the_graph_output(tmp_path):
    model = Experts(12).eval().half()
    result = deploytool.export_onnx(model, tmp_path / "h.onnx", example_inputs=torch.randn(4, 12).half(), moe_op="auto")
    assert result.passed and not result.notes and _ops(tmp_path / "h.onnx")[0].count("If") == 1
