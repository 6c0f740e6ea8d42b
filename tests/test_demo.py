"""The demo runs the chain on this machine and reports every step, skipping what needs TensorRT."""

from __future__ import annotations

import json

from deploytool.diagnostics import gpu


def test_demo_runs_the_chain_and_lists_skipped_steps_with_reasons(cli, tmp_path):
    code, out, err = cli("demo", "--out", tmp_path, "--json")
    assert code == 0, err
    result = json.loads(out)
    status = {s["step"]: s for s in result["steps"]}
    for step in ("train", "export", "verify", "bench", "package"):
        assert status[step]["status"] == "ok", status[step]
    assert result["key_numbers"]["routing_agreement"] == 100.0
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "run" / "model.safetensors").is_file()
    assert (tmp_path / "triton" / "routed_mlp" / "config.pbtxt").is_file()
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert {(ln["backend"], ln["batch_size"]) for ln in bench["lines"]} == {
        (b, n) for b in ("torch", "onnxruntime") for n in (1, 256)}
    if gpu() is None:
        engine = status["build-engine"]
        assert engine["status"] == "skipped" and "TensorRT" in engine["detail"]
        assert not (tmp_path / "model.plan").exists()


def test_a_failed_check_is_reported_as_a_failed_step_and_exits_1(cli, tmp_path, monkeypatch):
    import deploytool.parity

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
