"""Issue 13, bad input in training, data, recipes, reports and run directories: each case prints one
`error:` line naming the file or key, exits 2, before any training or long work, and writes nothing."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_line_error
from deploytool import io
from deploytool.errors import BadInput


def _tiny_npz(path: Path, x=None, y=None) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)) if x is None else x
    y = np.arange(40) % 2 if y is None else y
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if the training loop starts: bad input must be refused before it."""
    def boom(*args, **kwargs):
        raise AssertionError("training started before the bad input was refused")

    monkeypatch.setattr("deploytool.training.training_loop", boom)


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A copy of the session's trained run, to break."""
    path = tmp_path / "run"
    shutil.copytree(trained_run.path, path)
    return path


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))  # NaN is written as the bare NaN token, as a careless editor would


# --- 1. data sets ---------------------------------------------------------------------------------

def _truncated(path: Path) -> Path:
    good = _tiny_npz(path.with_name("good.npz")).read_bytes()
    path.write_bytes(good[: len(good) // 2])
    return path


X = np.random.default_rng(0).normal(size=(40, 4))
Y = np.arange(40) % 2


@pytest.mark.parametrize("arrays, match", [
    ({"x": X + 1j * X}, "x is complex"),
    ({"y": np.where(Y == 0, 0, 10**9)}, "K <= 10000"),
    ({"y": Y * 50}, "only 2 of the 51 classes"),
    ({"x": X * 1e300}, "beyond float32"),
    ({"x": np.zeros((40, 0))}, "no features"),
    ({"y": Y + 0.5}, "integer labels"),
    ({"y": Y[:30]}, "40 rows but y has 30"),
    ({"x": X[:, 0]}, "x must be 2-D"),
    ({"y": np.zeros(40, int)}, "single class"),
    ({"x": X[:5], "y": Y[:5]}, "at least 10 rows"),
    (None, "not a readable .npz"),
])
def test_bad_npz_is_one_line_before_training(cli, tmp_path, no_training, arrays, match):
    data = tmp_path / "data.npz"
    _truncated(data) if arrays is None else _tiny_npz(data, **arrays)
    code, _, err = cli("train", "--dataset", data, "--epochs", 1, "--out", tmp_path / "out", "-q")
    assert_one_line_error(code, err, 2, match)
    assert "data.npz" in err and not (tmp_path / "out").exists()


def test_float32_data_of_a_float64_file_is_checked_after_the_cast(tmp_path):
    from deploytool.data import load_dataset

    with pytest.raises(BadInput, match="NaN or inf"):
        load_dataset(str(_tiny_npz(tmp_path / "d.npz", x=np.full((40, 4), 1e300))))
    data = load_dataset(str(_tiny_npz(tmp_path / "ok.npz", x=X.astype(np.int16) * 1000)))
    assert data.x_train.dtype == np.float32 and np.isfinite(data.x_train).all()


# --- 2. recipes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, match", [
    ('[train]\nexperts = "four"\n', "experts must be int"),
    ("[train]\nexpertz = 4\n", "unknown key(s) expertz"),
    ("train = 5\n", "train must be a [train] table"),
    ('epochs = 1\n[train]\nexperts = 4\n', "epochs sit outside the [train] table"),
    ('[train]\ndataset = "DATA"\ndata_options = { n_samples = 100 }\n', "'n_samples' do not apply"),
    ('[train]\ndata_options = { n_features = 3 }\n', "'n_features' do not apply to data set digits"),
    ('[train]\ndataset = "blobs"\ndata_options = { n_samples = "many" }\n', "n_samples must be a whole number"),
    ('[train]\ndataset = "blobs"\ndata_options = { n_samples = 100000000000 }\n', "blobs of 100000000000"),
    ("[train]\ndata_options = 3\n", "data_options must be dict"),
])
def test_bad_recipe_names_the_file_and_key(cli, tmp_path, no_training, text, match):
    recipe = tmp_path / "r.toml"
    recipe.write_text(text.replace("DATA", str(_tiny_npz(tmp_path / "d.npz"))))
    code, _, err = cli("train", "--recipe", recipe, "--out", tmp_path / "out", "-q")
    assert_one_line_error(code, err, 2, match)
    assert "r.toml" in err and not (tmp_path / "out").exists()


# --- 3. run configs and metrics -------------------------------------------------------------------

@pytest.mark.parametrize("changes, match", [
    ({"n_experts": 5}, "n_experts=5 disagrees with experts=4"),
    ({"n_experts": 5, "experts": 5}, "n_experts=5 but model.safetensors holds 4 experts"),
    ({"width": -3}, "width=-3 must be a whole number >= 1"),
    ({"width": "32"}, "width='32' must be a whole number"),
    ({"width": 0}, "width=0 must be a whole number >= 1"),
    ({"temperature": None}, "temperature=None must be a finite number > 0"),
    ({"temperature": -1.0}, "temperature=-1.0 must be"),
    ({"expert_hidden": -5}, "expert_hidden=-5"),
    ({"router_hidden": -1}, "router_hidden=-1 must be a whole number >= 0"),
    ({"model": "resnet"}, "model='resnet' must be one of routed-mlp"),
    ({"router": "xx"}, "router='xx'"),
    ({"alpha": float("nan")}, "alpha=nan"),
])
def test_bad_run_config_is_one_line_for_every_consumer(cli, run_copy, tmp_path, changes, match):
    from deploytool.checkpoints import load_model

    _edit_json(run_copy / io.CONFIG_FILE, **changes)
    for args in (("report", run_copy), ("export", run_copy, "--out", tmp_path / "m.onnx")):
        code, _, err = cli(*args)
        assert_one_line_error(code, err, 2, match)
        assert "config.json" in err
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(BadInput, match="config.json"):
        load_model(run_copy)


@pytest.mark.parametrize("changes, match", [
    ({"hard_accuracy": float("nan")}, "hard_accuracy=nan must be a finite number"),
    ({"soft_accuracy": "0.9"}, "soft_accuracy='0.9'"),
    ({"expert_load": ["a"]}, "expert_load=['a'] must be a non-empty list"),
])
def test_bad_metrics_are_one_line(cli, run_copy, changes, match):
    _edit_json(run_copy / io.METRICS_FILE, **changes)
    code, _, err = cli("report", run_copy)
    assert_one_line_error(code, err, 2, match)
    assert "metrics.json" in err


def test_metrics_that_are_not_an_object_are_refused(cli, run_copy):
    (run_copy / io.METRICS_FILE).write_text("[1]")
    code, _, err = cli("report", run_copy)
    assert_one_line_error(code, err, 2, "metrics.json is not a deploytool metrics file")


def test_build_model_errors_are_bad_input():
    from deploytool.artifacts import BUILTIN_MODELS
    from deploytool.models import MODELS, build_model

    assert tuple(MODELS) == BUILTIN_MODELS
    with pytest.raises(BadInput, match="expert_hidden=-5"):
        build_model({"model": "routed-mlp", "in_features": 4, "n_classes": 2, "expert_hidden": -5})


# --- 4. weights -----------------------------------------------------------------------------------

@pytest.mark.parametrize("damage, match", [("nan", "holds NaN or inf"), ("int", "is int32, the model expects")])
def test_export_and_package_refuse_nan_or_integer_weights(cli, run_copy, tmp_path, damage, match):
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(run_copy / io.WEIGHTS_FILE)
    name = sorted(state)[0]
    state[name] = (state[name].clone().fill_(float("nan")) if damage == "nan" else state[name].to(torch.int32))
    save_file(state, run_copy / io.WEIGHTS_FILE)
    code, _, err = cli("export", run_copy, "--out", tmp_path / "m.onnx")
    assert_one_line_error(code, err, 2, match)
    code, _, err = cli("package", run_copy, "--repository", tmp_path / "repo", "--name", "m")
    assert_one_line_error(code, err, 2, match)
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "repo" / "m").exists()


# --- 5. outputs checked before training -----------------------------------------------------------

def test_study_checks_its_output_is_writable_before_training(cli, monkeypatch, tmp_path):
    def boom(*args, **kwargs):
        raise AssertionError("trained before checking the output")

    monkeypatch.setattr("deploytool.training.train", boom)
    if not Path("/proc").is_dir():
        pytest.skip("needs /proc: a directory no one can write, root included")
    code, _, err = cli("study", "--out", "/proc/study.md", "--seeds", 1, "--epochs", 1, "-q")
    assert_one_line_error(code, err, 2, "/proc is not writable")
    (tmp_path / "file").write_text("keep")
    code, _, err = cli("study", "--out", tmp_path / "file" / "study.md", "--seeds", 1, "--epochs", 1, "-q")
    assert_one_line_error(code, err, 2, "is a file")


def test_train_out_under_a_file_is_refused_before_training(cli, tmp_path, no_training):
    (tmp_path / "file").write_text("keep")
    code, _, err = cli("train", "--dataset", _tiny_npz(tmp_path / "d.npz"), "--out", tmp_path / "file" / "sub", "-q")
    assert_one_line_error(code, err, 2, "is a file")
    assert (tmp_path / "file").read_text() == "keep"


# --- 6. two trainings into one directory ----------------------------------------------------------

def _another_run_appears(monkeypatch, out: Path):
    """Simulate a second `train --out out` that finishes while this one trains."""
    from deploytool import training

    real = training.training_loop

    def loop(*args, **kwargs):
        out.mkdir()
        (out / io.CONFIG_FILE).write_text('{"other": true}')
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "training_loop", loop)


def test_a_run_written_meanwhile_is_kept_not_silently_replaced(cli, monkeypatch, tmp_path):
    out = tmp_path / "run"
    _another_run_appears(monkeypatch, out)
    code, _, err = cli("train", "--dataset", _tiny_npz(tmp_path / "d.npz"), "--epochs", 1, "--out", out, "-q")
    assert_one_line_error(code, err, 2, "written by another process meanwhile")
    assert json.loads((out / io.CONFIG_FILE).read_text()) == {"other": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "run"]  # nothing temporary left


def test_force_replaces_a_run_written_meanwhile(monkeypatch, tmp_path):
    from deploytool.training import train

    out = tmp_path / "run"
    _another_run_appears(monkeypatch, out)
    run = train(None, out, progress=False, force=True, dataset=str(_tiny_npz(tmp_path / "d.npz")), epochs=1)
    assert json.loads((out / io.CONFIG_FILE).read_text())["model"] == "routed-mlp" == run.config["model"]


# --- 7. --out "" and --force never wipe a directory that is not a run -----------------------------

def test_out_empty_string_is_the_current_directory_and_is_refused(cli, monkeypatch, tmp_path, no_training):
    (tmp_path / "keep.txt").write_text("mine")
    data = _tiny_npz(tmp_path / "d.npz")
    monkeypatch.chdir(tmp_path)
    for extra in ((), ("--force",)):
        code, _, err = cli("train", "--dataset", data, "--out", "", "-q", *extra)
        assert_one_line_error(code, err, 2, "is the current directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "keep.txt"]


def test_force_refuses_a_directory_that_is_not_a_run(cli, tmp_path, no_training):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code, _, err = cli("train", "--dataset", _tiny_npz(tmp_path / "d.npz"), "--out", mine, "--force", "-q")
    assert_one_line_error(code, err, 2, "not a deploytool run directory")
    assert (mine / "thesis.tex").read_text() == "years of work"


# --- 8. unbounded work --------------------------------------------------------------------------

@pytest.mark.parametrize("args, match", [
    (("--experts", "99999999999999"), "experts must be at most 4096"),
    (("--epochs", "10000000"), "epochs must be at most 100000"),
    (("--batch-size", "99999999999"), "batch_size must be at most"),
])
def test_absurd_sizes_are_refused_at_once(cli, tmp_path, no_training, args, match):
    code, _, err = cli("train", *args, "--out", tmp_path / "out", "-q")
    assert_one_line_error(code, err, 2, match)


def test_a_model_larger_than_memory_is_refused_before_allocation(cli, tmp_path, no_training):
    recipe = tmp_path / "big.toml"
    recipe.write_text(f'[train]\ndataset = "{_tiny_npz(tmp_path / "d.npz")}"\nexperts = 4096\n'
                      "expert_hidden = 1048576\nwidth = 1048576\n")
    code, _, err = cli("train", "--recipe", recipe, "--out", tmp_path / "out", "-q")
    assert_one_line_error(code, err, 2, "GiB of memory to train")


def test_parameter_count_is_exact_without_allocating():
    from deploytool.models import build_model, parameter_count

    for config in ({"model": "routed-mlp", "in_features": 6, "n_classes": 3, "n_experts": 5, "trunk": 4,
                    "router_hidden": 3},
                   {"model": "moe-transformer", "in_features": 16, "n_classes": 3, "n_experts": 3, "d_model": 4,
                    "heads": 2, "layers": 3, "expert_hidden": 5},
                   {"model": "routed-cnn", "in_features": 16, "n_classes": 3, "n_experts": 4, "channels": 2}):
        assert parameter_count(config) == sum(p.numel() for p in build_model(config).parameters())
    huge = {"model": "routed-mlp", "in_features": 10**6, "n_classes": 10, "n_experts": 4096, "expert_hidden": 10**6}
    assert parameter_count(huge) > 4 * 10**15  # counted, never allocated


# --- 10. public API ---------------------------------------------------------------------------------

def test_study_takes_keyword_only_options():
    from deploytool.penalty_study import study

    params = list(inspect.signature(study).parameters.values())
    assert params[0].name == "out" and all(p.kind is p.KEYWORD_ONLY for p in params[1:])


def test_public_functions_document_args_returns_raises():
    from deploytool import artifacts, checkpoints, finetune, hf, metrics, penalty_study, recipes, training

    for fn in (training.train, training.fit, finetune.commit, checkpoints.load_model, checkpoints.load_weights_into,
               checkpoints.open_module, hf.from_hf, hf.load_folder,
               metrics.report, penalty_study.study, recipes.load_recipe, artifacts.load_run,
               artifacts.check_run_config):
        doc = inspect.getdoc(fn)
        assert all(section in doc for section in ("Args:", "Raises:")), fn.__name__
        assert "Returns:" in doc or fn is artifacts.check_run_config, fn.__name__
    assert "Attributes:" in inspect.getdoc(artifacts.RunDir)
    assert "Raises:" in inspect.getdoc(recipes.TrainConfig)
