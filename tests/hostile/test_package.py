"""Hostile input to `deploytool package` (items 1-3, 6, 12, 17, 18 of issue 18)."""

from __future__ import annotations

import ast
import json
import os
import shlex
import subprocess
import sys
import time

import onnx
import pytest

from conftest import assert_one_line_error
from deploytool.errors import BadInput
from deploytool.serving.repository import package

from .conftest import renamed_input, wide_onnx

# --- 1. --force replaces only a model folder package wrote ----------------------------------------------

def test_force_never_follows_a_symlink_out_of_the_repository(tiny, tmp_path):
    userdata = tmp_path / "userdata"
    userdata.mkdir()
    (userdata / "important.txt").write_text("keep me")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "linked").symlink_to(userdata)
    with pytest.raises(BadInput, match="is a symlink"):
        package(tiny, repo, "linked", force=True)
    assert (userdata / "important.txt").read_text() == "keep me"
    assert sorted(p.name for p in userdata.iterdir()) == ["important.txt"] and (repo / "linked").is_symlink()


def test_force_keeps_a_folder_package_did_not_write(tiny, tmp_path):
    (tmp_path / "repo" / "mymodel").mkdir(parents=True)
    (tmp_path / "repo" / "mymodel" / "notes.txt").write_text("mine")
    with pytest.raises(BadInput, match="not written by deploytool package"):
        package(tiny, tmp_path / "repo", "mymodel", force=True)
    assert (tmp_path / "repo" / "mymodel" / "notes.txt").read_text() == "mine"


def test_force_keeps_a_package_that_now_holds_a_users_file(tiny, tmp_path):
    first = package(tiny, tmp_path / "repo", "m")
    (first.model_dir / "1" / "notes.txt").write_text("mine")
    with pytest.raises(BadInput, match=r"holds files deploytool did not write \(1/notes.txt\)"):
        package(tiny, tmp_path / "repo", "m", force=True)
    assert (first.model_dir / "1" / "notes.txt").read_text() == "mine"


def test_force_replaces_a_package_it_wrote(tiny, tmp_path):
    from deploytool.serving.repository import MARKER

    first = package(tiny, tmp_path / "repo", "m", max_batch=4)
    assert MARKER not in first.files and (first.model_dir / MARKER).is_file()
    second = package(tiny, tmp_path / "repo", "m", max_batch=8, force=True)
    assert second.config["max_batch_size"] == 8


def test_force_refuses_a_file_where_the_folder_would_be(tiny, tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "m").write_text("a file")
    with pytest.raises(BadInput, match="is a file"):
        package(tiny, tmp_path / "repo", "m", force=True)
    assert (tmp_path / "repo" / "m").read_text() == "a file"


# --- 2. the README quotes every name for the language it lands in ------------------------------------------

HOSTILE_NAMES = ["x'; touch PWNED; echo '", 'x"); open("PWNED", "w"); ("', "x$(touch PWNED)`touch PWNED`\\"]


def _block(readme: str, language: str) -> str:
    return readme.split(f"```{language}\n")[-1].split("```")[0]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_the_readmes_curl_line_runs_safely_and_sends_the_name(tmp_path, name):
    model = renamed_input(tmp_path / "m.onnx", name)
    readme = package(model, tmp_path / "repo", "m").readme.read_text()
    curl = _block(readme, "bash").strip().splitlines()[-1]
    work = tmp_path / "work"
    work.mkdir()
    # a stand-in curl prints the body it was given: the line runs as a user would paste it
    script = 'curl() { for a in "$@"; do last="$a"; done; printf "%s" "$last"; }\n' + curl
    body = subprocess.run(["bash", "-c", script], cwd=work, capture_output=True, text=True, check=True).stdout
    assert not (work / "PWNED").exists()
    assert json.loads(body)["inputs"][0]["name"] == name


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_the_readmes_python_client_runs_safely_and_sends_the_name(tmp_path, name):
    model = renamed_input(tmp_path / "m.onnx", name)
    readme = package(model, tmp_path / "repo", "m").readme.read_text()
    client = _block(readme, "python")
    ast.parse(client)
    fake = tmp_path / "fake" / "tritonclient"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "http.py").write_text(
        "import json\n"
        "class InferInput:\n"
        "    def __init__(self, name, shape, dtype): open('sent.json', 'a').write(json.dumps(name) + '\\n')\n"
        "    def set_data_from_numpy(self, value): pass\n"
        "class InferenceServerClient:\n"
        "    def __init__(self, url): pass\n"
        "    def infer(self, model, inputs):\n"
        "        class R:\n"
        "            def as_numpy(self, name): return None\n"
        "        return R()\n")
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(fake.parent)}
    subprocess.run([sys.executable, "-c", client], cwd=work, env=env, check=True, capture_output=True)
    assert not (work / "PWNED").exists()
    assert [json.loads(line) for line in (work / "sent.json").read_text().splitlines()] == [name]


# --- 6. the README stays small whatever the dims ------------------------------------------------------------

@pytest.mark.parametrize("width", [5_000_000, 2_000_000_000])
def test_the_readme_is_small_and_quick_whatever_the_dims(tmp_path, width):
    model = wide_onnx(tmp_path / "wide.onnx", width)
    begin = time.monotonic()
    result = package(model, tmp_path / "repo", "wide")
    assert time.monotonic() - begin < 30
    readme = result.readme.read_text()
    assert len(readme) < 20_000
    curl = _block(readme, "bash").strip().splitlines()[-1]
    program = shlex.split(curl)[2]
    assert f"* {width}" in program and compile(program, "curl body", "exec")
    assert [p.name for p in (tmp_path / "repo").iterdir()] == ["wide"]  # no temporary folder left


# --- 3. external data stays inside the model's folder -------------------------------------------------------

def test_external_data_that_is_a_symlink_out_of_the_folder_is_refused(tiny, tmp_path):
    model = onnx.load(str(tiny))
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(model, str(folder / "m.onnx"), save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    secret = tmp_path / "secret.bin"
    os.replace(folder / "weights.bin", secret)
    (folder / "weights.bin").symlink_to(secret)
    with pytest.raises(BadInput, match="outside the model's folder"):
        package(folder / "m.onnx", tmp_path / "repo", "m")
    assert not (tmp_path / "repo" / "m").exists()
    (folder / "weights.bin").unlink()
    os.replace(secret, folder / "weights.bin")  # the same data as a plain file beside the model: packaged
    result = package(folder / "m.onnx", tmp_path / "repo", "m")
    assert "1/weights.bin" in result.files


# --- 18. a model ONNX Runtime cannot load is refused before anything is written -----------------------------

def _ir99(model):
    model.ir_version = 99


def _empty_output_name(model):
    model.graph.node[0].output[0] = ""
    model.graph.output[0].name = ""


@pytest.mark.parametrize("breakage", [_ir99, _empty_output_name])
def test_a_model_onnxruntime_cannot_load_is_refused(tiny, tmp_path, breakage):
    model = onnx.load(str(tiny))
    breakage(model)
    onnx.save(model, str(tiny))
    with pytest.raises(BadInput):
        package(tiny, tmp_path / "repo", "m")
    assert not (tmp_path / "repo" / "m").exists()


# --- 12 and 17 through the CLI --------------------------------------------------------------------------------

def test_cli_package_of_a_symlink_loop_is_one_line_exit_2(cli, loop, tmp_path):
    code, _, err = cli("package", loop, "--repository", tmp_path / "repo", "--name", "m")
    assert_one_line_error(code, err, 2, "symlink loop")


def test_cli_package_name_with_a_trailing_newline_is_refused_as_a_name(cli, tiny, tmp_path):
    code, _, err = cli("package", tiny, "--repository", tmp_path / "repo", "--name", "abc\n")
    assert_one_line_error(code, err, 2, "model name")
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


# --- 6. a package killed before it finished leaves nothing the next one keeps -----------------------------------

def test_a_killed_packages_folder_is_removed_by_the_next_package_and_a_live_ones_kept(tiny, tmp_path):
    import subprocess

    from deploytool import io
    from deploytool.serving.repository import MARKER

    repo = tmp_path / "repo"
    dead_child = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_child.wait()
    stale, live = repo / ".m.killed", repo / ".m.running"
    for folder, owner in ((stale, io.process_id(dead_child.pid)), (live, io.process_id(os.getpid()))):
        (folder / "1").mkdir(parents=True)
        (folder / MARKER).write_text(json.dumps({"files": [], "building": owner}))
    (repo / ".m.stranger").mkdir()  # no marker: not package's, kept
    package(tiny, repo, "m")
    assert not stale.exists() and live.is_dir() and (repo / ".m.stranger").is_dir()
    assert "building" not in json.loads((repo / "m" / MARKER).read_text())


def test_a_sigkilled_package_leaves_a_folder_the_next_package_removes(tiny, tmp_path):
    """SIGKILL while the model is copied (a slow copy stands in for a large model)."""
    import signal

    repo = tmp_path / "repo"
    script = ("import shutil, sys, time\n"
              "from deploytool.serving import repository\n"
              "real = repository.shutil.copyfile\n"
              "def slow(a, b, *args, **kwargs):\n"
              "    print('copying', flush=True); time.sleep(60)\n"
              "repository.shutil.copyfile = slow\n"
              f"repository.package({str(tiny)!r}, {str(repo)!r}, 'm')\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert child.stdout.readline().strip() == "copying"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert [p.name for p in repo.iterdir() if p.name.startswith(".m.")]  # what SIGKILL leaves
    package(tiny, repo, "m")
    assert sorted(p.name for p in repo.iterdir()) == ["m"]
