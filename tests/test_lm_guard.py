"""The load guard keeps every expert alive when an LM commit makes a top-2 Mixtral top-1; without it the
commit's routing collapses onto one expert."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

#: a strong penalty and learning rate, so that 40 steps show the collapse the guard prevents
SETTINGS = dict(seq_len=16, steps=40, batch_size=8, lr=1e-2, distill=0.0, eval_tokens=1024)
ALPHA = 3.0


def _commit(ids, out, guard: float) -> dict:
    from hf_models import tiny_model

    from deploytool.hf import from_hf
    from deploytool.lm import LMCommitSettings, commit_lm

    model = from_hf(tiny_model("mixtral", num_local_experts=4, num_experts=4, num_experts_per_tok=2,
                               num_hidden_layers=1))
    return commit_lm(model, str(ids), out=out, settings=LMCommitSettings(guard=guard, **SETTINGS),
                     loss=LMCommitSettings.default_loss(alpha=ALPHA), progress=False, force=True).metrics


def test_the_guard_keeps_every_expert_of_an_lm_commit_alive_and_without_it_one_takes_the_traffic(tmp_path):
    torch.set_num_threads(1)
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 256, 6000).astype(np.uint16))
    guarded = _commit(ids, tmp_path / "guarded", guard=1.0)
    (path, targets), = guarded["load_targets"].items()
    assert min(targets) >= 0.2  # every expert carried a fair share of the soft routing before the commit
    loads = guarded["routers"][path]["expert_load"]  # the committed top-1 model's, on held-out tokens
    assert len(loads) == 4 and min(loads) >= 0.10, loads
    assert guarded["min_frac_confident"] >= 0.95

    loose = sorted(_commit(ids, tmp_path / "loose", guard=0.0)["routers"][path]["expert_load"])
    assert loose[-1] >= 0.6 and loose[1] <= 0.03, loose  # one expert takes most tokens, two are (all but) dead
