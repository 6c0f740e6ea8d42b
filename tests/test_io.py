"""Atomic writes and the refusal to overwrite inputs: what keeps a user's files safe."""

from __future__ import annotations

import json
import os

import pytest

from deploytool import io
from deploytool.errors import BadInput


def test_an_output_equal_to_an_input_file_or_a_run_file_is_refused(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model")
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(BadInput, match="would replace the input"):
        io.refuse_overwrite(model, model)
    for name in io.RUN_FILES:
        with pytest.raises(BadInput, match="would replace the input"):
            io.refuse_overwrite(run / name, run)
    io.refuse_overwrite(run / "model.onnx", run, None)  # an export into the run directory is fine


def test_atomic_dir_replaces_a_directory_only_when_complete_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(RuntimeError):
        with io.atomic_dir(target) as tmp:
            (tmp / "new").write_text("new")
            raise RuntimeError("failed halfway")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (target / "old").read_text() == "old"
    with io.atomic_dir(target) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and [p.name for p in target.iterdir()] == ["new"]


def test_atomic_dir_of_the_current_directory_name_uses_its_real_name(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with io.atomic_dir("") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".work.")
        (tmp / "f").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["work"]


def test_atomic_dir_without_replace_keeps_what_another_process_wrote_meanwhile(tmp_path):
    target = tmp_path / "run"
    with pytest.raises(BadInput, match="written by another process meanwhile"):
        with io.atomic_dir(target, replace=False) as tmp:
            (tmp / "mine").write_text("mine")
            target.mkdir()
            (target / "theirs").write_text("theirs")
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_failed_swap_leaves_no_hidden_directory_and_the_old_one_whole(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    real = os.replace

    def refuse_moving_the_target(src, dst):  # as a read-only parent directory does
        if os.fspath(src) == os.fspath(target):
            raise PermissionError(13, "Permission denied")
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", refuse_moving_the_target)
    with pytest.raises(PermissionError):
        with io.atomic_dir(target) as tmp:
            (tmp / "new").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "old").read_text() == "old"


def test_json_has_no_bare_nan_or_infinity():
    text = io.dumps_json({"a": float("nan"), "b": [float("inf"), 1.5]})
    assert json.loads(text) == {"a": None, "b": [None, 1.5]}
