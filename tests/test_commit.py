"""deploytool.commit / `deploytool commit`: fine-tune a soft-routing model into a new run that commits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import deploytool
from deploytool import io
from deploytool.errors import BadInput
from deploytool.finetune import CommitSettings
from deploytool.nn import RoutedExperts, Router, named_routers
from conftest import assert_one_line_error


@pytest.fixture(scope="module")
def soft_run(tmp_path_factory):
    """A tiny soft-trained run: no penalty, no balance, temperature 1 throughout."""
    out = tmp_path_factory.mktemp("soft") / "run"
    config = deploytool.TrainConfig(epochs=2, penalty="none", balance="none", temperature_end=None, expert_hidden=16)
    return deploytool.train(config, out, progress=False)


def test_commit_writes_a_new_loadable_run_and_leaves_the_input_alone(soft_run, tmp_path):
    weights = soft_run.weights.read_bytes()
    run = deploytool.commit(soft_run.path, out=tmp_path / "committed",
                            settings=CommitSettings(router_epochs=1, model_epochs=1), progress=False)
    assert soft_run.weights.read_bytes() == weights
    config = json.loads((run.path / io.CONFIG_FILE).read_text())
    assert config["committed_from"] == str(soft_run.path)
    assert config["penalty"] == "frank" and config["balance"] == "entropy" and config["temperature"] == 0.02
    assert config["commit"]["router_epochs"] == 1 and config["commit"]["temperature_start"] == 1.0
    assert run.metrics["epochs"] == 2
    assert run.metrics["before"]["soft_accuracy"] == pytest.approx(soft_run.metrics["soft_accuracy"])
    model = deploytool.load_model(run.path)
    assert [r.temperature for _, r in named_routers(model)] == [0.02]
    changed = {k for k, v in io.load_weights(run.weights).items()
               if not torch.equal(v, io.load_weights(soft_run.weights)[k])}
    assert "routed.router.net.0.weight" in changed and "head.weight" in changed


def test_the_load_guard_keeps_every_expert_that_carried_traffic(soft_run, tmp_path):
    """The soft run blends all 4 experts (each >= 10% of the routing weight); committing it without the
    guard starves some of them to nothing (checked below, so that this setup keeps testing the guard)."""
    guarded = deploytool.commit(soft_run.path, out=tmp_path / "guarded",
                                 settings=CommitSettings(model_epochs=10), progress=False)
    bare = deploytool.commit(soft_run.path, out=tmp_path / "bare",
                              settings=CommitSettings(model_epochs=10, guard=0.0), progress=False)
    targets = np.array(guarded.metrics["load_targets"]["routed.router"])
    assert targets.min() >= 0.05 and targets.sum() == pytest.approx(1.0)
    assert guarded.config["commit"]["guard"] == 1.0 and bare.config["commit"]["guard"] == 0.0
    floor = targets / 2  # every expert keeps at least half the share it carried
    assert (np.array(guarded.metrics["expert_load"]) >= floor).all(), (guarded.metrics["expert_load"], targets)
    assert (np.array(bare.metrics["expert_load"]) < floor).any(), "this soft run no longer loses an expert " \
        "without the guard: pick a setup that does, or this test no longer tests the guard"
    assert guarded.metrics["frac_confident"] >= 0.9


def test_commit_refuses_a_bad_guard_weight(soft_run, tmp_path):
    for bad in (-1.0, float("nan"), "1"):
        with pytest.raises(BadInput, match="guard"):
            deploytool.commit(soft_run.path, out=tmp_path / "c", settings=CommitSettings(guard=bad), progress=False)


def test_router_stage_trains_only_the_routers(soft_run, tmp_path):
    run = deploytool.commit(soft_run.path, out=tmp_path / "c",
                            settings=CommitSettings(router_epochs=1, model_epochs=0), progress=False)
    before, after = io.load_weights(soft_run.weights), io.load_weights(run.weights)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"routed.router.net.0.weight", "routed.router.net.0.bias"}


def test_commit_refuses_to_write_over_its_input_run(soft_run):
    with pytest.raises(BadInput, match="new run directory, not over or inside its input run"):
        deploytool.commit(soft_run.path, out=soft_run.path, force=True, progress=False)


def test_commit_cli_refuses_its_input_as_output_in_one_line(soft_run, cli):
    code, _, err = cli("commit", soft_run.path, "--out", soft_run.path, "--force")
    assert_one_line_error(code, err, 2, "not over or inside its input run")


def test_commit_cli_writes_the_new_run(soft_run, cli, tmp_path):
    code, out, err = cli("commit", soft_run.path, "--out", tmp_path / "new", "--router-epochs", "1",
                         "--model-epochs", "1", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["run_dir"] == str(tmp_path / "new") and "before" in result["metrics"]


def test_commit_a_users_module_needs_data_and_writes_a_module_run(tmp_path):
    torch.manual_seed(0)
    model = RoutedExperts(Router(6, 2), [torch.nn.Linear(6, 3) for _ in range(2)])
    with pytest.raises(BadInput, match="needs data"):
        deploytool.commit(model, out=tmp_path / "run", progress=False)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 6)).astype(np.float32), rng.integers(0, 3, 64)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = model

        def forward(self, v):
            return self.moe(v).output

    run = deploytool.commit(Wrapped(), out=tmp_path / "run", data=(x, y),
                            settings=CommitSettings(router_epochs=1, model_epochs=1), progress=False)
    assert run.config["model"] == "module:Wrapped" and run.config["penalty"] == "frank"
    assert set(run.metrics["routers"]) == {"moe.router"}
    with pytest.raises(BadInput, match="load_weights_into"):
        deploytool.commit(run.path, out=tmp_path / "again", progress=False)
