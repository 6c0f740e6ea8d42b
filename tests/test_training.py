"""Training writes a complete, reproducible run directory; recipes and data sets fail clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deploytool import io
from deploytool.data import load_dataset
from deploytool.errors import BadInput
from deploytool.recipes import TrainConfig, load_recipe, list_recipes
from deploytool.checkpoints import load_model
from deploytool.training import temperature_at, train

REQUIRED_METRICS = {"soft_accuracy", "hard_accuracy", "mean_max_prob", "frac_confident", "expert_load",
                    "routing_entropy", "seed", "epochs"}


def test_run_dir_holds_config_weights_metrics_and_plot(trained_run):
    for name in (io.CONFIG_FILE, io.WEIGHTS_FILE, io.METRICS_FILE, io.ROUTING_PLOT):
        assert (trained_run.path / name).is_file(), name
    metrics = json.loads((trained_run.path / io.METRICS_FILE).read_text())
    assert REQUIRED_METRICS <= set(metrics)
    assert sum(metrics["expert_load"]) == pytest.approx(1.0)
    assert len(metrics["expert_load"]) == 4
    assert (trained_run.path / io.ROUTING_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(trained_run.path.glob(".*tmp")), "temporary files left behind"


def test_model_rebuilt_from_the_run_dir_reproduces_its_metrics(trained_run):
    from deploytool.metrics import routing_metrics

    data = load_dataset("digits", seed=0)
    metrics = routing_metrics(load_model(trained_run.path), data.x_test, data.y_test)
    assert metrics["hard_accuracy"] == trained_run.metrics["hard_accuracy"]
    assert metrics["expert_load"] == trained_run.metrics["expert_load"]


def test_same_seed_gives_the_same_metrics(tmp_path):
    a = train(None, tmp_path / "a", progress=False, epochs=2, seed=5).metrics
    b = train(None, tmp_path / "b", progress=False, epochs=2, seed=5).metrics
    a.pop("train_seconds"), b.pop("train_seconds")
    assert a == b


def test_binary_sigmoid_router_trains(tmp_path):
    run = train(None, tmp_path / "bin", progress=False, epochs=5, experts=2, router="sigmoid")
    assert len(run.metrics["expert_load"]) == 2
    assert run.metrics["hard_accuracy"] > 0.7  # chance is 0.1


def test_temperature_anneals_geometrically_from_start_to_end():
    config = TrainConfig(temperature=1.0, temperature_end=0.01)
    assert temperature_at(config, 0, 101) == pytest.approx(1.0)
    assert temperature_at(config, 50, 101) == pytest.approx(0.1)
    assert temperature_at(config, 100, 101) == pytest.approx(0.01)
    assert temperature_at(TrainConfig(temperature_end=None), 7, 10) == 1.0


@pytest.mark.parametrize("overrides, match", [
    ({"experts": 1}, "always says 'class 0'"),
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"alpha": -1.0}, "alpha"),
    ({"penalty": "l2"}, "unknown penalty"),
    ({"model": "resnet"}, "unknown model"),
    ({"router": "sigmoid", "experts": 4}, "exactly 2"),
    ({"epochs": 0}, "epochs"),
])
def test_bad_config_values_are_refused(overrides, match):
    with pytest.raises(BadInput, match=match):
        TrainConfig(**overrides)


def test_builtin_recipe_loads_by_name_and_flags_override_it():
    assert "digits-4" in list_recipes()
    config = load_recipe("digits-4", {"experts": 6, "alpha": None})
    assert config.experts == 6 and config.dataset == "digits"


def test_malformed_and_unknown_recipes_are_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("experts = [")
    with pytest.raises(BadInput, match="not valid TOML"):
        load_recipe(bad)
    typo = tmp_path / "typo.toml"
    typo.write_text("expert = 4\n")
    with pytest.raises(BadInput, match="unknown key"):
        load_recipe(typo)
    with pytest.raises(BadInput, match="does not exist"):
        load_recipe(tmp_path / "missing.toml")


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("keep me")
    with pytest.raises(BadInput, match="is a file"):
        train(None, target, progress=False, epochs=1)
    assert target.read_text() == "keep me"


def test_digits_split_is_fixed_by_seed():
    a, b, c = load_dataset("digits", 0), load_dataset("digits", 0), load_dataset("digits", 1)
    assert len(a.x_train) + len(a.x_test) == 1797
    assert np.array_equal(a.y_test, b.y_test) and not np.array_equal(a.y_test, c.y_test)
    assert a.x_train.dtype == np.float32 and a.n_features == 64 and a.n_classes == 10


def test_blobs_have_any_size():
    data = load_dataset("blobs", 0, n_samples=500, n_features=12, n_classes=3)
    assert data.x_train.shape[1] == 12 and len(data.x_train) + len(data.x_test) == 500


def test_user_npz_loads(tmp_path):
    path = tmp_path / "mine.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.normal(size=(100, 5)), y=rng.integers(0, 3, 100))
    data = load_dataset(str(path))
    assert data.n_features == 5 and data.x_train.dtype == np.float32


@pytest.mark.parametrize("arrays, match", [
    ({"x": np.array([{"a": 1}] * 20, dtype=object), "y": np.zeros(20, int)}, "pickled"),
    ({"x": np.zeros((20, 3)), "y": np.zeros(19, int)}, "20 rows but y has 19"),
    ({"features": np.zeros((20, 3)), "y": np.zeros(20, int)}, "'x' and 'y'"),
    ({"x": np.full((20, 3), np.nan), "y": np.zeros(20, int)}, "NaN"),
])
def test_bad_npz_files_are_refused(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(BadInput, match=match):
        load_dataset(str(path))


def test_unknown_dataset_is_refused():
    with pytest.raises(BadInput, match="unknown data set"):
        load_dataset("mnist")


def test_pickled_checkpoint_is_refused_not_unpickled(tmp_path):
    import pickle

    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    with pytest.raises(BadInput, match="not a safetensors file"):
        io.load_weights(path)


def test_run_files_get_the_permissions_a_plain_write_would(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        run = train(None, tmp_path / "run", progress=False, epochs=1)
    finally:
        os.umask(old)
    assert stat.S_IMODE(run.path.stat().st_mode) == 0o755
    for name in (io.CONFIG_FILE, io.WEIGHTS_FILE, io.METRICS_FILE, io.ROUTING_PLOT):
        assert stat.S_IMODE((run.path / name).stat().st_mode) == 0o644, name


def test_existing_run_is_kept_unless_forced(tmp_path):
    out = tmp_path / "run"
    first = train(None, out, progress=False, epochs=1, seed=1)
    with pytest.raises(BadInput, match="not empty.*with force"):
        train(None, out, progress=False, epochs=1, seed=2)
    assert json.loads((out / io.METRICS_FILE).read_text())["seed"] == 1
    second = train(None, out, progress=False, epochs=1, seed=2, force=True)
    assert second.metrics["seed"] == 2 and first.path == second.path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "temporary directories left behind"


def test_a_failed_run_leaves_no_directory(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((20, 3)), y=np.zeros(19, int))
    with pytest.raises(BadInput):
        train(None, tmp_path / "run", progress=False, epochs=1, dataset=str(bad))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, match", [
    ({"experts": "four"}, "experts must be int"),
    ({"experts": 2.7}, "experts must be int"),
    ({"epochs": True}, "epochs must be int"),
    ({"experts": 0}, "experts must be a whole number >= 2, got 0"),
    ({"seed": -1}, "seed must be"),
])
def test_values_of_the_wrong_type_or_range_name_the_field(overrides, match):
    with pytest.raises(BadInput, match=match):
        TrainConfig(**overrides)


def test_a_text_file_given_as_npz_is_named_as_such(tmp_path):
    path = tmp_path / "data.npz"
    path.write_text("x,y\n1,2\n")
    with pytest.raises(BadInput, match="is not an .npz file"):
        load_dataset(str(path))


def test_empty_checkpoint_and_directory_recipe_are_named_as_such(tmp_path):
    empty = tmp_path / "model.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(BadInput, match="is empty"):
        io.load_weights(empty)
    with pytest.raises(BadInput, match="is a directory"):
        load_recipe(tmp_path)


def test_config_without_architecture_keys_is_refused(tmp_path, trained_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run.path, run)
    config = json.loads((run / io.CONFIG_FILE).read_text())
    del config["in_features"]
    (run / io.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(BadInput, match="lacks in_features"):
        load_model(run)
    config["in_features"] = "64"
    (run / io.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(BadInput, match="in_features='64' must be whole numbers"):
        load_model(run)


def test_train_and_fit_share_one_loop_whose_settings_are_checked_once():
    from deploytool.recipes import LOOP_FIELDS, LoopSettings
    from deploytool.training import final_temperature

    config = TrainConfig(epochs=3, lr=1e-3, temperature_end=None, routing="gumbel")
    loop = config.loop()
    assert {name: getattr(loop, name) for name in LOOP_FIELDS} == {name: getattr(config, name) for name in LOOP_FIELDS}
    assert final_temperature(loop) == 1.0 and final_temperature(LoopSettings()) == 0.02
    with pytest.raises(BadInput, match="batch_size must be a whole number >= 1"):
        LoopSettings(batch_size=0)
    with pytest.raises(BadInput, match="lr must be int or float"):
        LoopSettings(lr="fast")
    with pytest.raises(BadInput, match="unknown routing"):
        TrainConfig(routing="hard")
