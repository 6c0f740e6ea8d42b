"""What a new user's bad-input hunt found on 2026-11-29, each a one-line error with the right exit code,
nothing written where it must not be."""

from __future__ import annotations

import numpy as np
import pytest

import deploytool
from conftest import assert_one_line_error
from deploytool.errors import BadInput


def test_ctrl_c_prints_interrupted_and_exits_130(cli, monkeypatch):
    from deploytool import diagnostics

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(diagnostics, "doctor", interrupted)
    code, _, err = cli("doctor")
    assert code == 130 and err.strip() == "interrupted"


def test_debug_is_accepted_after_the_command_as_the_error_line_suggests(cli, monkeypatch):
    monkeypatch.setenv("DEPLOYTOOL_DEBUG", "0")  # restored afterwards: --debug sets it for the process
    code, out, err = cli("doctor", "--json", "--debug")
    assert code == 0 and '"commands"' in out, err


def test_a_dim_the_model_fixes_cannot_be_exported_as_dynamic(cli, trained_run, tmp_path):
    code, _, err = cli("export", trained_run.path, "--out", tmp_path / "m.onnx", "--dynamic", "x:1=features",
                       "--no-validate")
    assert_one_line_error(code, err, 2, "dim 1 cannot be dynamic")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, match", [
    (["--instances", "1000000000000"], "instances must be between 1 and 1024"),
    (["--max-queue-delay-us", "-5"], "max queue delay must be between 0"),
])
def test_package_bounds_what_triton_would_reject(cli, exported_onnx, tmp_path, args, match):
    code, _, err = cli("package", exported_onnx, "--repository", tmp_path / "repo", "--name", "m", *args)
    assert_one_line_error(code, err, 2, match)
    assert not (tmp_path / "repo" / "m").exists()


def test_package_refuses_a_repository_inside_a_run(cli, exported_onnx, trained_run):
    code, _, err = cli("package", exported_onnx, "--repository", trained_run.path, "--name", "m")
    assert_one_line_error(code, err, 2, "is inside the run directory")
    assert not (trained_run.path / "m").exists()


@pytest.mark.parametrize("args, match", [
    (["--duration-s", "1e12"], "duration_s must be a number > 0 and at most 600"),
    (["--plot", "latency.txt"], "must end in .png"),
    (["--json", "report.png"], "must end in .json"),
])
def test_bench_refuses_absurd_durations_and_misnamed_outputs(cli, exported_onnx, tmp_path, args, match):
    code, _, err = cli("bench", exported_onnx, "--backends", "onnxruntime", "--batch-sizes", "1", *args)
    assert_one_line_error(code, err, 2, match)


def test_build_engine_plan_bounds_the_workspace_and_the_profile(cli, exported_onnx):
    code, _, err = cli("build-engine", exported_onnx, "--dry-run", "--workspace", "1000000000000")
    assert_one_line_error(code, err, 2, "workspace must be a whole number of MiB from 1 to")
    code, _, err = cli("build-engine", exported_onnx, "--dry-run", "--max-batch", "1000000000000")
    assert_one_line_error(code, err, 2, "max batch must be a whole number from 1 to")


def test_train_refuses_a_seed_beyond_32_bits_in_its_own_words(cli, tmp_path):
    code, _, err = cli("train", "--seed", str(2 ** 40), "--epochs", "1", "--out", tmp_path / "run")
    assert_one_line_error(code, err, 2, "seed must be a whole number from 0 to 4294967295")


def test_commit_refuses_an_output_inside_its_input_run(cli, trained_run):
    code, _, err = cli("commit", trained_run.path, "--out", trained_run.path / "sub")
    assert_one_line_error(code, err, 2, "not over or inside its input run")
    assert not (trained_run.path / "sub").exists()


def test_demo_with_a_bad_recipe_creates_nothing(cli, tmp_path):
    code, _, err = cli("demo", "--recipe", "bogus", "--out", tmp_path / "new dir" / "a" / "b", "-q")
    assert_one_line_error(code, err, 2, "recipe bogus does not exist")
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_that_is_neither_a_run_nor_weights_is_named(cli, exported_onnx):
    code, _, err = cli("verify", exported_onnx, "--checkpoint", exported_onnx)
    assert_one_line_error(code, err, 2, "is neither a run directory nor its .safetensors weights")


def test_doctor_says_an_onnx_model_is_not_an_engine(cli, exported_onnx):
    code, _, err = cli("doctor", "--engine", exported_onnx)
    assert_one_line_error(code, err, 2, "is not a TensorRT engine")


def test_an_unwritable_output_names_the_file_not_a_temporary_one(cli, trained_run):
    code, _, err = cli("export", trained_run.path, "--out", "/proc/x.onnx", "--no-validate")
    assert_one_line_error(code, err, 2, "cannot write /proc/x.onnx")


def test_load_takes_paths_and_refuses_feeds_larger_than_a_call_may_hold(exported_onnx):
    with pytest.raises(BadInput, match="takes the path"):
        deploytool.load(123)
    with deploytool.load(exported_onnx) as session:
        with pytest.raises(BadInput, match="GiB; one call takes at most"):
            session.run(np.broadcast_to(np.float32(0), (10 ** 8, 64)))


def test_study_refuses_an_output_that_is_no_markdown_file_before_training(cli, tmp_path, monkeypatch):
    from deploytool import training

    monkeypatch.setattr(training, "training_loop", lambda *a, **k: pytest.fail("trained before checking --out"))
    code, _, err = cli("study", "--out", tmp_path / "m.onnx", "--seeds", "1")
    assert_one_line_error(code, err, 2, "must end in .md")
    binary = tmp_path / "notes.md"
    binary.write_bytes(b"\xf5\x00\xff")
    code, _, err = cli("study", "--out", binary, "--seeds", "1")
    assert_one_line_error(code, err, 2, "is not a text (markdown) file")
    assert binary.read_bytes() == b"\xf5\x00\xff"


def test_bench_of_several_targets_needs_a_backend_that_reads_them(cli, exported_onnx, tmp_path):
    import shutil

    other = tmp_path / "copy.onnx"
    shutil.copyfile(exported_onnx, other)
    code, _, err = cli("bench", exported_onnx, other, "--backends", "torch", "--batch-sizes", "1")
    assert_one_line_error(code, err, 2, "add onnxruntime or tensorrt")
