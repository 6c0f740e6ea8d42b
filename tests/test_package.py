"""`package`: Triton model repositories whose config.pbtxt Triton's own schema parses, written atomically."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx_models import parse, sign, tiny_onnx

from conftest import assert_one_line_error
from deploytool.errors import BadInput, CheckFailed
from deploytool.serving import config as cfg
from deploytool.serving import repository
from deploytool.serving.repository import package


def dtype_name(value):
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(value)


def kinds(config):
    from tritonclient.grpc import model_config_pb2

    return [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group]


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    return tiny_onnx(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


@pytest.fixture
def fake_engine(onnx_file, tmp_path):
    """An engine file with the manifest build-engine writes (the engine bytes are never read by package)."""
    from deploytool.engine.manifest import build_manifest
    from deploytool.artifacts import manifest_path
    from deploytool.engine.plan import plan_engine
    from deploytool.io import write_json

    plan = plan_engine(onnx_file, min_batch=1, opt_batch=16, max_batch=32)
    io = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 8]}],
          "outputs": [{"name": "output", "dtype": "float32", "shape": [-1, 3]},
                      {"name": "router.index", "dtype": "int64", "shape": [-1]},
                      {"name": "router.probs", "dtype": "float32", "shape": [-1, 2]}]}
    machine = {"tensorrt": "10.9.0", "cuda": "12.8", "gpu": "NVIDIA H100", "compute_capability": "9.0"}
    manifest = build_manifest(plan, machine=machine, op_path="plugin", plugin_layers=["TemperedSoftmax_0"],
                              embedded_ptx={}, kernel_source_sha256=None, io=io)
    manifest["plugin_ids"] = ["deploytool::HardSelect", "deploytool::TemperedSoftmax"]
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"engine bytes")
    write_json(manifest_path(engine), manifest)
    return engine


def test_onnx_model_config_names_every_tensor_with_triton_types_and_batch_dims(onnx_file, tmp_path):
    result = package(onnx_file, tmp_path / "repo", "tiny")
    config = parse(result.model_dir)
    assert result.validated and result.backend == "onnxruntime"
    assert config.name == "tiny" and config.backend == "onnxruntime" and config.max_batch_size == 64
    assert [(t.name, dtype_name(t.data_type), list(t.dims)) for t in config.input] == [("x", "TYPE_FP32", [8])]
    outputs = {t.name: t for t in config.output}
    assert {n: (dtype_name(t.data_type), list(t.dims)) for n, t in outputs.items()} == {
        "output": ("TYPE_FP32", [3]), "router.index": ("TYPE_INT64", [1]), "router.probs": ("TYPE_FP32", [2])}
    # the router's index is [batch]: Triton needs dims [1] and reshapes it back for the backend
    assert outputs["router.index"].HasField("reshape") and list(outputs["router.index"].reshape.shape) == []
    assert not outputs["output"].HasField("reshape")
    assert not config.HasField("dynamic_batching")
    assert kinds(config) == [(1, "KIND_AUTO")]
    assert (result.model_dir / "1" / "model.onnx").read_bytes() == onnx_file.read_bytes()
    assert result.files == ["1/model.onnx", "README.md", "config.pbtxt"]


def test_dynamic_batching_preferred_sizes_delay_and_instances_reach_the_config(onnx_file, tmp_path):
    result = package(onnx_file, tmp_path, "tiny", max_batch=32, dynamic_batching=True, preferred_batch=(16, 4),
                     max_queue_delay_us=250, instances=3)
    config = parse(result.model_dir)
    assert config.max_batch_size == 32
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    assert kinds(config) == [(3, "KIND_AUTO")]


def test_batching_given_as_one_settings_object_reaches_the_config(onnx_file, tmp_path):
    batching = cfg.Batching(max_batch=32, dynamic=True, preferred=(4, 16), max_queue_delay_us=250)
    config = parse(package(onnx_file, tmp_path, "tiny", batching=batching).model_dir)
    assert config.max_batch_size == 32
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    with pytest.raises(BadInput, match="give batching= or max_batch, dynamic, not both"):
        package(onnx_file, tmp_path, "other", batching=batching, max_batch=8, dynamic_batching=True)


def test_max_batch_zero_puts_the_full_shape_in_dims(onnx_file, tmp_path):
    config = parse(package(onnx_file, tmp_path, "tiny", max_batch=0).model_dir)
    assert config.max_batch_size == 0
    assert list(config.input[0].dims) == [-1, 8]
    index = next(t for t in config.output if t.name == "router.index")
    assert list(index.dims) == [-1] and not index.HasField("reshape")


def test_fixed_batch_model_needs_max_batch_zero(tmp_path):
    static = tiny_onnx(tmp_path / "static.onnx", batch=4)
    with pytest.raises(BadInput, match="fixed batch dimension"):
        package(static, tmp_path / "repo", "static")
    assert list(parse(package(static, tmp_path / "repo", "static", max_batch=0).model_dir).input[0].dims) == [4, 8]


@pytest.mark.parametrize("onnx_type, triton_type", [("FLOAT16", "TYPE_FP16"), ("DOUBLE", "TYPE_FP64")])
def test_onnx_float_types_map_to_triton_types(tmp_path, onnx_type, triton_type):
    path = tiny_onnx(tmp_path / "m.onnx", dtype=onnx_type)
    config = parse(package(path, tmp_path / "repo", "m").model_dir)
    assert dtype_name(config.input[0].data_type) == triton_type
    assert {t.name: dtype_name(t.data_type) for t in config.output}["router.index"] == "TYPE_INT64"


def test_run_directory_is_served_by_the_python_backend_through_the_runtime(trained_run, tmp_path):
    result = package(trained_run.path, tmp_path, "routed", dynamic_batching=True)
    config = parse(result.model_dir)
    assert config.backend == "python" and result.runtime_backend == "torch"
    assert kinds(config) == [(1, "KIND_CPU")]
    assert config.parameters["deploytool_artifact"].string_value == "run"
    assert config.parameters["deploytool_backend"].string_value == "torch"
    assert [(t.name, list(t.dims)) for t in config.input] == [("x", [trained_run.config["in_features"]])]
    assert [t.name for t in config.output] == ["output", "routed.router.index", "routed.router.probs"]
    index = next(t for t in config.output if t.name == "routed.router.index")
    assert list(index.dims) == [1] and not index.HasField("reshape")  # model.py sends [batch, 1] itself
    assert {"1/model.py", "1/run/config.json", "1/run/model.safetensors"} <= set(result.files)
    assert (result.model_dir / "1" / "model.py").read_text() == repository.PYTHON_MODEL.read_text()


def test_engine_config_comes_from_its_manifest_and_readme_explains_the_plugin(fake_engine, tmp_path):
    result = package(fake_engine, tmp_path, "trt", max_batch=32)
    config = parse(result.model_dir)
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 32
    assert kinds(config) == [(1, "KIND_GPU")]
    assert [(t.name, list(t.dims)) for t in config.output] == [("output", [3]), ("router.index", [1]),
                                                                ("router.probs", [2])]
    assert {"1/model.plan", "1/model.plan.json"} <= set(result.files)
    readme = result.readme.read_text()
    assert "deploytool::TemperedSoftmax" in readme and "no LD_PRELOAD" in readme
    assert "TensorRT 10.9.0" in readme and "compute capability 9.0" in readme


def test_max_batch_above_the_engine_profile_is_refused_and_nothing_is_written(fake_engine, tmp_path):
    with pytest.raises(BadInput, match=r"max batch 64 is above the engine's optimisation profile \(max batch 32\)"):
        package(fake_engine, tmp_path / "repo", "trt", max_batch=64)
    assert not (tmp_path / "repo" / "trt").exists()


def test_existing_model_is_refused_without_force_and_left_untouched(onnx_file, tmp_path):
    first = package(onnx_file, tmp_path, "tiny")
    before = first.config_path.read_bytes()
    with pytest.raises(BadInput, match="already exists; replace it with force"):
        package(onnx_file, tmp_path, "tiny", max_batch=8)
    assert first.config_path.read_bytes() == before


def test_force_replace_that_fails_midway_keeps_the_old_model_whole(onnx_file, tmp_path, monkeypatch):
    first = package(onnx_file, tmp_path, "tiny", max_batch=16)
    before = {p.relative_to(first.model_dir): p.read_bytes() for p in first.model_dir.rglob("*") if p.is_file()}

    def copy_then_fail(target, kind, dest):
        dest.write_bytes(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(repository, "_copy_artifact", copy_then_fail)
    with pytest.raises(OSError, match="disk full"):
        package(onnx_file, tmp_path, "tiny", max_batch=8, force=True)
    after = {p.relative_to(first.model_dir): p.read_bytes() for p in first.model_dir.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no temporary directory left behind

    monkeypatch.undo()
    assert parse(package(onnx_file, tmp_path, "tiny", max_batch=8, force=True).model_dir).max_batch_size == 8


@pytest.mark.parametrize("name", ["a/b", "a b", "..", ".hidden", "", "x\\y"])
def test_names_with_separators_spaces_or_leading_dots_are_refused(onnx_file, tmp_path, name):
    with pytest.raises(BadInput, match="model name"):
        package(onnx_file, tmp_path, name)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, match", [
    ({"dynamic_batching": True, "preferred_batch": (8, 128)}, "preferred batch size 128"),
    ({"dynamic_batching": True, "max_batch": 0}, "dynamic batching needs a max batch > 0"),
    ({"max_batch": -1}, "max batch must be between 0"),
    ({"max_batch": 10**12}, "max batch must be between 0"),
    ({"instances": 0}, "instances must be between 1 and 1024"),
    ({"backend": "tensorrt"}, "tensorrt backend serves a TensorRT engine"),
    ({"backend": "tflite"}, "unknown backend"),
])
def test_bad_options_are_refused(onnx_file, tmp_path, kwargs, match):
    with pytest.raises(BadInput, match=match):
        package(onnx_file, tmp_path, "tiny", **kwargs)


def test_run_directory_cannot_use_the_onnxruntime_backend(trained_run, tmp_path):
    with pytest.raises(BadInput, match="onnxruntime backend serves an ONNX file"):
        package(trained_run.path, tmp_path, "m", backend="onnxruntime")


def test_an_unknown_config_field_fails_triton_schema_validation():
    pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient is not installed")
    good = cfg.render({"name": "m", "backend": "python", "max_batch_size": 4})
    assert cfg.validate(good) is True
    with pytest.raises(CheckFailed, match="ModelConfig schema"):
        cfg.validate(good + "max_batch: 4\n")


def test_readme_has_the_exact_tritonserver_command_and_a_runnable_client_example(onnx_file, tmp_path):
    result = package(onnx_file, tmp_path / "repo", "tiny")
    readme = result.readme.read_text()
    repo = (tmp_path / "repo").resolve()
    assert f"tritonserver --model-repository={repo} --model-control-mode=explicit --load-model=tiny" in readme
    client = readme.split("```python\n")[1].split("```")[0]
    compile(client, "README client", "exec")
    assert 'InferInput("x", list(value.shape), "FP32")' in client and 'client.infer("tiny", inputs)' in client
    assert 'np.random.rand(2, 8)' in client
    assert '("output", "router.index", "router.probs",)' in client  # every output, each router's decisions


def test_cli_package_json_reports_the_repository(cli, onnx_file, tmp_path):
    code, out, err = cli("package", onnx_file, "--repository", tmp_path, "--name", "tiny", "--dynamic-batching",
                         "--preferred-batch", "4,8", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["backend"] == "onnxruntime" and result["validated"] is True
    assert result["config"]["dynamic_batching"]["preferred_batch_size"] == [4, 8]
    assert (tmp_path / "tiny" / "config.pbtxt").is_file()


@pytest.mark.parametrize("args, match", [
    (["--name", "my model"], "model name 'my model' is not valid"),
    (["--name", "tiny", "--preferred-batch", "8,x", "--dynamic-batching"], "positive integer, got 'x'"),
    (["--name", "tiny", "--preferred-batch", "0"], "preferred batch sizes: batch size must be a positive integer, got '0'"),
    (["--name", "tiny", "--preferred-batch", "8,-4", "--dynamic-batching"], "positive integer, got '-4'"),
])
def test_cli_package_bad_input_is_one_line_exit_2(cli, onnx_file, tmp_path, args, match):
    assert_one_line_error(*cli("package", onnx_file, "--repository", tmp_path, *args)[::2], 2, match)


def test_cli_package_existing_model_without_force_is_one_line_exit_2(cli, onnx_file, tmp_path):
    package(onnx_file, tmp_path, "tiny")
    code, _, err = cli("package", onnx_file, "--repository", tmp_path, "--name", "tiny")
    assert_one_line_error(code, err, 2, "already exists; replace it with force")
    code, _, err = cli("package", onnx_file, "--repository", tmp_path, "--name", "tiny", "--force")
    assert code == 0, err


def test_cli_max_batch_above_engine_profile_is_one_line_exit_2(cli, fake_engine, tmp_path):
    code, _, err = cli("package", fake_engine, "--repository", tmp_path / "repo", "--name", "trt", "--max-batch", "33")
    assert_one_line_error(code, err, 2, "above the engine's optimisation profile")


@pytest.mark.parametrize("content", [b"", b"hello, not a model\n"], ids=["empty", "text"])
@pytest.mark.parametrize("force", [[], ["--force"]], ids=["", "force"])
def test_cli_package_of_an_empty_or_text_onnx_file_is_one_line_exit_2(cli, tmp_path, content, force):
    model = tmp_path / "empty.onnx"
    model.write_bytes(content)
    code, _, err = cli("package", model, "--repository", tmp_path / "repo", "--name", "m3", *force)
    assert_one_line_error(code, err, 2, "not an ONNX model (or is truncated)")
    assert not (tmp_path / "repo" / "m3").exists()


@pytest.mark.parametrize("manifest", [{"tensorrt": "10.8"}, {"tensorrt": "10.8", "io": {"inputs": []}},
                                      {"tensorrt": "10.8", "io": {"inputs": [{"name": "x"}], "outputs": []}}],
                         ids=["no-io", "no-outputs", "bad-tensor"])
def test_cli_package_of_an_engine_whose_manifest_lacks_io_is_one_line_exit_2(cli, tmp_path, manifest):
    engine = tmp_path / "fake4.plan"
    engine.write_bytes(b"engine bytes")
    (tmp_path / "fake4.plan.json").write_text(json.dumps(manifest))
    code, _, err = cli("package", engine, "--repository", tmp_path / "repo", "--name", "m3")
    assert_one_line_error(code, err, 2, "not a deploytool engine manifest")


def test_engine_manifest_profile_without_max_is_refused_not_a_key_error(fake_engine, tmp_path):
    from deploytool.artifacts import manifest_path

    manifest = json.loads(manifest_path(fake_engine).read_text())
    del manifest["profile"]["x"]["max"]
    manifest_path(fake_engine).write_text(json.dumps(manifest))
    with pytest.raises(BadInput, match="profile of 'x' lacks integer min, opt and max shapes"):
        package(fake_engine, tmp_path / "repo", "trt")


def test_preferred_batch_sizes_may_be_given_as_text_and_none_at_all(onnx_file, tmp_path):
    result = package(onnx_file, tmp_path / "a", "tiny", dynamic_batching=True, preferred_batch="4, 8")
    assert result.config["dynamic_batching"]["preferred_batch_size"] == [4, 8]
    result = package(onnx_file, tmp_path / "b", "tiny", dynamic_batching=True, preferred_batch="")
    assert "preferred_batch_size" not in result.config["dynamic_batching"]


def two_router_onnx(path):
    """image [batch, 1, 8, 8] and meta [batch, 4] -> output [batch, 3], with two routers: `image_router`
    (on the flattened image) and `meta_router` (on meta), each with its index and probs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    weights = {"w": (68, 3), "ri": (64, 4), "rm": (4, 2)}
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n) for n, s in weights.items()]
    inits.append(numpy_helper.from_array(np.array([0, 64], np.int64), "flat"))
    nodes = [helper.make_node("Reshape", ["image", "flat"], ["pixels"]),
             helper.make_node("Concat", ["pixels", "meta"], ["both"], axis=1),
             helper.make_node("MatMul", ["both", "w"], ["output"])]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3])]
    for router, source, weight, experts in (("image_router", "pixels", "ri", 4), ("meta_router", "meta", "rm", 2)):
        nodes += [helper.make_node("MatMul", [source, weight], [f"{router}_logits"]),
                  helper.make_node("Softmax", [f"{router}_logits"], [f"{router}.probs"], axis=-1),
                  helper.make_node("ArgMax", [f"{router}.probs"], [f"{router}.index"], axis=-1, keepdims=0)]
        outputs += [helper.make_tensor_value_info(f"{router}.index", TensorProto.INT64, ["batch"]),
                    helper.make_tensor_value_info(f"{router}.probs", TensorProto.FLOAT, ["batch", experts])]
    graph = helper.make_graph(
        nodes, "two-routers", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8]),
                               helper.make_tensor_value_info("meta", TensorProto.FLOAT, ["batch", 4])],
        outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(sign(model, [("image_router", 4), ("meta_router", 2)]), str(path))
    return path


def test_config_has_every_input_and_each_routers_index_and_probs(tmp_path):
    result = package(two_router_onnx(tmp_path / "two.onnx"), tmp_path / "repo", "two")
    config = parse(result.model_dir)
    assert [(t.name, list(t.dims)) for t in config.input] == [("image", [1, 8, 8]), ("meta", [4])]
    assert [(t.name, dtype_name(t.data_type), list(t.dims)) for t in config.output] == [
        ("output", "TYPE_FP32", [3]),
        ("image_router.index", "TYPE_INT64", [1]), ("image_router.probs", "TYPE_FP32", [4]),
        ("meta_router.index", "TYPE_INT64", [1]), ("meta_router.probs", "TYPE_FP32", [2])]
    client = result.readme.read_text().split("```python\n")[1].split("```")[0]
    compile(client, "README client", "exec")
    assert 'InferInput("image", list(value.shape), "FP32")' in client and "np.random.rand(2, 1, 8, 8)" in client
    assert 'InferInput("meta", list(value.shape), "FP32")' in client and "np.random.rand(2, 4)" in client


def test_a_model_without_a_deploytool_router_is_refused_and_nothing_is_written(tmp_path):
    import onnx

    model = onnx.load(str(tiny_onnx(tmp_path / "m.onnx")))
    del model.metadata_props[:]  # a hand-built or foreign model: no signature, so no router
    onnx.save(model, str(tmp_path / "plain.onnx"))
    with pytest.raises(BadInput, match="no deploytool router"):
        package(tmp_path / "plain.onnx", tmp_path / "repo", "plain")
    assert not (tmp_path / "repo" / "plain").exists()


def test_cli_package_into_the_run_it_packages_is_refused_even_with_force(cli, trained_run, tmp_path):
    import shutil

    run = tmp_path / "parent" / "run"
    shutil.copytree(trained_run.path, run)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, _, err = cli("package", run, "--repository", run.parent, "--name", run.name, "--force")
    assert_one_line_error(code, err, 2, "holds the input")
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]


def test_cli_package_with_an_absurd_max_batch_is_one_line_exit_2(cli, onnx_file, tmp_path):
    code, _, err = cli("package", onnx_file, "--repository", tmp_path, "--name", "tiny", "--max-batch", "1000000000000")
    assert_one_line_error(code, err, 2, "max batch must be between 0")
    assert list(tmp_path.iterdir()) == []
