"""deploytool.moe: top-k rules, fused experts and MoE blocks of your own; ONNX Runtime's MoE op."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from deploytool.moe import FusedExperts, MoEBlock, TopKRouter, TopKRule  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _block(*, k=2, activation="silu", gated=True, combine="renorm", scoring="softmax", shared=True, clamp=None):
    torch.manual_seed(0)
    router = TopKRouter(16, 4, rule=TopKRule(k=k, scoring=scoring, combine=combine, scale=1.5), selection_bias=True)
    router.selection_bias.copy_(torch.tensor([0.0, 0.05, -0.02, 0.01]))
    experts = FusedExperts(4, 16, 24, activation=activation, gated=gated, bias=True, clamp=clamp)
    return MoEBlock(router, experts, shared=torch.nn.Linear(16, 16) if shared else None,
                    shared_gate=torch.nn.Linear(16, 1) if shared else None).eval()


class Wrapped(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.moe = _block(**kw)

    def forward(self, x):
        return self.moe(x)


@pytest.mark.parametrize("k,combine,scoring,clamp", [(1, "renorm", "softmax", None), (2, "renorm", "softmax", None),
                                                     (2, "prob", "sigmoid", None), (3, "one", "softmax", None),
                                                     (2, "renorm", "softmax", (1.702, 0.5))])
def test_sparse_dispatch_equals_dense_and_the_written_out_sum(k, combine, scoring, clamp):
    from deploytool.nn import dispatch_mode

    block = _block(k=k, combine=combine, scoring=scoring, clamp=clamp)
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        with dispatch_mode(block, "dense"):
            dense = block(x)
        sparse = block(x)
        flat = x.reshape(-1, 16)
        _, w, idx = block.router(flat)
        by_hand = torch.stack([sum(w[n, j] * block.experts.expert(int(idx[n, j]), flat[n:n + 1])[0] for j in range(k))
                               for n in range(len(flat))])
        by_hand = by_hand + torch.sigmoid(block.shared_gate(flat)) * block.shared(flat)
    assert torch.allclose(dense, sparse, atol=1e-5)
    assert torch.allclose(sparse.reshape(-1, 16), by_hand, atol=1e-5)
    decisions = block.router.last_routing.index
    assert decisions.shape == ((3, 7) if k == 1 else (3, 7, k))  # one decision per token at k = 1


def test_selection_bias_picks_without_entering_the_weights():
    rule = TopKRule(k=1, combine="prob")
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    probs, index, weights = rule.choose(logits, 1.0, torch.tensor([0.0, 0.5, 0.0]))
    assert int(index) == 1 and torch.allclose(weights, probs[:, 1:2])


def test_bad_rules_and_blocks_are_refused():
    with pytest.raises(ValueError, match="top-k must be"):
        TopKRule(k=0)
    with pytest.raises(ValueError, match="scoring must be"):
        TopKRule(scoring="tanh")
    with pytest.raises(ValueError, match="at least 2 experts"):
        TopKRouter(8, 1)
    with pytest.raises(ValueError, match="top-3 of 2"):
        TopKRouter(8, 2, rule=TopKRule(k=3))
    with pytest.raises(ValueError, match="activation must be"):
        FusedExperts(2, 8, 8, activation="tanh")
    with pytest.raises(ValueError, match="needs gated=True"):
        FusedExperts(2, 8, 8, gated=False, clamp=(1.702, 7.0))


def test_the_clamped_swiglu_clamps_and_interleaves():
    experts = FusedExperts(1, 2, 1, clamp=(1.0, 0.5))
    h = torch.tensor([[3.0, 2.0]])  # gate 3 -> 0.5, up 2 -> 0.5
    assert torch.allclose(experts._apply_gate(h), torch.tensor([[1.5 * 0.5 * torch.sigmoid(torch.tensor(0.5))]]))


def test_a_block_of_your_own_exports_sparse_and_validates(tmp_path):
    import deploytool

    result = deploytool.export_onnx(Wrapped(k=1), tmp_path / "m.onnx", example_inputs=torch.randn(2, 5, 16),
                                    dynamic_dims={"x": {1: "tokens"}})
    assert result.passed and result.signature.routers[0].path == "moe.router"


def test_moe_op_ort_runs_the_experts_as_one_node_and_names_those_it_cannot(tmp_path):
    import onnx

    import deploytool

    for clamp in (None, (1.702, 0.5)):
        ok = deploytool.export_onnx(Wrapped(k=2, clamp=clamp), tmp_path / "ort.onnx", example_inputs=torch.randn(2, 5, 16),
                                    dynamic_dims={"x": {1: "tokens"}}, moe_op="ort")
        ops = [n.op_type for n in onnx.load(str(tmp_path / "ort.onnx")).graph.node]
        assert ok.passed and ops.count("MoE") == 1 and "NonZero" not in ops and not ok.notes
        (tmp_path / "ort.onnx").unlink()
    gelu = deploytool.export_onnx(Wrapped(k=1, activation="gelu"), tmp_path / "gelu.onnx",
                                  example_inputs=torch.randn(2, 5, 16), moe_op="ort")
    assert gelu.passed and len(gelu.notes) == 1 and "cannot compute these experts" in gelu.notes[0]
    assert "MoE" not in [n.op_type for n in onnx.load(str(tmp_path / "gelu.onnx")).graph.node]


def test_moe_op_ort_reproduces_gpt_oss_clamped_swiglu(tmp_path):
    pytest.importorskip("transformers")
    from hf_models import tiny_model

    import deploytool

    model = deploytool.from_hf(tiny_model("gpt_oss"), top_k=1)
    result = deploytool.export_onnx(model, tmp_path / "g.onnx", example_inputs=torch.randint(0, 256, (2, 12)),
                                    moe_op="ort")
    assert result.passed and not result.notes
