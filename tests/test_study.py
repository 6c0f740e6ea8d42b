"""The penalty study writes one markdown row per (method, balance) and judges the targets."""

from __future__ import annotations

from deploytool.penalty_study import BALANCE, METHODS, summarise, study


def test_study_writes_a_row_per_method_and_balance(tmp_path):
    result = study(tmp_path / "routing.md", seeds=1, epochs=1, progress=False)
    text = (tmp_path / "routing.md").read_text()
    assert len(result["rows"]) == len(METHODS) * len(BALANCE)
    for method in METHODS:
        assert text.count(f"| {method} |") == len(BALANCE)


def test_summary_takes_the_worst_seed_against_the_targets():
    good = {"hard_accuracy": 0.98, "soft_accuracy": 0.98, "hard_soft_gap": 0.0, "frac_confident": 0.99,
            "min_expert_load": 0.2, "seed": 0}
    assert summarise([good, {**good, "seed": 1}])["meets_targets"]
    starved = {**good, "seed": 1, "min_expert_load": 0.05}
    row = summarise([good, starved])
    assert row["worst_min_expert_load"] == 0.05 and not row["meets_targets"]


def test_zero_epochs_is_refused_not_ignored(tmp_path):
    import pytest

    from deploytool.errors import BadInput

    with pytest.raises(BadInput, match="epochs"):
        study(tmp_path / "r.md", seeds=1, epochs=0, progress=False)
    assert not (tmp_path / "r.md").exists()


def test_a_models_reduced_study_replaces_only_its_own_section(tmp_path):
    from deploytool.study_doc import merge_section, section_markers

    out = tmp_path / "routing.md"
    begin, end = section_markers("routed-mlp")
    out.write_text(merge_section(None, f"{begin}\n## routed-mlp\nkeep me\n{end}", "routed-mlp"))
    for _ in range(2):  # the second run replaces the first one's section
        result = study(out, seeds=1, epochs=1, model="moe-transformer", methods=["frank penalty"],
                       balances=["batch entropy"], progress=False)
    text = out.read_text()
    assert [(r["method"], r["balance"]) for r in result["rows"]] == [("frank penalty", "batch entropy")]
    assert "keep me" in text and text.count("## moe-transformer") == 1 and text.count("## routed-mlp") == 1
    assert "recipe `digits-transformer`" in text and "2 routers (one per layer)" in text
    assert "a reduced study" in text and text.count("| frank penalty | batch entropy |") == 1


def test_unknown_model_and_method_are_refused_before_training(tmp_path):
    import pytest

    from deploytool.errors import BadInput

    with pytest.raises(BadInput, match="unknown model 'resnet'"):
        study(tmp_path / "r.md", model="resnet", progress=False)
    with pytest.raises(BadInput, match="unknown method 'l2'"):
        study(tmp_path / "r.md", model="routed-cnn", methods=["l2"], progress=False)
    assert not (tmp_path / "r.md").exists()


def test_study_cli_takes_a_model_and_a_subset(tmp_path, cli):
    code, out, err = cli("study", "--model", "routed-cnn", "--method", "frank penalty", "--balance", "none",
                         "--seeds", "1", "--epochs", "1", "--out", tmp_path / "r.md", "--json")
    assert code == 0, err
    import json

    rows = json.loads(out)["rows"]
    assert [(r["method"], r["balance"]) for r in rows] == [("frank penalty", "none")]
    assert "## routed-cnn" in (tmp_path / "r.md").read_text()
