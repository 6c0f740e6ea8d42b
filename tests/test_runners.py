"""Runners: one interface, the registry's errors, metadata, and the ONNX Runtime runner's lean infer."""

from __future__ import annotations

import numpy as np
import pytest

from deploytool.errors import BadInput, MissingDependency
from deploytool.runners import (BACKENDS, NATIVE, Runner, artifact_of, backends_reading, make_runner, native_backend,
                                parse_backends, reads)
from deploytool.signature import ModelSignature, TensorMeta

ROUTED_MLP_OUTPUTS = ["output", "routed.router.index", "routed.router.probs"]


@pytest.fixture(scope="module")
def routing_onnx(tmp_path_factory):
    """A tiny ONNX model (the routing step alone) for the runner mechanics."""
    from onnx_models import routing_model

    path = tmp_path_factory.mktemp("onnx") / "routing.onnx"
    path.write_bytes(routing_model(4, 0.5).SerializeToString())
    return path


def test_unknown_backend_is_bad_input():
    with pytest.raises(BadInput, match="unknown backend 'tflite'"):
        make_runner("tflite", ".")


@pytest.mark.parametrize("backend, needs", [("torch", "run directory"), ("onnxruntime", "ONNX model path"),
                                            ("torch-sparse", "run directory"), ("tensorrt", "an engine path")])
def test_backend_without_its_artifact_is_bad_input(backend, needs):
    with pytest.raises(BadInput, match=f"backend {backend} needs .*{needs}"):
        make_runner(backend, None)


def test_an_option_the_backend_fixes_is_refused_not_a_type_error(routing_onnx):
    with pytest.raises(BadInput, match="backend onnxruntime runs with device='cpu', not 'cuda'"):
        make_runner("onnxruntime", routing_onnx, device="cuda")
    assert make_runner("onnxruntime", routing_onnx, device="cpu").device == "cpu"  # the same value is fine


def test_tensorrt_backend_is_a_missing_dependency_without_tensorrt(tmp_path):
    from deploytool.deps import available

    if available("tensorrt"):
        pytest.skip("TensorRT is installed here")
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"\0" * 16)
    with pytest.raises(MissingDependency):
        with make_runner("tensorrt", engine):
            pass


def test_backend_names_are_the_cli_spellings_and_each_reads_one_artifact_kind():
    assert list(BACKENDS) == ["torch", "torch-dense", "torch-sparse", "onnxruntime", "onnxruntime-cuda", "tensorrt"]
    assert {name: artifact_of(name) for name in BACKENDS} == {
        "torch": "run", "torch-dense": "run", "torch-sparse": "run", "onnxruntime": "onnx",
        "onnxruntime-cuda": "onnx", "tensorrt": "engine"}
    assert all(reads(backend, kind) for kind, backend in NATIVE.items())
    assert reads("torch", "hf") and not reads("onnxruntime", "hf")  # a Hugging Face folder rebuilds like a run


def test_the_registry_answers_every_backend_question():
    assert NATIVE == {"run": "torch", "hf": "torch", "onnx": "onnxruntime", "engine": "tensorrt"}
    assert backends_reading("hf") == ["torch", "torch-dense", "torch-sparse"]
    assert {name: (b.device, b.needs) for name, b in BACKENDS.items()} == {
        "torch": ("cpu", ["torch"]), "torch-dense": ("cpu", ["torch"]), "torch-sparse": ("cpu", ["torch"]),
        "onnxruntime": ("cpu", ["onnxruntime"]), "onnxruntime-cuda": ("cuda", ["onnxruntime", "onnxruntime-cuda", "gpu"]),
        "tensorrt": ("cuda", ["tensorrt", "gpu"])}
    with pytest.raises(BadInput, match="unknown target kind 'gguf'"):
        native_backend("gguf")


def test_a_new_target_kind_is_one_table_entry(monkeypatch, tmp_path):
    """Adding a target kind is an entry in artifacts.TARGET_KINDS (plus its test in artifact_kind): the
    registry, load and the resolver's readers follow from it."""
    from deploytool import artifacts, runtime

    monkeypatch.setitem(artifacts.TARGET_KINDS, "stub", artifacts.TargetKind("stub", "onnx", "a stub model"))
    assert native_backend("stub") == "onnxruntime"
    assert backends_reading("stub") == ["onnxruntime", "onnxruntime-cuda"]
    assert reads("onnxruntime-cuda", "stub") and not reads("torch", "stub") and not reads("tensorrt", "stub")
    monkeypatch.setattr(artifacts, "kind_and_config", lambda path: ("stub", None))
    assert runtime.resolve_backend(tmp_path) == ("stub", "onnxruntime")
    with pytest.raises(BadInput, match="backend torch does not read .* use onnxruntime, onnxruntime-cuda"):
        runtime.resolve_backend(tmp_path, "torch")


def test_torch_runner_from_a_run_dir_has_a_signature_and_outputs(trained_run):
    runner = make_runner("torch", trained_run.path)
    assert [(m.name, m.dtype, m.shape) for m in runner.inputs] == [("x", "float32", ("batch", 64))]
    assert [m.name for m in runner.outputs] == ROUTED_MLP_OUTPUTS
    (router,) = runner.signature.routers
    assert (router.path, router.n_experts, router.index, router.probs) == ("routed.router", 4, *ROUTED_MLP_OUTPUTS[1:])
    x = np.random.default_rng(0).random((7, 64), dtype=np.float32)
    with runner:
        out = runner.infer({"x": x})
    assert list(out) == ROUTED_MLP_OUTPUTS
    assert out["output"].shape == (7, 10) and out[router.index].dtype == np.int64 and out[router.probs].shape == (7, 4)
    np.testing.assert_array_equal(out[router.index], out[router.probs].argmax(-1))


def test_torch_and_onnx_runners_agree_on_the_signature(trained_run, exported_onnx):
    torch_sig = make_runner("torch", trained_run.path).signature
    onnx_sig = make_runner("onnxruntime", exported_onnx).signature
    assert torch_sig.describe() == onnx_sig.describe()
    assert torch_sig.routers == onnx_sig.routers


def test_dense_and_sparse_dispatch_agree(trained_run):
    x = np.random.default_rng(1).random((200, 64), dtype=np.float32)
    with make_runner("torch-dense", trained_run.path) as dense, \
            make_runner("torch-sparse", trained_run.path) as sparse:
        a, b = dense.infer({"x": x}), sparse.infer({"x": x})
    np.testing.assert_array_equal(a["routed.router.index"], b["routed.router.index"])
    np.testing.assert_allclose(a["output"], b["output"], atol=1e-5)
    assert dense.name == "torch-dense" and sparse.name == "torch-sparse"


def test_torch_runner_restores_the_callers_dispatch(trained_run):
    from deploytool.nn import routed_modules
    from deploytool.runners.torch import TorchRunner
    from deploytool.checkpoints import load_model

    model = load_model(trained_run.path).train()
    before = [m.dispatch for m in routed_modules(model)]
    with TorchRunner(model, dispatch="sparse", example_inputs=np.zeros((2, 64), np.float32)):
        assert {m.dispatch for m in routed_modules(model)} == {"sparse"} and not model.training
    assert [m.dispatch for m in routed_modules(model)] == before and model.training


def test_torch_runner_of_a_module_needs_example_inputs(trained_run):
    from deploytool.runners.torch import TorchRunner
    from deploytool.checkpoints import load_model

    with pytest.raises(BadInput, match="needs example inputs"):
        TorchRunner(load_model(trained_run.path))


def test_torch_runner_runs_a_multi_input_module_by_input_name(image_export):
    from deploytool.feeds import random_feed

    runner = make_runner("torch", image_export.module, example_inputs=image_export.example)
    assert runner.signature.input_names == ["img", "meta"]
    feed = random_feed(runner.signature, 5)
    with runner:
        out = runner.infer(feed)
        with pytest.raises(BadInput, match=r"the model's inputs are \['img', 'meta'\]"):
            runner.infer({"img": feed["img"]})
    assert list(out) == image_export.result.signature.output_names
    assert out["gate.router.probs"].shape == (5, 2) and out["routed.router.index"].shape == (5,)


def test_infer_before_activate_is_refused(routing_onnx):
    runner = make_runner("onnxruntime", routing_onnx)
    with pytest.raises(RuntimeError, match="not active"):
        runner.infer({"logits": np.zeros((1, 4), np.float32)})


def test_ort_runner_metadata_and_output_equal_a_bare_session(routing_onnx):
    import onnxruntime as ort

    runner = make_runner("onnxruntime", routing_onnx)
    assert [(m.name, m.dtype, m.shape) for m in runner.inputs] == [("logits", "float32", ("batch", 4))]
    assert [(m.name, m.dtype) for m in runner.outputs] == [("probs", "float32"), ("mask", "float32"),
                                                         ("index", "int64")]
    feed = {"logits": np.random.default_rng(2).standard_normal((9, 4)).astype(np.float32)}
    bare = ort.InferenceSession(str(routing_onnx), providers=["CPUExecutionProvider"]).run(None, feed)
    with runner:
        out = runner.infer(feed)
        assert runner.active_providers == ["CPUExecutionProvider"]
    for got, want in zip(out.values(), bare):
        np.testing.assert_array_equal(got, want)


def test_ort_runner_metadata_while_inactive_loads_one_session(routing_onnx, monkeypatch):
    import deploytool.runners.ort as ort_module

    loads = []
    real = ort_module.load_session
    monkeypatch.setattr(ort_module, "load_session", lambda *a, **k: loads.append(1) or real(*a, **k))
    runner = make_runner("onnxruntime", routing_onnx)
    for _ in range(3):
        assert runner.inputs[0].name == "logits" and runner.outputs[-1].name == "index"
    assert len(loads) == 1


@pytest.mark.parametrize("value, minimum, match", [
    ("torch,tflite", 1, "unknown backend 'tflite'"),
    ("torch, onnxruntime,torch", 1, "backend 'torch' is given twice"),
    (["onnxruntime", "onnxruntime"], 1, "backend 'onnxruntime' is given twice"),
    ("torch", 2, "at least 2 backend"),
    (" , ", 1, "at least 1 backend"),
])
def test_parse_backends_refuses_unknown_repeated_and_too_few_names(value, minimum, match):
    with pytest.raises(BadInput, match=match):
        parse_backends(value, minimum=minimum)


def test_parse_backends_keeps_the_given_order():
    assert parse_backends(" onnxruntime,torch-sparse ") == ["onnxruntime", "torch-sparse"]
    assert parse_backends(("torch",)) == ["torch"]


def test_a_model_without_routers_is_refused_and_one_that_lost_its_routing_outputs_names_them(
        routing_onnx, exported_onnx, trained_run, tmp_path):
    import onnx

    with pytest.raises(BadInput, match="has no deploytool router"):
        make_runner("onnxruntime", routing_onnx).signature.require_router(str(routing_onnx))
    make_runner("torch", trained_run.path).signature.require_router("run")
    make_runner("onnxruntime", exported_onnx).signature.require_router("onnx")
    model = onnx.load(str(exported_onnx))
    kept = [o for o in model.graph.output if o.name != "routed.router.probs"]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    cut = tmp_path / "cut.onnx"
    onnx.save(model, str(cut))
    with pytest.raises(BadInput, match=r"lacks the routing output\(s\) routed.router.probs"):
        make_runner("onnxruntime", cut).signature.require_router(str(cut))


def test_ort_runner_refuses_a_wrong_dtype_as_bad_input(routing_onnx):
    with make_runner("onnxruntime", routing_onnx) as runner:
        with pytest.raises(BadInput, match="refused the feed"):
            runner.infer({"logits": np.zeros((2, 4), np.float64)})


@pytest.mark.parametrize("content, what", [(None, "does not exist"), (b"not a model at all", "not a loadable")])
def test_ort_runner_on_a_bad_file_is_bad_input(tmp_path, content, what):
    path = tmp_path / "m.onnx"
    if content is not None:
        path.write_bytes(content)
        runner = make_runner("onnxruntime", path)
        with pytest.raises(BadInput, match=what):
            runner.activate()
    else:
        with pytest.raises(BadInput, match=what):
            make_runner("onnxruntime", path)


def test_ort_runner_on_a_directory_says_so_and_a_run_dir_says_export_first(tmp_path, trained_run):
    with pytest.raises(BadInput, match=f"{tmp_path} is a directory; give an ONNX file"):
        make_runner("onnxruntime", tmp_path)
    with pytest.raises(BadInput, match="is a run directory.*deploytool export .* --out model.onnx"):
        make_runner("onnxruntime", trained_run.path)


def _static(routing_onnx, tmp_path, batch):
    import onnx

    model = onnx.load(str(routing_onnx))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    path = tmp_path / f"static{batch}.onnx"
    onnx.save(model, str(path))
    return path


def test_ort_refused_feed_keeps_the_got_and_expected_dims(routing_onnx, tmp_path):
    with make_runner("onnxruntime", _static(routing_onnx, tmp_path, 8)) as runner:
        assert runner.signature.static_batch == 8
        with pytest.raises(BadInput, match="refused the feed") as info:
            runner.infer({"logits": np.zeros((3, 4), np.float32)})
    message = str(info.value)
    assert "Got: 3 Expected: 8" in message and "\n" not in message


class _Rows8(Runner):
    """Takes exactly 8 rows (like a static-batch export); output = 2 * x, index = row sum."""

    backend = "rows8"

    def __init__(self):
        super().__init__()
        self.fed: list[int] = []

    def _signature(self):
        return ModelSignature((TensorMeta("x", "float32", (8, 3)),),
                              (TensorMeta("output", "float32", (8, 3)), TensorMeta("index", "int64", (8,))))

    def _activate(self):
        pass

    def _infer(self, feed):
        x = feed["x"]
        assert x.shape == (8, 3), x.shape
        self.fed.append(len(x))
        return {"output": 2 * x, "index": x.sum(1).astype(np.int64)}


def test_run_batched_feeds_a_static_batch_runner_padded_chunks_and_drops_the_padding():
    from deploytool.comparator import run_batched

    x = np.arange(19 * 3, dtype=np.float32).reshape(19, 3)
    with _Rows8() as runner:
        out = run_batched(runner, {"x": x}, batch_size=256)
    assert runner.fed == [8, 8, 8]
    np.testing.assert_array_equal(out["output"], 2 * x)
    np.testing.assert_array_equal(out["index"], x.sum(1).astype(np.int64))


def test_static_batch_is_none_for_a_dynamic_batch(routing_onnx, trained_run):
    assert make_runner("onnxruntime", routing_onnx).signature.static_batch is None
    assert make_runner("torch", trained_run.path).signature.static_batch is None


def test_run_batched_concatenates_chunks_of_a_dynamic_runner_and_refuses_an_empty_feed(exported_onnx):
    from deploytool.comparator import run_batched

    x = np.random.default_rng(4).random((70, 64), dtype=np.float32)
    with make_runner("onnxruntime", exported_onnx) as runner:
        whole = runner.infer({"x": x})
        chunked = run_batched(runner, {"x": x}, batch_size=32)
        with pytest.raises(BadInput, match="no samples"):
            run_batched(runner, {"x": x[:0]})
    assert list(chunked) == ROUTED_MLP_OUTPUTS
    for name in ROUTED_MLP_OUTPUTS:
        np.testing.assert_allclose(chunked[name], whole[name], rtol=1e-6, atol=1e-6)


def test_ort_runner_cuda_without_cuda_is_a_missing_dependency(routing_onnx):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    with pytest.raises(MissingDependency, match="CUDA"):
        make_runner("onnxruntime-cuda", routing_onnx).activate()


@pytest.mark.gpu
def test_ort_runner_uses_cuda_when_available(routing_onnx):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    with make_runner("onnxruntime-cuda", routing_onnx) as runner:
        assert runner.active_providers[0] == "CUDAExecutionProvider"
        out = runner.infer({"logits": np.eye(4, dtype=np.float32)})
    np.testing.assert_array_equal(out["index"], [0, 1, 2, 3])
