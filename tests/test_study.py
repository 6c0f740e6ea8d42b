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
