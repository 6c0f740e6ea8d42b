"""Hugging Face transformers MoE models: converted exactly, refused in one line, exported sparse, and a
save_pretrained folder taken as a target by every command."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import assert_one_line_error  # noqa: E402
from deploytool.errors import BadInput  # noqa: E402
from hf_models import FAMILIES, REFUSED, tiny_model  # noqa: E402

CONVERTED = [f for f in FAMILIES if f not in REFUSED]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ids(batch=2, tokens=12, seed=0):
    return torch.randint(0, 256, (batch, tokens), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", CONVERTED)
def test_every_family_converts_exactly_at_its_own_k(family):
    from deploytool.hf import from_hf
    from deploytool.moe import TopKRouting

    model = tiny_model(family)
    original = copy.deepcopy(model)
    ids = _ids()
    from_hf(model)
    routers = [m for m in model.modules() if isinstance(m, TopKRouting)]
    assert routers, family
    with torch.no_grad():
        want, got = original(ids).logits, model(ids).logits
    assert float((want - got).abs().max()) <= 1e-5
    assert set(model.state_dict()) == set(original.state_dict())  # weights used in place, keys unchanged


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_a_family_deploytool_cannot_express_is_refused_in_one_line_and_left_as_it_was(family):
    from deploytool.hf import from_hf

    model = tiny_model(family)
    classes = [type(m) for m in model.modules()]
    with pytest.raises(BadInput, match=REFUSED[family]) as info:
        from_hf(model)
    assert "\n" not in str(info.value) and "Phimoe" in str(info.value)
    assert [type(m) for m in model.modules()] == classes  # nothing half-converted


def test_switch_transformers_is_refused_naming_its_separate_experts():
    from transformers import AutoConfig, SwitchTransformersForConditionalGeneration

    from deploytool.hf import from_hf

    config = AutoConfig.for_model("switch_transformers", d_model=32, d_ff=32, num_layers=2, num_decoder_layers=2,
                                  num_heads=2, d_kv=8, num_experts=4, vocab_size=64,
                                  encoder_sparse_step=1, decoder_sparse_step=1)
    with pytest.raises(BadInput, match="separate modules, not fused"):
        from_hf(SwitchTransformersForConditionalGeneration(config))


def test_the_rule_read_from_each_router_keeps_what_distinguishes_its_family():
    from deploytool.hf import from_hf
    from deploytool.moe import TopKRouting

    def rule(family):
        return next(m for m in from_hf(tiny_model(family)).modules() if isinstance(m, TopKRouting)).rule

    assert (rule("mixtral").scoring, rule("mixtral").combine) == ("softmax", "renorm")
    assert rule("qwen2_moe").combine == "prob"
    v3 = rule("deepseek_v3")
    assert (v3.scoring, v3.scale, v3.groups, v3.group_score) == ("sigmoid", 2.5, (2, 1), "top2")
    assert rule("deepseek_v2").group_score == "max"


def test_top_1_commits_every_router_and_runs_one_expert_per_token():
    from deploytool.hf import from_hf
    from deploytool.nn import record_routing

    model = from_hf(tiny_model("mixtral"), top_k=1)
    ran = []
    experts = model.model.layers[0].mlp.experts
    original = type(experts).expert
    type(experts).expert = lambda self, e, x: ran.append(len(x)) or original(self, e, x)
    try:
        with torch.no_grad(), record_routing(model) as calls:
            model(_ids(2, 12))
    finally:
        type(experts).expert = original
    assert sum(ran[:len(ran) // 2]) == 24  # layer 0: each of the 24 tokens through one expert, once
    index = calls["model.layers.0.mlp.gate"][0].index
    assert index.shape == (2, 12) and index.dtype == torch.int64


def test_sparse_and_dense_dispatch_agree_for_top_k():
    from deploytool.hf import from_hf
    from deploytool.nn import dispatch_mode

    model = from_hf(tiny_model("qwen2_moe"), top_k=2)
    ids = _ids(3, 10)
    with torch.no_grad():
        with dispatch_mode(model, "dense"):
            dense = model(ids).logits
        with dispatch_mode(model, "sparse"):
            sparse = model(ids).logits
    assert float((dense - sparse).abs().max()) <= 1e-5


def test_bad_top_k_is_bad_input():
    from deploytool.hf import from_hf

    model = tiny_model("mixtral")
    classes = [type(m) for m in model.modules()]
    for bad in (9, 0, 1.5, True):
        with pytest.raises(BadInput, match="top-k must be a whole number from 1 to 8"):
            from_hf(model, top_k=bad)
    assert [type(m) for m in model.modules()] == classes  # refused before anything changed
    with pytest.raises(BadInput, match="no MoE block"):
        from_hf(torch.nn.Linear(2, 2))


def test_export_of_a_converted_model_at_top_1_is_sparse_validated_and_has_every_layers_decisions(tmp_path):
    import onnx

    import deploytool

    model = deploytool.from_hf(tiny_model("qwen2_moe"), top_k=1)
    result = deploytool.export_onnx(model, tmp_path / "m.onnx", example_inputs=_ids(2, 16))
    assert result.passed
    names = {o.name: o.shape for o in result.signature.outputs}
    assert names["logits"] == ("batch", "tokens", 256)
    assert names["model.layers.1.mlp.gate.index"] == ("batch", "tokens")
    assert result.signature.vocab == {"input_ids": 256}
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert "HardSelect" in ops and ops.count("NonZero") >= 16  # one per expert per layer: only chosen experts run
    session = deploytool.load(tmp_path / "m.onnx")
    out = session.run({"input_ids": np.array([[3, 200, 17]], np.int64)})  # another batch and length
    assert out["logits"].shape == (1, 3, 256) and out["model.layers.0.mlp.gate.index"].shape == (1, 3)


def test_export_at_top_2_with_sigmoid_scoring_and_tied_weights(tmp_path):
    import deploytool

    model = deploytool.from_hf(tiny_model("deepseek_v3", tie_word_embeddings=True))
    result = deploytool.export_onnx(model, tmp_path / "m.onnx", example_inputs=_ids(2, 16), dispatch="dense")
    assert result.passed
    index = next(o for o in result.signature.outputs if o.name.endswith("gate.index"))
    assert index.shape == ("batch", "tokens", 2) and result.signature.routers[0].k == 2


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A Qwen2-MoE (shared expert, top-4, no renormalisation) saved with save_pretrained, in a path with a space."""
    path = tmp_path_factory.mktemp("hf") / "qwen moe"
    tiny_model("qwen2_moe").save_pretrained(path)
    return path


def test_a_save_pretrained_folder_exports_verifies_benches_and_loads_from_the_cli(cli, hf_folder, tmp_path):
    onnx_path = tmp_path / "out k1.onnx"
    code, out, err = cli("export", str(hf_folder), "--out", str(onnx_path), "--top-k", "1")
    assert code == 0 and onnx_path.is_file(), err
    code, out, err = cli("verify", str(onnx_path), "--checkpoint", str(hf_folder), "-n", "64")
    assert code == 0 and "parity: PASS" in out, err
    code, out, err = cli("bench", str(hf_folder), "--backends", "torch", "--batch-sizes", "1", "--duration-s", "0.2",
                         "--json", "-")
    assert code == 0, err

    import deploytool

    session = deploytool.load(hf_folder)
    ids = np.random.default_rng(0).integers(0, 256, (2, 7))
    assert session.run({"input_ids": ids})["logits"].shape == (2, 7, 256)


def test_folder_export_at_another_k_verifies_against_the_folder_at_that_k(hf_folder, tmp_path):
    import deploytool

    deploytool.export_onnx(hf_folder, tmp_path / "k2.onnx", top_k=2, validate=False)
    report = deploytool.verify(tmp_path / "k2.onnx", checkpoint=hf_folder, samples=32)
    assert report.passed


def test_folder_inputs_are_refused_in_one_line(tmp_path, hf_folder, cli):
    import shutil

    bin_only = tmp_path / "bin only"
    bin_only.mkdir()
    shutil.copy(hf_folder / "config.json", bin_only / "config.json")
    (bin_only / "pytorch_model.bin").write_bytes(b"pickle")
    code, _, err = cli("export", str(bin_only), "--out", str(tmp_path / "m.onnx"))
    assert_one_line_error(code, err, 2, "never unpickles")
    assert not (tmp_path / "m.onnx").exists()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    shutil.copy(hf_folder / "config.json", corrupt / "config.json")
    (corrupt / "model.safetensors").write_bytes((hf_folder / "model.safetensors").read_bytes()[:1000])
    code, _, err = cli("export", str(corrupt), "--out", str(tmp_path / "m.onnx"))
    assert_one_line_error(code, err, 2, "transformers cannot load it")
    code, _, err = cli("export", str(hf_folder), "--out", str(tmp_path / "m.onnx"), "--top-k", "0")
    assert_one_line_error(code, err, 2, "top-k must be a whole number")
    weights = hf_folder / "model.safetensors"
    before = weights.read_bytes()
    code, _, err = cli("export", str(hf_folder), "--out", str(weights))
    assert code == 2 and weights.read_bytes() == before  # an output that is an input is never written


def test_a_converted_model_still_generates_with_its_cache_as_the_original_does():
    from deploytool.hf import from_hf

    model = tiny_model("mixtral")
    original = copy.deepcopy(model)
    ids = _ids(1, 5)
    want = original.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(from_hf(model).generate(ids, max_new_tokens=5, do_sample=False), want)


def test_package_of_a_folder_exports_it_sparse_at_top_k_and_packages_the_onnx_model(cli, hf_folder, tmp_path):
    import json

    code, out, err = cli("package", str(hf_folder), "--repository", str(tmp_path / "repo"), "--name", "moe",
                         "--top-k", "1", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["backend"] == "onnxruntime" and "1/model.onnx" in result["files"]
    assert "top-1" in result["notes"][0]
    code, _, err = cli("package", str(tmp_path / "repo" / "moe" / "1" / "model.onnx"), "--repository",
                       str(tmp_path / "repo2"), "--name", "m", "--top-k", "2")
    assert_one_line_error(code, err, 2, "top-k applies to a Hugging Face MoE folder")


@pytest.mark.serve
def test_a_folder_served_at_top_1_answers_token_ids_as_its_exported_model_does(hf_folder, tmp_path):
    from test_serve import free_port, require_server, triton_infer

    import deploytool

    require_server()
    path = deploytool.export_onnx(hf_folder, tmp_path / "moe.onnx", top_k=1, validate=False).path
    ids = np.random.default_rng(1).integers(0, 256, (2, 9)).astype(np.int64)
    local = deploytool.load(path).run({"input_ids": ids})
    server = deploytool.serve(hf_folder, port=free_port(), grpc_port=free_port(), name="moe", block=False, top_k=1)
    try:
        outputs = ("logits", "model.layers.0.mlp.gate.index")
        got = triton_infer(server, {"input_ids": ids}, outputs=outputs)
    finally:
        server.stop()
    assert np.allclose(got["logits"], local["logits"], atol=1e-5)
    assert np.array_equal(got["model.layers.0.mlp.gate.index"], local["model.layers.0.mlp.gate.index"])


def test_a_probe_token_at_a_near_tie_does_not_refuse_a_router_that_breaks_it_the_other_way():
    from deploytool.hf import _same_choice

    index = torch.tensor([[0, 1], [2, 3], [1, 2]] * 4)
    hf_index = index.clone()
    hf_index[0] = torch.tensor([0, 3])  # another float order picked expert 3 at a tie
    weights = torch.full(index.shape, 0.5)
    ties = torch.zeros(len(index), dtype=torch.bool)
    assert not _same_choice(index, weights, hf_index, weights, ties)
    ties[0] = True
    assert _same_choice(index, weights, hf_index, weights, ties)
    assert not _same_choice(index, weights, hf_index, weights, torch.ones(len(index), dtype=torch.bool))


def test_verify_and_bench_take_a_text_file_as_token_windows(cli, hf_folder, tmp_path):
    import json

    import deploytool

    path = deploytool.export_onnx(hf_folder, tmp_path / "k1.onnx", top_k=1, validate=False).path
    text = tmp_path / "some text.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 40)
    report = deploytool.verify(path, checkpoint=hf_folder, data=text, samples=8)
    assert report.passed and "windows of 16 tokens" in next(iter(report.inputs))
    code, out, err = cli("bench", str(path), "--data", str(text), "--batch-sizes", "2", "--duration-s", "0.2",
                         "--routing", "uniform,single", "--json", "-")
    assert code == 0, err
    result = json.loads(out)
    assert "windows of 16 tokens" in json.dumps(result)
    assert "torch" in result["backends"]  # rebuilt from the folder the export records, at the export's top-1
    single = next(line["histograms"]["model.layers.0.mlp.gate"] for line in result["lines"]
                  if line["routing"] == "single")
    assert max(single) > 0.4 * sum(single)  # token rows picked so that one expert's tokens dominate


def test_report_measures_a_folder_on_token_data_and_asks_for_data_without_it(cli, hf_folder, tmp_path):
    import json

    code, _, err = cli("report", str(hf_folder))
    assert_one_line_error(code, err, 2, "give token data")
    text = tmp_path / "code.txt"
    text.write_text("def f(x):\n    return x * 2\n" * 60)
    code, out, err = cli("report", str(hf_folder), "--data", str(text), "--seq-len", "32", "--json")
    assert code == 0, err
    metrics = json.loads(out)["metrics"]
    assert metrics["original_k"] == 4 and set(metrics["routers"]) == {"model.layers.0.mlp.gate",
                                                                      "model.layers.1.mlp.gate"}
    assert metrics["perplexity"] > 1 and sum(metrics["routers"]["model.layers.0.mlp.gate"]["expert_load"]) == \
        pytest.approx(1.0)
