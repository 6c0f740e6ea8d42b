"""A run directory's config.json is read once per command; an ONNX model is parsed by the onnx package at
most once (package), or not at all (load).

Every config.json read goes through `io.read_json` (artifacts.read_config is the one caller that reads a
folder's), so counting its calls on a config.json counts every read, whoever makes it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from deploytool import artifacts, io


@pytest.fixture
def config_reads(monkeypatch):
    """The config.json files read, one entry per read, while the test runs."""
    seen: list[Path] = []
    real = io.read_json

    def counting(path, what="JSON file"):
        if Path(path).name == io.CONFIG_FILE:
            seen.append(Path(path).parent.resolve())
        return real(path, what)

    monkeypatch.setattr(io, "read_json", counting)
    return seen


@pytest.fixture
def onnx_parses(monkeypatch):
    """The ONNX files parsed with the onnx package (artifacts.load_onnx), one entry per parse."""
    seen: list[Path] = []
    real = artifacts.load_onnx

    def counting(path):
        seen.append(Path(path))
        return real(path)

    monkeypatch.setattr(artifacts, "load_onnx", counting)
    return seen


def test_verify_reads_the_checkpoint_run_once(exported_onnx, trained_run, config_reads):
    from deploytool.parity import verify

    assert verify(exported_onnx, checkpoint=trained_run.path, samples=8).passed
    assert config_reads == [trained_run.path.resolve()]


def test_verify_reads_the_run_the_export_records_once(exported_onnx, trained_run, config_reads):
    from deploytool.parity import verify

    verify(exported_onnx, checkpoint=trained_run.path / io.WEIGHTS_FILE, samples=8)
    assert config_reads == [trained_run.path.resolve()]


def test_bench_of_a_run_reads_it_once(trained_run, config_reads):
    from deploytool import bench

    bench(trained_run.path, backends=["torch-dense", "torch-sparse"], batch_sizes=[4], warmup_ms=1,
          duration_s=0.01, min_iters=1, progress=False)
    assert config_reads == [trained_run.path.resolve()]


def test_bench_of_an_onnx_model_with_its_checkpoint_reads_the_run_once(exported_onnx, trained_run, config_reads):
    from deploytool import bench

    bench(exported_onnx, checkpoint=trained_run.path, backends=["torch", "onnxruntime"], batch_sizes=[4],
          warmup_ms=1, duration_s=0.01, min_iters=1, progress=False)
    assert config_reads == [trained_run.path.resolve()]


def test_load_of_a_run_reads_it_once(trained_run, config_reads):
    import deploytool

    with deploytool.load(trained_run.path) as session:
        assert session.signature.routers
    assert config_reads == [trained_run.path.resolve()]


def test_load_of_an_onnx_model_reads_no_run_and_parses_nothing_with_onnx(exported_onnx, config_reads, onnx_parses):
    import deploytool

    with deploytool.load(exported_onnx) as session:
        assert session.signature.routers
    assert config_reads == [] and onnx_parses == []


def test_package_of_a_run_reads_it_once(trained_run, tmp_path, config_reads):
    from deploytool.serving.repository import package

    pytest.importorskip("tritonclient")
    package(trained_run.path, tmp_path / "repo", "run", max_batch=8)
    assert config_reads == [trained_run.path.resolve()]


def test_package_of_an_onnx_model_parses_it_once(exported_onnx, tmp_path, config_reads, onnx_parses):
    from deploytool.serving.repository import package

    pytest.importorskip("tritonclient")
    package(exported_onnx, tmp_path / "repo", "m", max_batch=8)
    assert onnx_parses == [exported_onnx] and config_reads == []


def test_commit_reads_its_run_once(tmp_path, config_reads):
    import deploytool
    from deploytool.finetune import CommitSettings

    soft = deploytool.train(deploytool.TrainConfig(epochs=1, expert_hidden=8), tmp_path / "soft", progress=False)
    config_reads.clear()
    deploytool.commit(soft.path, out=tmp_path / "c", settings=CommitSettings(model_epochs=1), progress=False)
    assert config_reads == [soft.path.resolve()]


def test_report_reads_its_run_once(trained_run, config_reads):
    from deploytool.metrics import report

    assert report(trained_run.path)["config"] == trained_run.config
    assert config_reads == [trained_run.path.resolve()]


def test_open_module_of_a_run_already_read_reads_nothing(trained_run, config_reads):
    from deploytool.checkpoints import open_module

    run = artifacts.run_or_hf_folder(trained_run.path)
    assert config_reads == [trained_run.path.resolve()]
    source = open_module(run)
    assert source.run_config == trained_run.config and len(config_reads) == 1
