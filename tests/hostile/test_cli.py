"""Hostile input through the CLI: one `error:` line and the documented exit code (items 12-15 of issue 18)."""

from __future__ import annotations

import os
import signal

import pytest

from conftest import assert_one_line_error

from .conftest import edit_signature

NESTED = "[" * 100_000


# --- 12. symlink loops: one line, exit 2, in every command ----------------------------------------------------

@pytest.mark.parametrize("command", [["bench", "--backends", "onnxruntime"], ["report"], ["export", "--out", "x.onnx"]])
def test_a_symlink_loop_target_is_one_line_exit_2(cli, loop, command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(command[0], loop, *command[1:])
    assert_one_line_error(code, err, 2, "")
    assert "symlink loop" in err.lower()


# --- 13. deeply nested JSON -----------------------------------------------------------------------------------

def test_deeply_nested_config_json_is_one_line_exit_2_in_report(cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(NESTED)
    code, _, err = cli("report", run)
    assert_one_line_error(code, err, 2, "nests lists or objects")


def test_deeply_nested_signature_is_one_line_exit_2_in_verify_and_package(cli, tiny, tmp_path):
    edit_signature(tiny, lambda data: NESTED)
    code, _, err = cli("verify", tiny, "--backends", "onnxruntime,torch")
    assert_one_line_error(code, err, 2, "signature is unreadable")
    code, _, err = cli("package", tiny, "--repository", tmp_path / "repo", "--name", "m")
    assert_one_line_error(code, err, 2, "signature is unreadable")


def test_deeply_nested_json_is_bad_input_from_read_json(tmp_path):
    from deploytool.errors import BadInput
    from deploytool.io import read_json

    (tmp_path / "a.json").write_text('{"a": ' + "[" * 70 + "]" * 70 + "}")
    with pytest.raises(BadInput, match="71 deep"):
        read_json(tmp_path / "a.json", "config")
    (tmp_path / "b.json").write_text('{"a": "' + "[" * 1000 + '", "b": [[1]]}')  # brackets in a string
    assert read_json(tmp_path / "b.json", "config")["b"] == [[1]]


# --- 15. SIGTERM while a library runs -------------------------------------------------------------------------

def test_sigterm_inside_a_library_that_wraps_it_exits_143(cli, monkeypatch, tmp_path):
    """torch.onnx catches the SystemExit our SIGTERM handler raises and re-raises its own error: the exit
    is still 143 with the one line "terminated", not 2 with torch's message."""
    from deploytool.errors import BadInput

    def export_that_is_terminated(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except BaseException as exc:  # as torch.onnx does
            raise BadInput("torch.onnx could not export the model: 'torch._dynamo' has no attribute 'exc'") from exc

    pytest.importorskip("torch")
    monkeypatch.setattr("deploytool.export.onnx.export_onnx", export_that_is_terminated)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        code, _, err = cli("export", tmp_path, "--out", tmp_path / "m.onnx")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 143 and err.strip().splitlines() == ["terminated"], err
