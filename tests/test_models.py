"""The built-in models: routed-cnn (images, router on pooled features) and moe-transformer (2 token routers)."""

from __future__ import annotations

import pytest
import torch

from deploytool.errors import BadInput
from deploytool.models import MODELS, MoETransformer, RoutedCNN, build_model, example_inputs, input_shape
from deploytool.nn import named_routers, record_routing, routing_mode
from deploytool.recipes import TrainConfig
from deploytool.checkpoints import load_model
from deploytool.training import train


@pytest.mark.parametrize("name, shape", [("routed-mlp", (64,)), ("routed-cnn", (1, 8, 8)),
                                         ("moe-transformer", (8, 8))])
def test_each_model_reads_digits_in_its_own_shape(name, shape):
    config = {"model": name, "in_features": 64}
    assert input_shape(config) == shape
    assert example_inputs(config, batch=3)["x"].shape == (3, *shape)


def test_cnn_routes_once_per_image_and_returns_logits():
    torch.manual_seed(0)
    model = RoutedCNN(64, 10, n_experts=4).eval()
    with record_routing(model) as calls:
        logits = model(torch.rand(5, 1, 8, 8))
    assert logits.shape == (5, 10)
    assert [path for path, _ in named_routers(model)] == ["routed.router"]
    assert calls["routed.router"][0].index.shape == (5,)


def test_transformer_has_one_router_per_layer_deciding_per_token():
    torch.manual_seed(0)
    model = MoETransformer(64, 10, n_experts=4, d_model=16, layers=2, heads=2).eval()
    x = torch.rand(3, 8, 8)
    with record_routing(model) as calls:
        logits = model(x)
    assert logits.shape == (3, 10)
    paths = [path for path, _ in named_routers(model)]
    assert paths == ["layers.0.moe.router", "layers.1.moe.router"]
    routers = [router for _, router in named_routers(model)]
    assert routers[0] is not routers[1]
    for path in paths:
        assert len(calls[path]) == 1 and calls[path][0].index.shape == (3, 8)
    with routing_mode(model, "soft"):
        assert not torch.allclose(model(x), logits)  # soft blends, hard commits: the routing matters


@pytest.mark.parametrize("recipe, name, routers", [("digits-cnn", "routed-cnn", 1),
                                                   ("digits-transformer", "moe-transformer", 2)])
def test_new_models_train_from_their_recipe_and_report_every_router(tmp_path, recipe, name, routers):
    small = {"channels": 4} if name == "routed-cnn" else {"d_model": 16}
    run = train(recipe, tmp_path / "run", progress=False, epochs=2, lr=1e-2, expert_hidden=16, **small)
    m = run.metrics
    assert run.config["model"] == name and len(m["routers"]) == routers
    tokens = 8 if name == "moe-transformer" else 1
    for figures in m["routers"].values():
        assert figures["decisions"] == m["n_test"] * tokens
        assert sum(figures["expert_load"]) == pytest.approx(1.0)
    assert m["min_expert_load"] == min(r["min_expert_load"] for r in m["routers"].values())
    assert m["soft_accuracy"] > 0.3  # chance is 0.1
    rebuilt = load_model(run.path)
    assert type(rebuilt) is MODELS[name]
    assert [r.temperature for _, r in named_routers(rebuilt)] == [run.config["temperature"]] * routers


def test_model_sizes_are_validated_with_the_field_named():
    with pytest.raises(BadInput, match="d_model=30 must be a multiple of heads=4"):
        TrainConfig(model="moe-transformer", d_model=30)
    with pytest.raises(BadInput, match="layers must be a whole number >= 1"):
        TrainConfig(model="moe-transformer", layers=0)
    with pytest.raises(BadInput, match="channels must be int"):
        TrainConfig(model="routed-cnn", channels=2.5)
    with pytest.raises(BadInput, match="50 features is not a square"):
        input_shape({"model": "routed-cnn", "in_features": 50})
    with pytest.raises(BadInput, match="not a square"):
        build_model({"model": "moe-transformer", "in_features": 10, "n_classes": 3})
