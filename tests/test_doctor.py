"""doctor: machine report, command availability, and whether an engine will load here."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from deploytool import diagnostics
from deploytool.cli.app import main
from deploytool.engine.manifest import load_problems
from deploytool.artifacts import manifest_path

BUILT = {"tensorrt": "10.9.0", "compute_capability": "9.0", "gpu": "NVIDIA H100", "op_path": "plugin",
         "io": {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 64]}],
                "outputs": [{"name": "index", "dtype": "int64", "shape": [-1]}]},
         "profile": {"x": {"min": [1, 64], "opt": [64, 64], "max": [1024, 64]}}}


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_engine_loads_only_under_the_same_tensorrt_and_compute_capability():
    assert load_problems(BUILT, {"tensorrt": "10.9.0", "compute_capability": "9.0"}) == []
    (trt_problem,) = load_problems(BUILT, {"tensorrt": "10.13.1", "compute_capability": "9.0"})
    assert "TensorRT 10.9.0" in trt_problem and "10.13.1" in trt_problem
    (cc_problem,) = load_problems(BUILT, {"tensorrt": "10.9.0", "compute_capability": "8.6", "gpu": "A10"})
    assert "compute capability 9.0" in cc_problem and "8.6" in cc_problem
    assert len(load_problems(BUILT, {"tensorrt": None, "compute_capability": None})) == 2


def test_doctor_without_tensorrt_says_which_commands_fail_and_how_to_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as on a machine without it
    monkeypatch.setattr(diagnostics, "gpu", lambda: None)
    report = diagnostics.doctor()
    assert report["tensorrt"]["version"] is None and report["gpu"] is None
    assert report["onnxruntime"]["version"] and "CPUExecutionProvider" in report["onnxruntime"]["providers"]
    build = report["commands"]["build-engine (plugin path)"]
    assert not build["works"] and {"tensorrt", "gpu"} <= set(build["missing"])
    assert 'pip install "deploytool[tensorrt]"' in build["hint"]
    assert report["commands"]["build-engine --dry-run"]["works"]
    backends = _backend_rows(report)
    assert backends["torch"]["works"] and backends["onnxruntime"]["works"]  # verify / bench on the CPU
    assert not backends["tensorrt"]["works"] and {"tensorrt", "gpu"} <= set(backends["tensorrt"]["missing"])


def _backend_rows(report: dict) -> dict:
    """The commands rows of the registry's backends, by backend name."""
    rows = {}
    for command, row in report["commands"].items():
        if command.startswith("--backends "):
            rows[command.split()[1]] = row
    return rows


def test_doctor_lists_every_backend_of_the_registry_with_whether_it_works_here(monkeypatch, capsys):
    from deploytool.runners import BACKENDS

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(diagnostics, "gpu", lambda: None)
    monkeypatch.setattr(diagnostics, "_onnxruntime", lambda: {"version": "1.20", "providers": ["CPUExecutionProvider"]})
    backends = _backend_rows(diagnostics.doctor())
    assert list(backends) == list(BACKENDS)  # every backend, onnxruntime-cuda included, in registry order
    cuda = backends["onnxruntime-cuda"]
    assert not cuda["works"] and {"onnxruntime-cuda", "gpu"} <= set(cuda["missing"]) and "onnxruntime-gpu" in cuda["hint"]
    assert backends["onnxruntime"]["works"] and not backends["tensorrt"]["works"]

    # a GPU machine with onnxruntime-gpu: the CUDA provider works, TensorRT still is not installed
    monkeypatch.setattr(diagnostics, "gpu", lambda: {"name": "NVIDIA H100", "compute_capability": "9.0"})
    monkeypatch.setattr(diagnostics, "_onnxruntime", lambda: {
        "version": "1.20", "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]})
    backends = _backend_rows(diagnostics.doctor())
    assert backends["onnxruntime-cuda"]["works"] and backends["onnxruntime-cuda"]["missing"] == []
    assert backends["tensorrt"]["missing"] == ["tensorrt"]

    code, out, _ = _run(["doctor"], capsys)  # the table shows each of them, with yes/no
    assert code in (0, None)
    text = " ".join(out.split())
    for name in BACKENDS:
        assert f"--backends {name} (" in text, name


def test_package_needs_tritonclient_for_the_schema_check(monkeypatch):
    real = diagnostics._version
    monkeypatch.setattr(diagnostics, "_version", lambda dist: None if dist == "tritonclient" else real(dist))
    package = diagnostics.doctor()["commands"]["package"]
    assert not package["works"] and package["missing"] == ["tritonclient"]


def test_doctor_without_tensorrt_shows_plugins_need_it_and_lists_every_command(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    code, out, _ = _run(["doctor"], capsys)
    assert code in (0, None)
    plugins_row = next(line for line in out.splitlines() if "deploytool plugins" in line)
    assert "needs TensorRT" in plugins_row and "{}" not in plugins_row
    commands = diagnostics.doctor()["commands"]
    assert {"train", "export", "package", "serve", "demo"} <= set(commands)
    for name in ("package", "serve", "demo"):
        assert any(line.lstrip("│ ").startswith(name) for line in out.splitlines()), name


def test_doctor_cli_json_is_machine_readable(capsys):
    code, out, _ = _run(["doctor", "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert {"python", "torch", "gpu", "onnxruntime", "tensorrt", "triton", "commands"} <= set(report)


def test_doctor_engine_check_says_why_it_will_not_load(tmp_path, capsys, monkeypatch):
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"engine bytes")
    manifest_path(engine).write_text(json.dumps(BUILT))
    monkeypatch.setattr(diagnostics, "describe_machine",
                        lambda: {"tensorrt": "10.9.0", "compute_capability": "8.9", "gpu": "L4", "cuda": "12.4"})
    code, out, _ = _run(["doctor", "--engine", str(engine), "--json"], capsys)
    assert code == 1
    verdict = json.loads(out)["engine"]
    assert not verdict["will_load"] and "compute capability 9.0" in verdict["problems"][0]
    assert verdict["built"]["tensorrt"] == "10.9.0" and "embedded" in verdict["plugin"]


def test_doctor_engine_without_manifest_is_bad_input(tmp_path, capsys):
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"engine bytes")
    code, _, err = _run(["doctor", "--engine", str(engine)], capsys)
    assert code == 2 and "no manifest" in err and err.count("\n") == 1


@pytest.mark.parametrize("profile", [None, {"x": {"min": [1, 64], "opt": [64, 64]}}, {"x": {"max": "1024"}}],
                         ids=["none", "no-max", "text-max"])
def test_doctor_engine_with_a_malformed_profile_is_bad_input(tmp_path, capsys, profile):
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"engine bytes")
    manifest_path(engine).write_text(json.dumps({**BUILT, "profile": profile}))
    code, _, err = _run(["doctor", "--engine", str(engine)], capsys)
    assert code == 2 and "not a deploytool engine manifest" in err and err.count("\n") == 1, err


def test_doctor_says_whether_hugging_face_models_can_be_taken_and_what_to_install():
    from deploytool.deps import install_hint
    from deploytool.diagnostics import doctor

    row = doctor()["commands"]["Hugging Face MoE models (from_hf, save_pretrained folders)"]
    assert row["works"] == (importlib.util.find_spec("transformers") is not None)
    assert install_hint("transformers") == 'pip install "deploytool[hf]" (Hugging Face MoE models)'
