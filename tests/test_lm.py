"""Language models: token streams, fit and commit of a top-k MoE LM, checkpoints and resume, LM runs rebuilt."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deploytool import io
from deploytool.errors import BadInput
from deploytool.lm import LMCommitSettings, LMSettings, routing_loss
from deploytool.tokens import IGNORE, load_tokens, split_tokens, window_batch
from conftest import assert_one_line_error

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

STEPS = dict(eval_tokens=256, progress=False)


def tiny_mixtral(k: int = 2):
    from hf_models import tiny_model

    from deploytool.hf import from_hf

    return from_hf(tiny_model("mixtral", num_experts_per_tok=k))


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "ids.npy"
    rng = np.random.default_rng(0)
    np.save(path, (np.arange(6000) * 7 % 256 ^ rng.integers(0, 4, 6000)).astype(np.uint16))
    return path


# --- token streams -----------------------------------------------------------------------------------

def test_npy_and_bin_are_memory_mapped_and_text_without_a_tokenizer_is_bytes(tmp_path, ids_file):
    stream = load_tokens(ids_file)
    assert isinstance(stream.ids, np.memmap) and len(stream) == 6000
    bin_path = tmp_path / "ids.bin"
    np.load(ids_file).astype("<u2").tofile(bin_path)
    assert np.array_equal(np.asarray(load_tokens(bin_path).ids), np.load(ids_file))
    text = tmp_path / "code.py"
    text.write_bytes("déf x():\n".encode())
    stream = load_tokens(text)
    assert isinstance(stream.ids, np.memmap) and stream.vocab == 256
    assert bytes(np.asarray(stream.ids)) == "déf x():\n".encode()


def test_windows_are_next_token_labels_with_the_mask_and_the_vocabulary_checked(tmp_path):
    path = tmp_path / "masked.npz"
    np.savez(path, ids=np.arange(10), mask=np.array([1, 1, 1, 0, 0, 1, 1, 1, 1, 1]))
    stream = load_tokens(path)
    ids, labels = window_batch(stream, np.array([0, 2]), 4)
    assert ids.tolist() == [[0, 1, 2, 3], [2, 3, 4, 5]]
    assert labels.tolist() == [[1, 2, IGNORE, IGNORE], [IGNORE, IGNORE, 5, 6]]
    with pytest.raises(BadInput, match="token id 9 is outside the model's vocabulary 0..7"):
        window_batch(stream, np.array([6]), 3, vocab=8)


def test_the_held_out_split_is_the_stream_s_tail_and_named(ids_file, tmp_path):
    train, held = split_tokens(load_tokens(ids_file), None, test_fraction=0.1)
    assert len(train) == 5400 and len(held) == 600 and held.ids[0] == np.load(ids_file)[5400]
    assert held.name == "last 10% of tokens of ids.npy"
    _, other = split_tokens(load_tokens(ids_file), ids_file)
    assert other.name == "test data ids.npy" and len(other) == 6000


@pytest.mark.parametrize("content, match", [(b"", "holds 0 tokens"), (b"abc", "even number of bytes")])
def test_bad_token_files_are_named(tmp_path, content, match):
    path = tmp_path / "ids.bin"
    path.write_bytes(content)
    with pytest.raises(BadInput, match=match):
        load_tokens(path)
    np.save(tmp_path / "x.npy", np.zeros((3, 3), np.int64))
    with pytest.raises(BadInput, match="1-D integer array"):
        load_tokens(tmp_path / "x.npy")


@pytest.mark.parametrize("name", ["model.onnx", "model.safetensors", "model.plan", "m.ENGINE"])
def test_model_files_are_refused_as_token_data(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x08\x07ab")
    with pytest.raises(BadInput, match="model file"):
        load_tokens(tmp_path / name)


# --- fit, commit, the run rebuilt ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def fitted(tmp_path_factory, ids_file):
    import deploytool

    model = tiny_mixtral(k=2)
    out = tmp_path_factory.mktemp("fit") / "run"
    run = deploytool.fit(model, ids_file, out=out, loop=LMSettings(steps=6, seq_len=16, batch_size=4),
                         loss=routing_loss(penalty="none", balance="switch", beta=0.01), **STEPS)
    return model, run


def test_fit_writes_an_lm_run_that_rebuilds_with_the_same_logits(fitted):
    from deploytool.checkpoints import open_module
    from deploytool.metrics import lm_logits, report

    model, run = fitted
    m = run.metrics
    assert m["task"] == "lm" and m["heldout"] == "last 10% of tokens of ids.npy" and m["original_k"] == 2
    assert m["perplexity"] > 1 and m["soft_perplexity"] > 1 and m["topk_perplexity"] > 1
    assert set(m["routers"]) == {"model.layers.0.mlp.gate", "model.layers.1.mlp.gate"}
    assert all(abs(sum(r["expert_load"]) - 1) < 1e-9 for r in m["routers"].values())
    assert run.config["top_k"] == 2 and run.config["hf_config"]["model_type"] == "mixtral"
    assert (run.path / io.ROUTING_PLOT).stat().st_size > 0 and report(run.path)["metrics"]["task"] == "lm"
    source = open_module(run.path)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(lm_logits(source.module, ids), lm_logits(model, ids), atol=1e-5)


def test_commit_makes_a_top_k_model_top_1_and_its_run_rebuilds_at_top_1(fitted, ids_file, tmp_path):
    import deploytool
    from deploytool.checkpoints import open_module
    from deploytool.nn import named_routers

    _, run = fitted
    committed = deploytool.commit(run.path, out=tmp_path / "c", data=str(ids_file),
                                  settings=LMCommitSettings(steps=4, seq_len=16, eval_tokens=256,
                                                            straight_through=True, batch_size=4),
                                  progress=False)
    assert committed.config["top_k"] == 1 and committed.config["commit"]["original_k"] == 2
    assert committed.metrics["before"]["topk_perplexity"] == pytest.approx(run.metrics["topk_perplexity"])
    assert committed.config["temperature"] == pytest.approx(0.05)
    assert set(committed.metrics["load_targets"]) == set(run.metrics["routers"])
    rebuilt = open_module(committed.path).module
    assert [r.k for _, r in named_routers(rebuilt)] == [1, 1]
    assert [r.temperature for _, r in named_routers(rebuilt)] == pytest.approx([0.05, 0.05])
    assert not (tmp_path / "c.checkpoint").exists()


def test_straight_through_gives_a_top_1_router_the_lm_loss_gradient(ids_file):
    from deploytool.lm import _straight_through
    from deploytool.metrics import lm_logits

    model = tiny_mixtral(k=1)
    model.train()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    gate = model.model.layers[0].mlp.gate
    lm_logits(model, ids).logsumexp(-1).mean().backward()
    assert gate.weight.grad is None or float(gate.weight.grad.abs().max()) == 0.0
    model.zero_grad()
    handle = gate.register_forward_hook(_straight_through)
    before = lm_logits(model, ids)
    before.logsumexp(-1).mean().backward()
    handle.remove()
    assert float(gate.weight.grad.abs().max()) > 0
    with torch.no_grad():
        model.eval()
        assert torch.allclose(lm_logits(model, ids), before.detach(), atol=1e-6)  # the same forward


def test_ctrl_c_leaves_a_checkpoint_and_resume_ends_where_an_uninterrupted_run_does(ids_file, tmp_path):
    from deploytool.lm import LMSettings, lm_loop
    from deploytool.tokens import load_tokens

    stream = load_tokens(ids_file)
    settings = LMSettings(seq_len=16, steps=5, batch_size=2, seed=1, checkpoint_every=2)
    whole = tiny_mixtral()
    lm_loop(whole, stream, settings, progress=False)

    calls = []

    def interrupting(logits, labels, ids):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    ckpt = tmp_path / "run.checkpoint"
    model = tiny_mixtral()
    with pytest.raises(KeyboardInterrupt):
        lm_loop(model, stream, settings, loss_fn=interrupting, checkpoint=ckpt, progress=False)
    assert json.loads((ckpt / "state.json").read_text())["step"] == 3
    resumed = tiny_mixtral()
    result = lm_loop(resumed, stream, settings, checkpoint=ckpt, resume=True, progress=False)
    assert result["resumed_from"] == 3
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    with pytest.raises(BadInput, match="other settings \\(steps\\)"):
        lm_loop(tiny_mixtral(), stream, LMSettings(seq_len=16, steps=6, batch_size=2, seed=1, checkpoint_every=2),
                checkpoint=ckpt, resume=True, progress=False)


@pytest.mark.parametrize("options, match", [
    ({"steps": 2, "tokens": 64}, "in steps or in tokens"),
    ({"steps": 10**9}, "more than the 10000000"),
    ({"steps": 2, "seq_len": 0}, "seq_len must be a whole number"),
])
def test_bad_budgets_are_refused_before_training(ids_file, tmp_path, options, match):
    from deploytool.lm import fit_lm

    with pytest.raises(BadInput, match=match):
        fit_lm(tiny_mixtral(), ids_file, out=tmp_path / "r", loop=LMSettings(**options), progress=False)
    assert not (tmp_path / "r").exists()


def test_fit_and_commit_from_the_cli(cli, ids_file, tmp_path):
    from hf_models import tiny_model

    folder = tmp_path / "mix"
    tiny_model("mixtral", num_experts_per_tok=2).save_pretrained(folder)
    code, out, err = cli("fit", folder, "--data", ids_file, "--out", tmp_path / "f", "--seq-len", 16, "--steps", 3,
                         "--batch-size", 2, "--json")
    assert code == 0, err
    assert json.loads(out)["config"]["top_k"] == 2
    code, out, err = cli("commit", tmp_path / "f", "--data", ids_file, "--out", tmp_path / "c", "--seq-len", 16,
                         "--tokens", 64, "--batch-size", 2, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["config"]["top_k"] == 1 and result["metrics"]["steps"] == 2
    code, out, err = cli("report", tmp_path / "c")
    assert code == 0 and "perplexity" in out
    code, _, err = cli("commit", tmp_path / "f", "--data", ids_file, "--out", tmp_path / "d", "--steps", 2,
                       "--tokens", 9)
    assert_one_line_error(code, err, 2, "in steps or in tokens")


def test_text_is_tokenised_by_the_model_folder_s_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from deploytool.tokens import has_tokenizer

    vocab = {"[UNK]": 0, "def": 1, "x": 2, "return": 3, ":": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = tmp_path / "model"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    text = tmp_path / "code.txt"
    text.write_text("def x : return x y")
    assert has_tokenizer(folder) and not has_tokenizer(tmp_path)
    stream = load_tokens(text, tokenizer=folder)
    assert stream.ids.tolist() == [1, 2, 4, 3, 2, 0] and stream.vocab == 5
    assert "tokenised by model's tokenizer" in stream.name
    assert load_tokens(text).vocab == 256  # no tokenizer: bytes


def test_lm_options_on_a_built_in_run_are_refused_not_ignored(cli, tmp_path):
    import deploytool

    run = deploytool.train(deploytool.TrainConfig(epochs=1, expert_hidden=8), tmp_path / "soft", progress=False)
    code, _, err = cli("commit", run.path, "--out", tmp_path / "c", "--steps", 5)
    assert_one_line_error(code, err, 2, "language-model options (steps)")
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_a_committed_lm_run_exports_and_verifies_with_the_torch_backend(fitted, ids_file, tmp_path):
    pytest.importorskip("onnxruntime")
    import deploytool
    from deploytool.export.onnx import export_onnx
    from deploytool.parity import verify

    _, run = fitted
    committed = deploytool.commit(run.path, out=tmp_path / "c", data=str(ids_file), progress=False,
                                  settings=LMCommitSettings(steps=2, seq_len=16, eval_tokens=128, batch_size=4))
    export_onnx(committed.path, tmp_path / "m.onnx")
    report = verify(tmp_path / "m.onnx", checkpoint=committed.path, samples=8)
    assert report.passed
