"""`verify`: routing-aware parity across backends, exit codes, and the bad inputs it refuses."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import assert_one_line_error
from deploytool.errors import BadInput


def router_initializers(model, path: str):
    """[(initializer, expert axis)] of the final Linear of the router at module path `path` in an
    exported ModelProto: a Gemm's weight [E, in] for [B, D] inputs, a MatMul's folded weight [in, E]
    for [B, T, D] ones, and the bias [E]."""
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    bias = next(name for name in inits if name.endswith(f"{path}.net.0.bias"))
    node = next(n for n in model.graph.node if bias in n.input)
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return [(inits[node.input[1]], 0 if trans_b else 1), (inits[bias], 0)]
    matmul = producers[next(i for i in node.input if i != bias)]
    assert matmul.op_type == "MatMul", matmul.op_type
    return [(inits[matmul.input[1]], 1), (inits[bias], 0)]


def edit_router(source, target, path: str, edit):
    """Save `source` as `target` with `edit(array, expert_axis)` applied to the router at `path`."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    for init, axis in router_initializers(model, path):
        init.CopyFrom(numpy_helper.from_array(edit(numpy_helper.to_array(init), axis), init.name))
    onnx.save(model, str(target))
    return target


def roll_experts(array, axis):
    """Every position's decision moves to the next expert, at the margin it had."""
    return np.roll(array, 1, axis=axis)


@pytest.fixture(scope="module")
def perturbed(exported_onnx, tmp_path_factory):
    """The exported_onnx model with the router's rows rolled: confident rows go to another expert."""
    return edit_router(exported_onnx, tmp_path_factory.mktemp("perturbed") / "flipped.onnx", "routed.router",
                       roll_experts)


def test_exported_model_verifies_against_torch_and_sparse_torch(exported_onnx, trained_run):
    from deploytool import verify

    report = verify(exported_onnx, checkpoint=trained_run.path, backends=("torch", "torch-sparse", "onnxruntime"),
                    samples=360)
    assert report.passed, report.failures()
    assert len(report.comparisons) == 3  # every pair
    for c in report.comparisons:
        (routing,) = c.routing
        assert routing.router == "routed.router" and routing.agreement == 100.0 and routing.flips == 0
        assert routing.rows == 360
        assert {o.name for o in c.outputs} == {"output", "routed.router.probs"}
        assert max(o.max_abs for o in c.outputs) < 1e-5
    assert report.inputs == {"digits held-out": 360}


@pytest.fixture(scope="module")
def static8(trained_run, tmp_path_factory):
    """The trained run exported with its batch fixed to 8."""
    from deploytool import export_onnx

    path = tmp_path_factory.mktemp("static") / "static8.onnx"
    assert export_onnx(trained_run.path, path, static_batch=8).passed
    return path


def test_static_batch_model_verifies_fed_in_padded_chunks_of_its_batch(cli, static8, trained_run):
    code, out, err = cli("verify", static8, "-c", trained_run.path, "--samples", "101",
                         "--backends", "torch,torch-sparse,onnxruntime", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["passed"] and result["inputs"] == {"digits held-out": 101}
    assert all(r["rows"] == 101 and r["flips"] == 0 for c in result["comparisons"] for r in c["routing"])


def test_cli_verify_json_is_machine_readable(cli, exported_onnx, trained_run):
    code, out, err = cli("verify", exported_onnx, "--checkpoint", trained_run.path, "--samples", "100", "--json")
    assert code == 0, err
    result = json.loads(out)
    (c,) = result["comparisons"]
    assert result["passed"] and c["reference"] == "torch" and c["candidate"] == "onnxruntime"
    assert {"max_abs", "mean_abs", "p99_abs", "max_rel", "min_atol", "passed"} <= set(c["outputs"][0])
    (routing,) = c["routing"]
    assert {"router", "agreement", "flips", "tie_breaks", "failures", "buckets"} <= set(routing)
    assert routing["router"] == "routed.router"


def test_flip_at_large_margin_fails_verify(cli, perturbed, trained_run):
    from deploytool import verify

    report = verify(perturbed, checkpoint=trained_run.path)
    assert not report.passed
    (routing,) = report.comparisons[0].routing
    assert routing.failures > 0.5 * routing.rows and routing.agreement < 50
    code, out, err = cli("verify", perturbed, "--checkpoint", trained_run.path)
    assert_one_line_error(code, err, 1, "router routed.router: ")
    assert "decision flips" in err
    assert "parity: FAIL" in out


@pytest.mark.parametrize("name, match", [
    ("model.PLAN", "engine .*model.PLAN has no manifest"),  # an engine whatever the suffix's case
    ("model.txt", "neither a run directory, an .onnx file nor a TensorRT engine"),
])
def test_verify_tells_engines_from_onnx_by_suffix_like_load_does(tmp_path, name, match):
    from deploytool import verify

    path = tmp_path / name
    path.write_bytes(b"not a model")
    with pytest.raises(BadInput, match=match):
        verify(path, backends="onnxruntime,tensorrt")


def test_check_runners_match_refuses_a_checkpoint_of_another_shape(exported_onnx, tmp_path):
    from onnx_models import routing_model
    from deploytool.parity import check_runners_match
    from deploytool.runners import make_runner

    other = tmp_path / "routing.onnx"
    other.write_bytes(routing_model(4, 0.5).SerializeToString())
    runners = [make_runner("onnxruntime", p, device="cpu") for p in (exported_onnx, other)]
    with pytest.raises(BadInput, match="disagree on the model's signature"):
        check_runners_match(runners, {}, None)
    assert check_runners_match(runners[:1], {}, None) == []


def test_checkpoint_sha_mismatch_is_noted(exported_onnx, trained_run, tmp_path):
    from deploytool import verify
    from deploytool.io import load_weights, save_weights

    run = tmp_path / "run"
    shutil.copytree(trained_run.path, run)
    state = load_weights(run / "model.safetensors")
    save_weights(run / "model.safetensors", {k: v * 1.0001 if v.is_floating_point() else v for k, v in state.items()})
    report = verify(exported_onnx, checkpoint=run, samples=50)
    assert any("sha256 differs" in n for n in report.notes)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_infinite_inputs_are_refused(exported_onnx, bad):
    from deploytool.artifacts import open_artifact
    from deploytool.feeds import load_feed

    x = np.ones((4, 64), np.float32)
    x[2, 3] = bad
    with pytest.raises(BadInput, match=r"input 'x' has NaN or inf in sample\(s\) 2;"):
        load_feed(x, open_artifact(exported_onnx).signature)


def test_verify_refuses_an_array_with_inf_before_running(exported_onnx, trained_run):
    from deploytool import verify

    x = np.ones((8, 64), np.float32)
    x[5, 0] = np.inf
    with pytest.raises(BadInput, match=r"NaN or inf in sample\(s\) 5"):
        verify(exported_onnx, checkpoint=trained_run.path, data=x)


def _pickled_run(run, tmp_path):
    import torch

    bad = tmp_path / "pickled"
    shutil.copytree(run, bad)
    torch.save({"w": torch.zeros(2)}, bad / "model.safetensors")
    return bad


def _mismatched_run(run, tmp_path):
    bad = tmp_path / "narrow"
    shutil.copytree(run, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "expert_hidden": 32}))
    return bad


def _other_model_run(run, tmp_path):
    """A consistent run directory of another model (8 experts): its own shapes load, the ONNX's differ."""
    from deploytool.io import save_weights, write_json
    from deploytool.models import build_model

    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((run / "config.json").read_text())
    config.update({k: 8 for k in ("n_experts", "experts") if k in config})
    save_weights(other / "model.safetensors", build_model(config).state_dict())
    write_json(other / "config.json", config)
    return other


def _npz(tmp_path, features=10, nan=False):
    x = np.random.default_rng(0).random((40, features)).astype(np.float32)
    if nan:
        x[3, 1] = np.nan
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.arange(40) % 2)
    return path


@pytest.mark.parametrize("case, match", [
    ("missing model", "does not exist"),
    ("not onnx", "not an ONNX model"),
    ("truncated onnx", "not an ONNX model"),
    ("pickled checkpoint", "pickled checkpoints are refused"),
    ("checkpoint shapes", "shape"),
    ("checkpoint of another model", "the checkpoint does not match the model"),
    ("feature mismatch", "input 'x' has shape [40, 10]; the model takes float32[batch, 64] (dim 1 differs)"),
    ("nan inputs", "NaN"),
    ("unknown backend", "unknown backend 'tflite'"),
    ("no checkpoint", "give the checkpoint (its run directory)"),
    ("same backend twice", "backend 'torch' is given twice"),
    ("nan atol", "atol must be a finite number >= 0, got nan"),
    ("negative rtol", "rtol must be a finite number >= 0, got -1"),
    ("directory as model", "is a directory without config.json"),
    ("run dir as model", "export it first: deploytool export"),
    ("directory as data", "is a directory"),
])
def test_cli_verify_bad_input_is_one_line_exit_2(cli, exported_onnx, trained_run, tmp_path, case, match):
    model, args = exported_onnx, ["--checkpoint", trained_run.path]
    if case == "missing model":
        model = tmp_path / "nope.onnx"
    elif case == "not onnx":
        model = tmp_path / "notes.onnx"
        model.write_text("these are my notes, not a model\n" * 20)
    elif case == "truncated onnx":
        model = tmp_path / "cut.onnx"
        model.write_bytes(exported_onnx.read_bytes()[: exported_onnx.stat().st_size // 2])
    elif case == "pickled checkpoint":
        args = ["--checkpoint", _pickled_run(trained_run.path, tmp_path)]
    elif case == "checkpoint shapes":
        args = ["--checkpoint", _mismatched_run(trained_run.path, tmp_path)]
    elif case == "checkpoint of another model":
        args = ["--checkpoint", _other_model_run(trained_run.path, tmp_path)]
    elif case == "feature mismatch":
        args += ["--data", _npz(tmp_path)]
    elif case == "nan inputs":
        args += ["--data", _npz(tmp_path, features=64, nan=True)]
    elif case == "unknown backend":
        args += ["--backends", "torch,tflite"]
    elif case == "no checkpoint":
        args = []
    elif case == "same backend twice":
        args += ["--backends", "torch,torch"]
    elif case == "nan atol":
        args += ["--atol", "nan"]
    elif case == "negative rtol":
        args += ["--rtol", "-1"]
    elif case == "directory as model":
        model = tmp_path
    elif case == "run dir as model":
        model, args = trained_run.path, []
    elif case == "directory as data":
        args += ["--data", tmp_path]
    code, out, err = cli("verify", model, *args)
    assert_one_line_error(code, err, 2, match)
    assert out == ""


# --- several routers, each judged on its own ------------------------------------------------------

TRANSFORMER_ROUTERS = ["layers.0.moe.router", "layers.1.moe.router"]


def test_a_token_level_model_verifies_every_router_per_token(transformer_onnx, transformer_run):
    from deploytool import verify

    report = verify(transformer_onnx, checkpoint=transformer_run.path, backends="torch-dense,onnxruntime",
                    samples=64)
    assert report.passed, report.failures()
    (c,) = report.comparisons
    assert [r.router for r in c.routing] == TRANSFORMER_ROUTERS
    assert all(r.rows == 64 * 8 and r.agreement == 100.0 for r in c.routing)  # 8 tokens per sample
    assert {o.name for o in c.outputs} == {"output", *(f"{r}.probs" for r in TRANSFORMER_ROUTERS)}
    assert all(o.rows == 64 for o in c.outputs)


@pytest.fixture(scope="module")
def second_router_flipped(transformer_onnx, tmp_path_factory):
    """transformer_onnx with only its last router's experts rolled: the first router still decides as torch."""
    return edit_router(transformer_onnx, tmp_path_factory.mktemp("flip2") / "flipped.onnx", TRANSFORMER_ROUTERS[1],
                       roll_experts)


def test_one_flipped_router_fails_verify_while_the_other_agrees(cli, second_router_flipped, transformer_run):
    from deploytool import verify

    report = verify(second_router_flipped, checkpoint=transformer_run.path, samples=64)
    assert report.passed is False
    first, second = report.comparisons[0].routing
    assert first.router == TRANSFORMER_ROUTERS[0] and first.passed and first.agreement == 100.0
    assert second.router == TRANSFORMER_ROUTERS[1] and not second.passed
    assert second.flips == second.rows == 64 * 8 and second.failures == second.rows
    assert [f for f in report.failures() if TRANSFORMER_ROUTERS[0] + ":" in f] == []
    code, out, err = cli("verify", second_router_flipped, "--checkpoint", transformer_run.path, "--samples", "64")
    assert_one_line_error(code, err, 1, f"router {TRANSFORMER_ROUTERS[1]}: 512 decision flips")
    assert f"router {TRANSFORMER_ROUTERS[0]}:" not in err
    assert "parity: FAIL" in out and f"router {TRANSFORMER_ROUTERS[0]}: 100.00% agree" in out


def test_router_weights_that_are_nan_fail_verify(exported_onnx, trained_run, tmp_path):
    """Two models that compute NaN the same way are no parity: NaN never matches, not even NaN."""
    from deploytool import verify
    from deploytool.io import load_weights, save_weights

    nan = edit_router(exported_onnx, tmp_path / "nan.onnx", "routed.router",
                      lambda array, axis: np.full_like(array, np.nan))
    twin = tmp_path / "twin.onnx"
    shutil.copyfile(nan, twin)
    report = verify([nan, twin], backends="onnxruntime", samples=40)
    assert report.passed is False
    (c,) = report.comparisons
    failed = {o.name for o in c.outputs if not o.passed}
    assert "routed.router.probs" in failed  # the experts still compute: only the decisions' probs are NaN
    assert all(o.max_abs == np.inf for o in c.outputs if o.name in failed)
    # against the torch backends: a checkpoint whose router weights are NaN is refused before anything runs
    run = tmp_path / "run"
    shutil.copytree(trained_run.path, run)
    state = load_weights(run / "model.safetensors")
    save_weights(run / "model.safetensors",
                 {k: v.clone().fill_(float("nan")) if k.startswith("routed.router.") else v for k, v in state.items()})
    with pytest.raises(BadInput, match="NaN"):
        verify(nan, checkpoint=run, samples=40)


def _no_router_onnx(path):
    """A valid ONNX model that routes nothing: y = relu(x)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "plain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("which", ["plain", "routing ops without a signature"])
def test_a_model_without_a_router_is_refused_in_one_line(cli, trained_run, tmp_path, which):
    from deploytool import verify
    from onnx_models import routing_model

    if which == "plain":
        model = _no_router_onnx(tmp_path / "plain.onnx")
    else:
        model = tmp_path / "routing.onnx"
        model.write_bytes(routing_model(4, 0.5).SerializeToString())
    code, out, err = cli("verify", model, "--checkpoint", trained_run.path)
    assert_one_line_error(code, err, 2, "has no deploytool router")
    assert out == ""
    with pytest.raises(BadInput, match="has no deploytool router"):
        verify(model, checkpoint=trained_run.path)


def test_per_output_tolerances_reach_every_comparison(exported_onnx, trained_run):
    from deploytool import verify

    report = verify(exported_onnx, checkpoint=trained_run.path, samples=30, atol={"output": 0.5}, rtol={"output": 0})
    assert report.passed, report.failures()
    by_name = {o.name: o for o in report.comparisons[0].outputs}
    assert (by_name["output"].atol, by_name["output"].rtol) == (0.5, 0.0)
    # the float32 default, times the gain of the router's tempered softmax (T=0.02: 12.5)
    assert by_name["routed.router.probs"].atol == pytest.approx(1e-5 * 12.5)
    with pytest.raises(BadInput, match="atol must be a finite number >= 0, got -1"):
        verify(exported_onnx, checkpoint=trained_run.path, atol={"output": -1})


def test_resolve_target_finds_each_readers_file_and_reads_the_source_run_once(exported_onnx, trained_run, monkeypatch):
    from deploytool import artifacts

    target = artifacts.resolve_target(exported_onnx)
    assert (target.kind, target.reader, target.onnx_path, target.engine_path) == ("onnx", "onnx", exported_onnx, None)
    assert target.source.resolve() == trained_run.path.resolve() and target.source_found
    assert target.file_for("run") == target.source and target.signature is not None
    reads = []
    real = artifacts.load_run
    monkeypatch.setattr(artifacts, "load_run", lambda path, **kw: reads.append(path) or real(path, **kw))
    assert target.run_config() == target.run_config() == trained_run.config
    assert len(reads) == 1
    run = artifacts.resolve_target(trained_run.path, checkpoint=trained_run.weights)
    assert (run.kind, run.signature, run.source, run.weights, run.source_found) == (
        "run", None, trained_run.path, trained_run.weights, False)
