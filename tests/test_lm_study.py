"""`deploytool study --model HF_DIR --data TOKENS`: a top-k LM made top-1 four ways at one budget, its section
of the study document written beside the others; bad inputs refused in one line before any training."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import assert_one_line_error

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

TINY = ("--steps", "2", "--seq-len", "16", "--batch-size", "4", "--eval-tokens", "128", "--seeds", "1")


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    from hf_models import tiny_model

    root = tmp_path_factory.mktemp("lmstudy")
    tiny_model("mixtral", num_experts_per_tok=2, num_hidden_layers=1).save_pretrained(root / "mix")
    np.save(root / "ids.npy", (np.arange(3000) * 7 % 256).astype(np.uint16))
    return root


def test_the_lm_study_compares_the_four_ways_and_keeps_the_other_sections(cli, lm_dir, tmp_path):
    from deploytool.lm_study import METHODS
    from deploytool.study_doc import merge_section, section_markers

    torch.set_num_threads(1)
    out = tmp_path / "routing.md"
    begin, end = section_markers("routed-mlp")
    out.write_text(merge_section(None, f"{begin}\n## routed-mlp\nkeep me\n{end}", "routed-mlp"))
    for _ in range(2):  # the second study replaces the first one's section
        code, stdout, err = cli("study", "--model", lm_dir / "mix", "--data", lm_dir / "ids.npy", "--out", out,
                                *TINY, "--json")
        assert code == 0, err
    result = json.loads(stdout)
    rows = result["rows"]["0"]
    assert [r["method"] for r in rows] == ["top-2 original", *METHODS]
    assert rows[0]["ratio"] == 1.0 and all(r["ratio"] > 0 for r in rows)
    assert [w["method"] for w in result["worst"]] == list(METHODS)
    text = out.read_text()
    assert "keep me" in text and text.count("## LM: mix") == 1 and text.count("## routed-mlp") == 1
    assert "| 0 | commit, no distillation |" in text and "Worst over the seeds" in text


@pytest.mark.parametrize("args, match", [
    (("--model", "routed-mlp", "--data", "{ids}"), "built-in model"),
    (("--model", "{mix}", "--data", "{ids}", "--steps", "100000000000"), "steps"),
    (("--model", "{mix}", "--data", "{root}/missing.npy", "--steps", "2"), "missing.npy"),
    (("--model", "{mix}", "--data", "{ids}", "--steps", "2", "--out", "{root}"), "is a directory"),
    (("--model", "{mix}", "--data", "{mix}/model.safetensors", "--steps", "2"), "model file"),
    (("--model", "{mix}", "--data", "{root}/m.onnx", "--steps", "2"), "model file"),
    (("--model", "{mix}", "--data", "{ids}", "--steps", "2", "--epochs", "3"), "built-in model's study"),
    (("--model", "{mix}", "--steps", "2"), "--data"),
])
def test_bad_lm_study_inputs_are_refused_in_one_line_before_training(cli, lm_dir, tmp_path, monkeypatch, args,
                                                                     match):
    import deploytool.lm as lm

    def no_training(*_a, **_k):
        raise AssertionError("trained before refusing")

    monkeypatch.setattr(lm, "lm_loop", no_training)
    (lm_dir / "m.onnx").write_bytes(b"\x08\x07")
    fill = {"ids": lm_dir / "ids.npy", "mix": lm_dir / "mix", "root": lm_dir}
    code, _, err = cli("study", *(a.format(**fill) for a in args), "--out", tmp_path / "r.md") \
        if "--out" not in args else cli("study", *(a.format(**fill) for a in args))
    assert_one_line_error(code, err, 2, match)
    assert not (tmp_path / "r.md").exists()
