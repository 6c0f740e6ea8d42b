"""`verify`: routing-aware parity across backends, exit codes, and the bad inputs it refuses."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import assert_one_line_error
from deploytool.errors import BadInput


@pytest.fixture(scope="module")
def perturbed(exported_onnx, tmp_path_factory):
    """The exported_onnx model with the router's rows rolled: confident rows go to another expert."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(exported_onnx))
    for init in model.graph.initializer:
        if init.name.startswith("routed.router.net.0."):
            init.CopyFrom(numpy_helper.from_array(np.roll(numpy_helper.to_array(init), 1, axis=0), init.name))
    path = tmp_path_factory.mktemp("perturbed") / "flipped.onnx"
    onnx.save(model, str(path))
    return path


def test_exported_model_verifies_against_torch_and_sparse_torch(exported_onnx, trained_run):
    from deploytool import verify

    report = verify(exported_onnx, trained_run.path, backends=("torch", "torch-sparse", "onnxruntime"), samples=360)
    assert report.passed, report.failures()
    assert len(report.comparisons) == 3  # every pair
    for c in report.comparisons:
        assert c.routing.agreement == 100.0 and c.routing.flips == 0
        assert max(o.max_abs for o in c.outputs) < 1e-5
    assert report.inputs == {"digits held-out": 360}


@pytest.fixture(scope="module")
def static8(trained_run, tmp_path_factory):
    """The trained run exported with its batch fixed to 8."""
    from deploytool import export_onnx

    path = tmp_path_factory.mktemp("static") / "static8.onnx"
    assert export_onnx(trained_run.path, path, static_batch=8).passed
    return path


def test_static_batch_model_verifies_fed_in_padded_chunks_of_its_batch(cli, static8, trained_run):
    code, out, err = cli("verify", static8, "-c", trained_run.path, "--samples", "101",
                         "--backends", "torch,torch-sparse,onnxruntime", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["passed"] and result["inputs"] == {"digits held-out": 101}
    assert all(c["routing"]["rows"] == 101 and c["routing"]["flips"] == 0 for c in result["comparisons"])


def test_cli_verify_json_is_machine_readable(cli, exported_onnx, trained_run):
    code, out, err = cli("verify", exported_onnx, "--checkpoint", trained_run.path, "--samples", "100", "--json")
    assert code == 0, err
    result = json.loads(out)
    (c,) = result["comparisons"]
    assert result["passed"] and c["reference"] == "torch" and c["candidate"] == "onnxruntime"
    assert {"max_abs", "mean_abs", "p99_abs", "max_rel", "min_atol", "passed"} <= set(c["outputs"][0])
    assert {"agreement", "flips", "tie_breaks", "failures", "buckets"} <= set(c["routing"])


def test_flip_at_large_margin_fails_verify(cli, perturbed, trained_run):
    from deploytool import verify

    report = verify(perturbed, trained_run.path)
    assert not report.passed
    routing = report.comparisons[0].routing
    assert routing.failures > 0.5 * routing.rows and routing.agreement < 50
    code, out, err = cli("verify", perturbed, "--checkpoint", trained_run.path)
    assert_one_line_error(code, err, 1, "routing flips")
    assert "parity: FAIL" in out


@pytest.mark.parametrize("name, match", [
    ("model.PLAN", "onnxruntime needs an ONNX model path"),  # an engine whatever the suffix's case
    ("model.txt", "neither a run directory, an .onnx file nor a TensorRT engine"),
])
def test_verify_tells_engines_from_onnx_by_suffix_like_load_does(tmp_path, name, match):
    from deploytool import verify

    path = tmp_path / name
    path.write_bytes(b"not a model")
    with pytest.raises(BadInput, match=match):
        verify(path, backends="onnxruntime,tensorrt")


def test_check_runners_match_refuses_a_checkpoint_of_another_shape(exported_onnx, tmp_path):
    from deploytool.ops.onnx_functions import routing_model
    from deploytool.parity import check_runners_match
    from deploytool.runners import make_runner

    other = tmp_path / "routing.onnx"
    other.write_bytes(routing_model(4, 0.5).SerializeToString())
    runners = [make_runner("onnxruntime", onnx_path=p, device="cpu") for p in (exported_onnx, other)]
    with pytest.raises(BadInput, match="disagree on shapes"):
        check_runners_match(runners, {}, None)
    assert check_runners_match(runners[:1], {}, None) == []


def test_checkpoint_sha_mismatch_is_noted(exported_onnx, trained_run, tmp_path):
    from deploytool import verify
    from deploytool.io import load_weights, save_weights

    run = tmp_path / "run"
    shutil.copytree(trained_run.path, run)
    state = load_weights(run / "model.safetensors")
    save_weights(run / "model.safetensors", {k: v * 1.0001 if v.is_floating_point() else v for k, v in state.items()})
    report = verify(exported_onnx, run, samples=50)
    assert any("sha256 differs" in n for n in report.notes)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_infinite_inputs_are_refused(bad):
    from deploytool.parity import check_inputs

    x = np.ones((4, 64), np.float32)
    x[2, 3] = bad
    with pytest.raises(BadInput, match=r"NaN or inf in row\(s\) 2"):
        check_inputs(x, 64)


def test_verify_refuses_an_array_with_inf_before_running(exported_onnx, trained_run):
    from deploytool import verify

    x = np.ones((8, 64), np.float32)
    x[5, 0] = np.inf
    with pytest.raises(BadInput, match=r"NaN or inf in row\(s\) 5"):
        verify(exported_onnx, trained_run.path, data=x)


def _pickled_run(run, tmp_path):
    import torch

    bad = tmp_path / "pickled"
    shutil.copytree(run, bad)
    torch.save({"w": torch.zeros(2)}, bad / "model.safetensors")
    return bad


def _mismatched_run(run, tmp_path):
    bad = tmp_path / "narrow"
    shutil.copytree(run, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "expert_hidden": 32}))
    return bad


def _other_model_run(run, tmp_path):
    """A consistent run directory of another model (8 experts): its own shapes load, the ONNX's differ."""
    from deploytool.io import save_weights, write_json
    from deploytool.models import build_model

    other = tmp_path / "other"
    other.mkdir()
    config = {**json.loads((run / "config.json").read_text()), "n_experts": 8}
    save_weights(other / "model.safetensors", build_model(config).state_dict())
    write_json(other / "config.json", config)
    return other


def _npz(tmp_path, features=10, nan=False):
    x = np.random.default_rng(0).random((40, features)).astype(np.float32)
    if nan:
        x[3, 1] = np.nan
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.arange(40) % 2)
    return path


@pytest.mark.parametrize("case, match", [
    ("missing model", "does not exist"),
    ("not onnx", "not an ONNX model"),
    ("truncated onnx", "not an ONNX model"),
    ("pickled checkpoint", "pickled checkpoints are refused"),
    ("checkpoint shapes", "shape"),
    ("checkpoint of another model", "the checkpoint does not match the model"),
    ("feature mismatch", "10 features but the model expects 64"),
    ("nan inputs", "NaN"),
    ("unknown backend", "unknown backend 'tflite'"),
    ("no checkpoint", "--checkpoint"),
    ("same backend twice", "backend 'torch' is given twice"),
    ("nan atol", "--atol must be a finite number >= 0"),
    ("negative rtol", "--rtol must be a finite number >= 0"),
    ("directory as model", "is a directory; give an ONNX file"),
    ("run dir as model", "export it first: deploytool export"),
    ("directory as data", "is a directory"),
])
def test_cli_verify_bad_input_is_one_line_exit_2(cli, exported_onnx, trained_run, tmp_path, case, match):
    model, args = exported_onnx, ["--checkpoint", trained_run.path]
    if case == "missing model":
        model = tmp_path / "nope.onnx"
    elif case == "not onnx":
        model = tmp_path / "notes.onnx"
        model.write_text("these are my notes, not a model\n" * 20)
    elif case == "truncated onnx":
        model = tmp_path / "cut.onnx"
        model.write_bytes(exported_onnx.read_bytes()[: exported_onnx.stat().st_size // 2])
    elif case == "pickled checkpoint":
        args = ["--checkpoint", _pickled_run(trained_run.path, tmp_path)]
    elif case == "checkpoint shapes":
        args = ["--checkpoint", _mismatched_run(trained_run.path, tmp_path)]
    elif case == "checkpoint of another model":
        args = ["--checkpoint", _other_model_run(trained_run.path, tmp_path)]
    elif case == "feature mismatch":
        args += ["--data", _npz(tmp_path)]
    elif case == "nan inputs":
        args += ["--data", _npz(tmp_path, features=64, nan=True)]
    elif case == "unknown backend":
        args += ["--backends", "torch,tflite"]
    elif case == "no checkpoint":
        args = []
    elif case == "same backend twice":
        args += ["--backends", "torch,torch"]
    elif case == "nan atol":
        args += ["--atol", "nan"]
    elif case == "negative rtol":
        args += ["--rtol", "-1"]
    elif case == "directory as model":
        model = tmp_path
    elif case == "run dir as model":
        model, args = trained_run.path, []
    elif case == "directory as data":
        args += ["--data", tmp_path]
    code, out, err = cli("verify", model, *args)
    assert_one_line_error(code, err, 2, match)
    assert out == ""
