"""`deploytool build-engine` from the command line: dry run, missing TensorRT, bad options."""

from __future__ import annotations

import json
import sys
import types

import pytest
from onnx_models import write_routing_model

from deploytool.cli.app import main


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.fixture
def model(tmp_path):
    return write_routing_model(tmp_path / "model.onnx")


def test_dry_run_prints_the_plan_as_json_and_writes_nothing(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # the dry run must not need TensorRT
    code, out, _ = _run(["build-engine", str(model), "--out", str(tmp_path / "model.plan"), "--precision", "fp16",
                         "--min-batch", "1", "--opt-batch", "8", "--max-batch", "64", "--no-plugin", "--dry-run"],
                        capsys)
    assert code == 0
    plan = json.loads(out)
    assert plan["precision"] == "fp16" and plan["lower_to"] == "fp16" and plan["op_path"] == "local-function"
    assert plan["profile"]["x"] == {"min": [1, 16], "opt": [8, 16], "max": [64, 16]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_missing_tensorrt_exits_3_with_one_line_and_writes_no_file(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    code, out, err = _run(["build-engine", str(model), "--out", str(tmp_path / "model.plan")], capsys)
    assert code == 3
    assert err.startswith("error: build-engine needs TensorRT") and err.count("\n") == 1
    assert 'pip install "deploytool[tensorrt]"' in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("version, gpu, expected", [
    ("10.9.0", None, "needs an NVIDIA GPU"),       # TensorRT present, no GPU
    ("10.7.0", {"name": "H100", "compute_capability": "9.0"}, "TensorRT 10.7.0 is too old"),
])
def test_missing_gpu_or_old_tensorrt_exits_3_and_writes_no_file(model, tmp_path, capsys, monkeypatch,
                                                                version, gpu, expected):
    from deploytool import machine

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version))
    monkeypatch.setattr(machine, "gpu", lambda: gpu)
    code, _, err = _run(["build-engine", str(model), "--out", str(tmp_path / "model.plan"),
                         "--timing-cache", str(tmp_path / "timing.cache")], capsys)
    assert code == 3 and expected in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_timing_cache_in_a_missing_directory_is_refused_before_building(model, tmp_path, capsys):
    code, _, err = _run(["build-engine", str(model), "--out", str(tmp_path / "model.plan"),
                         "--timing-cache", str(tmp_path / "nope" / "timing.cache")], capsys)
    assert code == 2 and "does not exist" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("option, value, match", [
    ("--timing-cache", "emptydir", "output path emptydir is a directory"),
    ("--timing-cache", "nodir/tc.bin", "output directory nodir does not exist"),
    ("--out", "nodir/m.plan", "output directory nodir does not exist"),
    ("--out", "emptydir", "output path emptydir is a directory"),
])
def test_dry_run_applies_the_builds_path_checks(model, tmp_path, capsys, monkeypatch, option, value, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "emptydir").mkdir()
    code, out, err = _run(["build-engine", str(model), "--dry-run", option, value], capsys)
    assert code == 2 and err.startswith("error: " + match) and err.count("\n") == 1, err
    assert out == ""


def test_dry_run_of_an_empty_onnx_file_says_it_is_not_an_onnx_model(tmp_path, capsys):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    code, _, err = _run(["build-engine", str(empty), "--dry-run"], capsys)
    assert code == 2 and "not an ONNX model (or is truncated)" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("version, flags, expected", [
    ("10.9.0", {"STRONGLY_TYPED": 1}, 1 << 1),
    ("11.0.0", {}, 0),  # TensorRT 11 types every network strongly; the flag may be gone
])
def test_network_flags_become_a_bit_mask(version, flags, expected):
    from deploytool.engine.build import _network_flags

    trt = types.SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=types.SimpleNamespace(**flags))
    assert _network_flags(trt, ["STRONGLY_TYPED"]) == expected


def test_bad_batch_profile_exits_2_before_anything_else(model, tmp_path, capsys):
    code, _, err = _run(["build-engine", str(model), "--out", str(tmp_path / "model.plan"),
                         "--min-batch", "16", "--opt-batch", "4"], capsys)
    assert code == 2 and "min <= opt <= max" in err and err.count("\n") == 1


def test_build_without_out_exits_2(model, capsys):
    code, _, err = _run(["build-engine", str(model)], capsys)
    assert code == 2 and "--out" in err


@pytest.mark.tensorrt
@pytest.mark.parametrize("plugin", [True, False])
def test_build_writes_engine_and_manifest_and_reports_the_op_path(model, tmp_path, capsys, plugin):
    engine = tmp_path / "model.plan"
    code, out, _ = _run(["build-engine", str(model), "--out", str(engine), "--max-batch", "64", "--json",
                         "--plugin" if plugin else "--no-plugin"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["op_path"] == ("plugin" if plugin else "local-function")
    manifest = json.loads((tmp_path / "model.plan.json").read_text())
    assert engine.stat().st_size > 0 and manifest["op_path"] == result["op_path"]
    assert manifest["compute_capability"] and manifest["tensorrt"]
    if plugin:
        ptx = manifest["embedded_ptx_sha256"]
        assert set(ptx) == {"deploytool::TemperedSoftmax", "deploytool::HardSelect"}
        assert list(ptx["deploytool::HardSelect"]) == ["float32->float32,int64"]
        assert list(ptx["deploytool::TemperedSoftmax"]) == ["float32->float32"]


@pytest.mark.parametrize("name", ["other.onnx", "model", "model.plan.json"])
def test_out_without_an_engine_suffix_is_refused_even_in_a_dry_run(model, tmp_path, capsys, name):
    code, out, err = _run(["build-engine", str(model), "--dry-run", "--out", str(tmp_path / name)], capsys)
    assert code == 2 and "not an engine file name" in err and ".plan" in err and err.count("\n") == 1, err
    assert out == ""


def test_upper_case_engine_suffix_is_accepted(model, tmp_path, capsys):
    code, _, err = _run(["build-engine", str(model), "--dry-run", "--out", str(tmp_path / "MODEL.PLAN")], capsys)
    assert code == 0, err


def test_a_failed_engine_write_leaves_the_old_engine_and_its_manifest_together(tmp_path, monkeypatch):
    from deploytool import io
    from deploytool.engine.build import write_engine
    from deploytool.artifacts import manifest_path

    engine = tmp_path / "model.plan"
    write_engine(engine, b"old engine", {"build": "old"})
    real_replace = io.os.replace

    def replace(src, dst):
        if str(dst) == str(engine):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        write_engine(engine, b"new engine", {"build": "new"})
    assert engine.read_bytes() == b"old engine"
    assert json.loads(manifest_path(engine).read_text()) == {"build": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.plan", "model.plan.json"]


@pytest.mark.parametrize("option", ["--out", "--timing-cache"])
def test_an_engine_or_timing_cache_onto_the_model_is_refused_and_the_model_is_unchanged(model, tmp_path, capsys,
                                                                                       option):
    before = model.read_bytes()
    extra = ["--out", str(tmp_path / "model.plan")] if option == "--timing-cache" else []
    code, out, err = _run(["build-engine", str(model), "--dry-run", *extra, option, str(model)], capsys)
    assert code == 2 and "would replace the input" in err and err.count("\n") == 1, err
    assert model.read_bytes() == before and out == ""


@pytest.mark.parametrize("name", ["routing.png", "model.onnx", "bench.json", "model.safetensors"])
def test_a_timing_cache_named_like_another_kind_of_file_is_exit_2_and_left_alone(model, tmp_path, capsys, name):
    run = tmp_path / "run"
    run.mkdir()
    (run / name).write_bytes(b"not a timing cache")
    code, out, err = _run(["build-engine", str(model), "--out", str(tmp_path / "m.plan"), "--timing-cache",
                           str(run / name)], capsys)
    assert code == 2 and "names another kind of file" in err and err.count("\n") == 1, err
    assert (run / name).read_bytes() == b"not a timing cache" and not (tmp_path / "m.plan").exists()


@pytest.fixture
def token_model(tmp_path):
    """x [batch, tokens, 4] with two token-level routers; the export example was 7 tokens long."""
    from onnx_models import token_onnx

    return token_onnx(tmp_path / "tokens.onnx")


def test_dry_run_profiles_a_dynamic_tokens_dim_over_the_given_range(token_model, capsys):
    code, out, err = _run(["build-engine", str(token_model), "--dry-run", "--opt-batch", "8", "--max-batch", "32",
                           "--dim", "tokens=1:8:64"], capsys)
    assert code == 0, err
    plan = json.loads(out)
    assert plan["profile"] == {"x": {"min": [1, 1, 4], "opt": [8, 8, 4], "max": [32, 64, 4]}}
    assert [r["path"] for r in json.loads(plan["signature"])["routers"]] == ["layers.0.moe.router",
                                                                             "layers.1.moe.router"]


def test_dry_run_without_a_dim_range_fixes_it_at_the_export_examples_size(token_model, capsys):
    code, out, err = _run(["build-engine", str(token_model), "--dry-run", "--opt-batch", "8", "--max-batch", "32"],
                          capsys)
    assert code == 0, err
    assert json.loads(out)["profile"] == {"x": {"min": [1, 7, 4], "opt": [8, 7, 4], "max": [32, 7, 4]}}


@pytest.mark.parametrize("value, match", [
    ("tokens=1:8", "give NAME=MIN:OPT:MAX"),
    ("tokens=a:b:c", "give NAME=MIN:OPT:MAX"),
    ("=1:8:64", "give NAME=MIN:OPT:MAX"),
    ("tokens", "give NAME=MIN:OPT:MAX"),
    ("tokens=1:-8:64", "give NAME=MIN:OPT:MAX"),
    ("tokens=16:8:64", "min <= opt <= max"),
    ("tokens=0:8:64", "min <= opt <= max"),
    ("token=1:8:64", "no dynamic dim 'token' besides the batch; its dynamic dims are tokens"),
    ("batch=1:8:64", "no dynamic dim 'batch'"),  # the batch's range is --min/--opt/--max-batch
])
def test_a_malformed_dim_is_one_line_exit_2(token_model, capsys, value, match):
    code, out, err = _run(["build-engine", str(token_model), "--dry-run", "--dim", value], capsys)
    assert code == 2 and match in err and err.startswith("error:") and err.count("\n") == 1, err
    assert out == ""
