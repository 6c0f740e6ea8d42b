"""deploytool.fit trains a user's own module (image input, two routers) with the built-in loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import deploytool
from deploytool import io
from deploytool.data import load_digits
from deploytool.errors import BadInput
from deploytool.recipes import LoopSettings
from deploytool.nn import RoutedExperts, Router, RoutingLoss, named_routers


class TwoRouterCNN(nn.Module):
    """Images [B, 1, 8, 8]: router 1 picks a conv block from pooled features, router 2 a classifier head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.blocks = RoutedExperts(Router(4, 2), [nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
                                                   for _ in range(2)], loss=RoutingLoss(penalty="frank"))
        self.heads = RoutedExperts(Router(256, 3), [nn.Linear(256, 10) for _ in range(3)],
                                   loss=RoutingLoss(penalty="frank"))

    def forward(self, x):
        h = self.stem(x)
        h = self.blocks(h, route_on=h.mean(dim=(2, 3))).output
        return self.heads(h.flatten(1)).output


@pytest.fixture(scope="module")
def digits_images():
    data = load_digits(seed=0)
    return ((data.x_train[:400].reshape(-1, 1, 8, 8), data.y_train[:400]),
            (data.x_test[:150].reshape(-1, 1, 8, 8), data.y_test[:150]))


@pytest.fixture(scope="module")
def fitted(digits_images, tmp_path_factory):
    torch.manual_seed(0)
    model = TwoRouterCNN()
    train_data, test_data = digits_images
    out = tmp_path_factory.mktemp("fit") / "run"
    return model, deploytool.fit(model, train_data, out=out, loop=LoopSettings(epochs=4, lr=1e-2), test_data=test_data,
                                progress=False)


def test_fit_writes_a_run_dir_of_the_users_module(fitted):
    model, run = fitted
    for name in (io.CONFIG_FILE, io.WEIGHTS_FILE, io.METRICS_FILE, io.ROUTING_PLOT):
        assert (run.path / name).is_file(), name
    config = json.loads((run.path / io.CONFIG_FILE).read_text())
    assert config["model"] == "module:TwoRouterCNN" and config["input_shape"] == [1, 8, 8]
    assert config["epochs"] == 4 and config["temperature"] == 0.02 and config["temperature_start"] == 1.0
    assert config["routers"] == {"blocks.router": 2, "heads.router": 3}
    metrics = run.metrics
    assert set(metrics["routers"]) == {"blocks.router", "heads.router"}
    assert metrics["evaluated_on"] == "test_data" and metrics["n_test"] == 150
    assert metrics["soft_accuracy"] > 0.3  # chance is 0.1
    assert [r.temperature for _, r in named_routers(model)] == [0.02, 0.02]  # every router annealed


def test_load_model_says_to_build_the_module_and_weights_load_into_a_fresh_one(fitted, digits_images):
    model, run = fitted
    with pytest.raises(BadInput, match="build that module yourself.*load_weights_into") as err:
        deploytool.load_model(run.path)
    assert "\n" not in str(err.value)
    fresh = deploytool.load_weights_into(TwoRouterCNN(), run.path)
    assert not fresh.training and [r.temperature for _, r in named_routers(fresh)] == [0.02, 0.02]
    x = torch.from_numpy(digits_images[1][0][:20])
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model.eval()(x))
    assert deploytool.report(run.path)["metrics"]["hard_accuracy"] == run.metrics["hard_accuracy"]


def test_loss_fn_replaces_cross_entropy_and_seed_makes_runs_repeat(digits_images, tmp_path):
    calls = []

    def smoothed(logits, labels):
        calls.append(logits.shape)
        return nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)

    train_data = (digits_images[0][0][:128], digits_images[0][1][:128])
    results = []
    for name in ("a", "b"):
        torch.manual_seed(1)
        run = deploytool.fit(TwoRouterCNN(), train_data, out=tmp_path / name,
                             loop=LoopSettings(epochs=1, batch_size=64, seed=3, temperature_end=None),
                             loss_fn=smoothed, progress=False)
        results.append(run.metrics)
    assert calls == [(64, 10)] * 4
    assert results[0]["evaluated_on"] == "train_data" and results[0]["temperature"] == 1.0
    assert results[0]["hard_accuracy"] == results[1]["hard_accuracy"]
    assert results[0]["expert_load"] == results[1]["expert_load"]


@pytest.mark.parametrize("model, data, match", [
    (nn.Linear(4, 2), (np.zeros((8, 4), np.float32), np.zeros(8, int)), "has no deploytool router"),
    ("model", (np.zeros((8, 4)), np.zeros(8, int)), "trains a torch nn.Module"),
    (TwoRouterCNN(), (np.zeros((8, 1, 8, 8)), np.zeros(7, int)), "8 samples but y has 7"),
    (TwoRouterCNN(), (np.zeros((8, 1, 8, 8)), np.zeros(8)), "integer class labels"),
    (TwoRouterCNN(), np.zeros((8, 1, 8, 8)), "pair \\(x, y\\)"),
])
def test_bad_models_and_data_are_refused_before_training(tmp_path, model, data, match):
    with pytest.raises(BadInput, match=match):
        deploytool.fit(model, data, out=tmp_path / "run", loop=LoopSettings(epochs=1), progress=False)
    assert not (tmp_path / "run").exists()


def test_bad_settings_name_the_setting(tmp_path):
    data = (np.zeros((8, 1, 8, 8), np.float32), np.zeros(8, int))
    with pytest.raises(BadInput, match="epochs must be a whole number >= 1"):
        deploytool.fit(TwoRouterCNN(), data, out=tmp_path / "run", loop=LoopSettings(epochs=0), progress=False)
    with pytest.raises(BadInput, match="temperature_end"):
        deploytool.fit(TwoRouterCNN(), data, out=tmp_path / "run", loop=LoopSettings(epochs=1, temperature_end=-1.0),
                       progress=False)
