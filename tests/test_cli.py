"""The CLI as a user meets it: light --help, JSON output, and one-line errors with exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import assert_one_line_error


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["export", "--help"], ["verify", "--help"],
                                  ["bench", "--help"], ["build-engine", "--help"], ["doctor", "--help"]])
def test_help_does_not_import_torch(argv):
    code = ("import sys\nfrom deploytool.cli.app import main\ntry:\n    main(%r)\nexcept SystemExit as e:\n"
            "    assert e.code in (0, None), e.code\nheavy = [m for m in ('torch', 'onnxruntime', 'onnx', 'tensorrt', "
            "'triton', 'sklearn', 'matplotlib') if m in sys.modules]\nassert not heavy, heavy\n" % argv)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_train_json_reports_the_routing_metrics(cli, tmp_path):
    code, out, err = cli("train", "--epochs", "2", "--out", tmp_path / "run", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["metrics"]["epochs"] == 2
    assert {"hard_accuracy", "soft_accuracy", "frac_confident", "expert_load"} <= set(result["metrics"])


def test_report_shows_a_trained_run(cli, trained_run):
    code, out, err = cli("report", trained_run.path)
    assert code == 0, err
    assert "hard_accuracy" in out and "routing.png" in out
    code, out, _ = cli("report", trained_run.path, "--json")
    assert json.loads(out)["metrics"]["seed"] == 0


@pytest.mark.parametrize("args, match", [
    (["--experts", "1"], "always says 'class 0'"),
    (["--temperature", "0"], "temperature"),
    (["--temperature", "nan"], "temperature"),
    (["--alpha", "-1"], "alpha"),
    (["--model", "resnet"], "unknown model"),
    (["--dataset", "mnist"], "unknown data set"),
    (["--recipe", "no-such-recipe.toml"], "does not exist"),
    (["--penalty", "l2"], "unknown penalty"),
])
def test_train_bad_input_is_one_line_exit_2(cli, tmp_path, args, match):
    code, _, err = cli("train", *args, "--epochs", "1", "--out", tmp_path / "run")
    assert_one_line_error(code, err, 2, match)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_malformed_recipe_is_one_line_exit_2(cli, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[train\nexperts = 4")
    code, _, err = cli("train", "--recipe", recipe, "--out", tmp_path / "run")
    assert_one_line_error(code, err, 2, "not valid TOML")


def test_pickled_npz_is_one_line_exit_2(cli, tmp_path):
    import numpy as np

    data = tmp_path / "d.npz"
    np.savez(data, x=np.array([object()] * 20, dtype=object), y=np.zeros(20, int))
    code, _, err = cli("train", "--dataset", data, "--epochs", "1", "--out", tmp_path / "run")
    assert_one_line_error(code, err, 2, "pickled")


def test_output_dir_that_is_a_file_is_one_line_exit_2(cli, tmp_path):
    target = tmp_path / "f"
    target.write_text("x")
    code, _, err = cli("train", "--epochs", "1", "--out", target)
    assert_one_line_error(code, err, 2, "is a file")


def test_report_of_a_missing_run_is_one_line_exit_2(cli, tmp_path):
    code, _, err = cli("report", tmp_path / "nope")
    assert_one_line_error(code, err, 2, "does not exist")


def test_version(cli):
    code, out, _ = cli("--version")
    assert code == 0 and out.startswith("deploytool ")


@pytest.mark.parametrize("args, match", [
    (["train", "--experts", "abc"], "Invalid value for '--experts'"),
    (["train", "--nope"], "No such option: --nope"),
    (["study", "--seeds", "0"], "--seeds"),
    (["export"], "Missing argument"),
])
def test_usage_errors_are_one_line_exit_2(cli, args, match):
    code, _, err = cli(*args)
    assert_one_line_error(code, err, 2, match)
    assert "--help" in err


def test_report_of_a_broken_metrics_file_is_exit_2(cli, trained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run.path, run)
    (run / "metrics.json").write_text("[1, 2]")
    code, _, err = cli("report", run)
    assert_one_line_error(code, err, 2, "not a deploytool metrics file")


def test_train_refuses_a_non_empty_out_dir_without_force(cli, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = cli("train", "--epochs", "1", "--out", tmp_path)
    assert_one_line_error(code, err, 2, "not empty")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _no_heavy_imports(script: str, heavy=("torch", "tensorrt", "triton", "sklearn", "matplotlib")) -> None:
    code = script + f"\nimport sys\nheavy = [m for m in {heavy!r} if m in sys.modules]\nassert not heavy, heavy\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_console_script_help_imports_no_torch():
    from pathlib import Path

    script = Path(sys.executable).with_name("deploytool")  # the entry point pip installed beside this python
    if not script.is_file():
        pytest.skip("deploytool is not installed as a console script here")
    script = str(script)
    code = ("import runpy, sys\nsys.argv = [%r, '--help']\ntry:\n    runpy.run_path(%r, run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n" % (script, script))
    _no_heavy_imports(code, heavy=("torch", "onnxruntime", "onnx", "tensorrt", "triton", "sklearn", "matplotlib"))


def test_loading_and_running_an_onnx_model_imports_no_torch(exported_onnx):
    _no_heavy_imports(
        "import numpy as np\nimport deploytool\n"
        f"with deploytool.load({str(exported_onnx)!r}) as s:\n"
        "    out = s.run(np.ones((3, 64), np.float32))\n"
        "assert list(out) == ['output', 'routed.router.index', 'routed.router.probs'], list(out)\n"
        "assert out['routed.router.index'].shape == (3,)\n")


def test_loading_a_multi_input_onnx_model_and_running_it_by_name_imports_no_torch(image_export):
    _no_heavy_imports(
        "import numpy as np\nimport deploytool\n"
        f"s = deploytool.load({str(image_export.path)!r})\n"
        "out = s.run({'img': np.ones((2, 1, 8, 8), np.float32), 'meta': np.ones((2, 3), np.float32)})\n"
        "assert out['gate.router.index'].shape == (2,) and out['output_0'].shape == (2, 5)\n"
        "try:\n    s.run(np.ones((2, 1, 8, 8), np.float32))\nexcept deploytool.errors.BadInput as e:\n"
        "    assert 'takes 2 inputs' in str(e)\nelse:\n    raise AssertionError('a lone array was accepted')\n")


def test_an_internal_error_is_one_line_exit_70_asking_for_debug(cli, monkeypatch, trained_run):
    import deploytool.metrics

    def broken(run_dir, **_options):  # report takes options for a Hugging Face folder
        raise KeyError("boom")

    monkeypatch.setattr(deploytool.metrics, "report", broken)
    code, _, err = cli("report", trained_run.path)
    lines = err.strip().splitlines()
    assert code == 70 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("internal error: KeyError: 'boom'") and "--debug" in lines[0]
    monkeypatch.setenv("DEPLOYTOOL_DEBUG", "0")  # --debug sets it to 1 for the process: restored afterwards
    with pytest.raises(KeyError, match="boom"):  # --debug shows the traceback instead
        cli("--debug", "report", trained_run.path)
