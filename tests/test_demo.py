"""The demo runs the chain on this machine and reports every step, skipping what needs TensorRT."""

from __future__ import annotations

import json

from conftest import assert_one_line_error
from deploytool.machine import gpu


def test_demo_runs_the_chain_and_lists_skipped_steps_with_reasons(cli, tmp_path):
    code, out, err = cli("demo", "--out", tmp_path, "--json")
    assert code == 0, err
    result = json.loads(out)
    status = {s["step"]: s for s in result["steps"]}
    for step in ("train", "export", "verify", "bench", "package"):
        assert status[step]["status"] == "ok", status[step]
    assert result["key_numbers"]["routing_agreement_onnxruntime"] == 100.0
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "run" / "model.safetensors").is_file()
    config = (tmp_path / "triton" / "routed_model" / "config.pbtxt").read_text()
    assert 'name: "routed.router.index"' in config and 'name: "routed.router.probs"' in config
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert {(ln["backend"], ln["batch_size"]) for ln in bench["lines"]} == {
        (b, n) for b in ("torch", "onnxruntime") for n in (1, 256)}
    if gpu() is None:
        engine = status["build-engine"]
        assert engine["status"] == "skipped" and "TensorRT" in engine["detail"]
        assert not (tmp_path / "model.plan").exists()
        # no engine: nothing to verify or bench, and the ONNX model is what gets packaged
        assert [s["step"] for s in result["steps"]] == ["train", "export", "verify", "bench", "build-engine",
                                                        "package"]
        assert (tmp_path / "triton" / "routed_model" / "1" / "model.onnx").is_file()


def test_a_failed_check_is_reported_as_a_failed_step_and_exits_1(cli, tmp_path, monkeypatch, trained_run):
    import shutil

    import deploytool.parity
    import deploytool.training
    from deploytool.artifacts import load_run

    def train(recipe, out, **options):  # the session's run stands in for training: the check is what fails
        shutil.copytree(trained_run.path, out, dirs_exist_ok=True)
        return load_run(out)

    monkeypatch.setattr(deploytool.training, "train", train)

    class Failing:
        passed = False

        def failures(self):
            return ["onnxruntime vs torch: 3 routing flips at margin >= 0.1"]

    monkeypatch.setattr(deploytool.parity, "verify", lambda *a, **k: Failing())
    code, out, err = cli("demo", "--out", tmp_path, "--json")
    assert code == 1
    result = json.loads(out)
    assert not result["passed"]
    assert [(s["step"], s["status"]) for s in result["steps"]] == [
        ("train", "ok"), ("export", "ok"), ("verify", "failed")]
    assert "routing flips" in err and err.startswith("error: demo stopped at verify")


def test_demo_refuses_an_out_directory_that_holds_files_without_force(cli, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "model.onnx").write_bytes(b"someone's model")
    code, stdout, err = cli("demo", "--out", out)
    assert_one_line_error(code, err, 2, "is not empty")
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "notes.txt"]
    assert (out / "notes.txt").read_text() == "my notes" and (out / "model.onnx").read_bytes() == b"someone's model"
