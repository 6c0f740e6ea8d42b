"""`deploytool bench` and `deploytool.bench` as a user meets them: figures, histograms, plot, skips, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx_models import TOKEN_ROUTERS, token_onnx

from conftest import assert_one_line_error
from deploytool.deps import available

FAST = ("--warmup-ms", "10", "--duration-s", "0.05", "--min-iters", "5")


@pytest.fixture(scope="module")
def onnx_model(trained_run, tmp_path_factory):
    from deploytool.export.onnx import export_onnx

    return export_onnx(trained_run.path, tmp_path_factory.mktemp("onnx") / "model.onnx", validate=False).path


def test_bench_of_two_backends_writes_every_figure_and_the_machine_to_json_and_a_png(cli, trained_run, onnx_model,
                                                                                   tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "latency.png"
    code, stdout, err = cli("bench", onnx_model, "--checkpoint", trained_run.path, "--backends", "torch,onnxruntime",
                            "--batch-sizes", "1,8", *FAST, "--json", out, "--plot", png, "--quiet")
    assert code == 0, err
    result = json.loads(out.read_text())
    assert [(ln["backend"], ln["batch_size"]) for ln in result["lines"]] == [
        ("torch", 1), ("onnxruntime", 1), ("torch", 8), ("onnxruntime", 8)]
    for ln in result["lines"]:
        assert ln["min_ms"] <= ln["median_ms"] <= ln["p90_ms"] <= ln["p95_ms"] <= ln["p99_ms"] <= ln["max_ms"]
        assert ln["iterations"] >= 5 and ln["samples_per_s"] == pytest.approx(ln["batch_size"] * ln["queries_per_s"])
        assert list(ln["histograms"]) == ["routed.router"]
        assert sum(ln["histograms"]["routed.router"]) >= 4 * 8  # the whole feed cycle, as this backend routed it
    torch1, ort1 = result["lines"][:2]
    assert torch1["ratio"] == 1.0 and ort1["ratio"] == pytest.approx(ort1["median_ms"] / torch1["median_ms"])
    assert result["machine"]["cores"] >= 1 and result["machine"]["cpu"]
    assert {"torch", "onnxruntime", "numpy"} <= set(result["machine"]["versions"])
    assert result["date"] and result["inputs"].startswith("digits")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "latency (us)" in stdout and "ratio" in stdout


def test_routing_patterns_show_the_measured_expert_histogram(trained_run):
    from deploytool import bench

    result = bench(trained_run.path, backends=["torch-dense", "torch-sparse"], batch_sizes=[16],
                   routing=["uniform", "single"], warmup_ms=5, duration_s=0.03, min_iters=3, progress=False)
    hist = {(ln.backend, ln.routing): ln.histograms["routed.router"] for ln in result.lines}
    uniform = hist[("torch-dense", "uniform")]
    assert max(uniform) - min(uniform) <= 1 and sum(uniform) == 32
    assert sorted(hist[("torch-dense", "single")])[:-1] == [0] * (len(uniform) - 1)
    assert hist[("torch-sparse", "single")] == hist[("torch-dense", "single")]  # same routing in both dispatches
    assert result.to_dict()["lines"][0]["histograms"] == {"routed.router": uniform}
    assert result.settings["router"] == "routed.router"


def test_unavailable_backend_is_skipped_with_its_reason(cli, trained_run, tmp_path):
    out = tmp_path / "b.json"
    code, stdout, err = cli("bench", trained_run.path, "--backends", "torch,tensorrt", "--batch-sizes", "4", *FAST,
                            "--json", out, "--quiet")
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["backends"] == ["torch"] and "engine" in result["skipped"]["tensorrt"]
    assert "skipped tensorrt:" in stdout


@pytest.mark.skipif(available("tensorrt"), reason="TensorRT is installed here, so the backend is available")
def test_only_backend_unavailable_exits_3(cli, tmp_path):
    engine = _engine_with_profile(tmp_path, 8)  # whole, with its manifest: only TensorRT is missing
    code, _, err = cli("bench", engine, "--backends", "tensorrt", "--batch-sizes", "1", *FAST)
    assert code == 3, err
    assert "Traceback" not in err and err.startswith("error:")


def _engine_with_profile(tmp_path, max_batch: int):
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"engine bytes")
    (tmp_path / "model.plan.json").write_text(json.dumps(
        {"tensorrt": "10.8", "profile": {"x": {"min": [1, 64], "opt": [8, 64], "max": [max_batch, 64]}},
         "io": {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 64]}],
                "outputs": [{"name": "index", "dtype": "int64", "shape": [-1]}]}}))
    return engine


@pytest.mark.parametrize("args, match", [
    (["--backends", "torch,tensorflow"], "unknown backend 'tensorflow'"),
    (["--backends", "torch,onnxruntime,torch"], "backend 'torch' is given twice"),
    (["--batch-sizes", "0"], "batch size must be a positive integer, got '0'"),
    (["--batch-sizes", "1,-8"], "positive integer, got '-8'"),
    (["--batch-sizes", "1.5"], "positive integer, got '1.5'"),
    (["--batch-sizes", "eight"], "positive integer"),
    (["--duration-s", "0"], "duration_s must be a number > 0"),
    (["--min-iters", "0"], "min_iters"),
    (["--min-iters", "1000000000"], "min_iters must be at most 1,000,000"),
    (["--warmup-ms", "inf"], "warmup_ms must be a number >= 0"),
    (["--duration-s", "inf"], "duration_s must be a number > 0"),
    (["--duration-s", "nan"], "duration_s must be a number > 0"),
    (["--seed", "-1"], "seed must be a non-negative integer"),
    (["--routing", "zipf"], "unknown routing pattern"),
    (["--json", "no/such/dir/out.json"], "does not exist"),
    (["--plot", "no/such/dir/p.png"], "does not exist"),
])
def test_bad_option_is_one_line_exit_2(cli, trained_run, tmp_path, monkeypatch, args, match):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("bench", trained_run.path, *FAST, *args)  # later options win over FAST's
    assert_one_line_error(code, err, 2, match)


def test_bad_target_is_one_line_exit_2(cli, tmp_path):
    code, _, err = cli("bench", tmp_path / "missing.onnx")
    assert_one_line_error(code, err, 2, "does not exist")
    (tmp_path / "notes.txt").write_text("hello")
    code, _, err = cli("bench", tmp_path / "notes.txt")
    assert_one_line_error(code, err, 2, "neither a run directory, an .onnx file nor a TensorRT engine")
    code, _, err = cli("bench", tmp_path)
    assert_one_line_error(code, err, 2, "a directory without config.json")


def test_upper_case_onnx_suffix_is_benched_as_an_onnx_model(cli, onnx_model, tmp_path):
    shouting = tmp_path / "MODEL.ONNX"
    shouting.write_bytes(onnx_model.read_bytes())
    out = tmp_path / "b.json"
    code, _, err = cli("bench", shouting, "--backends", "onnxruntime", "--batch-sizes", "2", *FAST, "--json", out,
                       "--quiet")
    assert code == 0, err
    assert json.loads(out.read_text())["kind"] == "onnx"


def _change_weights(run_dir):
    """Change a run's weights in place, as retraining would: same shapes, another model."""
    from deploytool.io import WEIGHTS_FILE, load_weights, save_weights

    weights = load_weights(run_dir / WEIGHTS_FILE)
    save_weights(run_dir / WEIGHTS_FILE, {k: v + 1.0 if v.is_floating_point() else v for k, v in weights.items()})


def test_a_run_found_in_the_onnx_metadata_that_no_longer_matches_it_is_not_timed(cli, trained_run, tmp_path):
    import shutil

    from deploytool.export.onnx import export_onnx

    run = tmp_path / "run"
    shutil.copytree(trained_run.path, run)
    model = export_onnx(run, tmp_path / "model.onnx", validate=False).path  # records the copy as its source
    _change_weights(run)
    out = tmp_path / "b.json"
    code, _, err = cli("bench", model, "--backends", "torch,onnxruntime", "--batch-sizes", "2", *FAST,
                            "--json", out, "--quiet")
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["backends"] == ["onnxruntime"]
    assert "no longer matches" in result["skipped"]["torch"] and "\n" not in result["skipped"]["torch"]
    # given explicitly, the run is the user's choice: timed, with a note
    code, _, err = cli("bench", model, "--checkpoint", run, "--backends", "torch,onnxruntime", "--batch-sizes", "2",
                       *FAST, "--json", out, "--quiet")
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["backends"] == ["torch", "onnxruntime"]
    assert any("sha256 differs" in note for note in result["notes"])


def test_onnx_model_without_a_deploytool_router_is_one_line_exit_2(cli, tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["output"]),
         helper.make_node("ArgMax", ["output"], ["index"], axis=-1, keepdims=0)], "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("index", TensorProto.INT64, ["batch"])], [w])
    model = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    code, _, err = cli("bench", model, "--backends", "onnxruntime", "--batch-sizes", "1", *FAST)
    assert_one_line_error(code, err, 2, "has no deploytool router")


def test_batch_above_the_engine_profile_says_the_maximum(cli, tmp_path):
    engine = _engine_with_profile(tmp_path, 64)
    code, _, err = cli("bench", engine, "--backends", "tensorrt", "--batch-sizes", "1,128", *FAST)
    assert_one_line_error(code, err, 2, "profile maximum 64")


@pytest.mark.parametrize("manifest", [[], {"tensorrt": "10.8", "io": {}}], ids=["list", "no-io"])
def test_engine_with_a_malformed_manifest_is_one_line_exit_2(cli, tmp_path, manifest):
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"engine bytes")
    (tmp_path / "model.plan.json").write_text(json.dumps(manifest))
    code, _, err = cli("bench", engine, "--backends", "tensorrt", "--batch-sizes", "1", *FAST)
    assert_one_line_error(code, err, 2, "not a deploytool engine manifest")


def test_static_batch_model_runs_at_its_batch_and_refuses_any_other_naming_it(cli, trained_run, tmp_path):
    from deploytool.export.onnx import export_onnx

    static8 = export_onnx(trained_run.path, tmp_path / "static8.onnx", static_batch=8, validate=False).path
    out = tmp_path / "b.json"
    code, _, err = cli("bench", static8, "--backends", "torch,onnxruntime", "--batch-sizes", "8", *FAST,
                       "--json", out, "--quiet")
    assert code == 0, err
    assert [(ln["backend"], ln["batch_size"]) for ln in json.loads(out.read_text())["lines"]] == [
        ("torch", 8), ("onnxruntime", 8)]
    code, _, err = cli("bench", static8, "--backends", "onnxruntime", "--batch-sizes", "1,8", *FAST)
    assert_one_line_error(code, err, 2, "static batch of 8")
    assert "batch size 8 only" in err


def test_single_batch_plot_draws_the_p99_and_the_p90_p99_band(tmp_path, monkeypatch):
    """One batch size leaves no line to draw: the p99 needs a marker and the band a width."""
    import matplotlib

    from deploytool.benchmark.plot import draw_latency, plot_latency
    from deploytool.benchmark.run import BenchResult, Line
    from deploytool.benchmark.stats import summarize

    stats = summarize(np.arange(1, 101) * 1_000_000, batch_size=8)  # median 50.5 ms, p90 90, p99 99
    result = BenchResult("m.onnx", "onnx", ["onnxruntime"], {}, [Line("onnxruntime", 8, "uniform", stats, 1.0,
                                                                      [8])], {}, "random", {"cpu": "cpu"}, "2025")
    switched = []
    monkeypatch.setattr(matplotlib, "use", switched.append)
    plot_latency(result, tmp_path / "p.png")
    assert switched == [], "plotting switched the caller's matplotlib backend"
    ax = draw_latency(result).axes[0]
    p99 = [ln for ln in ax.lines if list(ln.get_ydata()) == [stats.p99_ms]]
    assert p99 and p99[0].get_marker() not in (None, "", "None", " ")
    spans = [(c.get_datalim(ax.transData), max(c.get_linewidths(), default=0)) for c in ax.collections]
    lo, hi = stats.p90_ms * (1 + 1e-9), stats.p99_ms * (1 - 1e-9)  # the log scale round-trips inexactly
    assert any(box.y0 <= lo and box.y1 >= hi and (box.width > 0 or width > 0)
               for box, width in spans), "the p90..p99 band is not drawn with any width"
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def token_model(tmp_path_factory):
    """The token-level model, and a pool of 64 samples of 7 tokens in which every token of a sample has the
    same sign of feature 0 (so layers.0 routes the whole sample alike) and of feature 1, in all 4 mixes."""
    folder = tmp_path_factory.mktemp("tokens")
    x = np.abs(np.random.default_rng(1).normal(size=(64, 7, 4))).astype(np.float32) + 0.1
    x[:, :, 0] *= np.where(np.arange(64) % 2, 1, -1)[:, None]
    x[:, :, 1] *= np.where(np.arange(64) // 2 % 2, 1, -1)[:, None]
    np.savez(folder / "pool.npz", x=x)
    return token_onnx(folder / "tokens.onnx"), folder / "pool.npz"


@pytest.mark.parametrize("steered", [None, *TOKEN_ROUTERS])
def test_token_level_routers_each_get_a_histogram_and_router_picks_the_one_patterns_steer(cli, token_model,
                                                                                        tmp_path, steered):
    model, pool = token_model
    out = tmp_path / "b.json"
    code, stdout, err = cli("bench", model, "--backends", "onnxruntime", "--batch-sizes", "16", "--routing",
                            "uniform,single", "--data", pool, *FAST, "--json", out,
                            *(["--router", steered] if steered else []))
    assert code == 0, err
    result = json.loads(out.read_text())
    steered = steered or TOKEN_ROUTERS[0]  # the first router by default
    other = next(r for r in TOKEN_ROUTERS if r != steered)
    assert result["settings"]["router"] == steered and steered in result["inputs"]
    lines = {ln["routing"]: ln for ln in result["lines"]}
    for ln in lines.values():
        assert list(ln["histograms"]) == list(TOKEN_ROUTERS)
        assert all(sum(h) == 16 * 7 for h in ln["histograms"].values())  # one decision per token
    assert lines["uniform"]["histograms"][steered] == [56, 56]
    single = lines["single"]["histograms"]
    assert sorted(single[steered]) == [0, 16 * 7]  # every token of every sample to one expert
    assert min(single[other]) > 0  # the other router is not steered: its experts both still get tokens
    assert f"decisions of {steered}" in stdout


def test_an_unknown_router_path_is_one_line_exit_2(cli, token_model):
    model, pool = token_model
    code, _, err = cli("bench", model, "--backends", "onnxruntime", "--batch-sizes", "4", "--data", pool, *FAST,
                       "--router", "layers.2.moe.router")
    assert_one_line_error(code, err, 2, "no router 'layers.2.moe.router'")
    assert "layers.0.moe.router" in err  # it names the routers there are


def test_json_or_plot_onto_an_input_is_refused_and_the_files_are_left_alone(cli, trained_run, onnx_model, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run.path, run)
    model = tmp_path / "m.onnx"
    shutil.copyfile(onnx_model, model)
    before = {p: p.read_bytes() for p in (model, *run.iterdir()) if p.is_file()}
    # paths with the output's own suffix (a model or weights file fails the suffix check before this one)
    for target, option, path in ((model, "--json", run / "metrics.json"), (model, "--plot", run / "routing.png"),
                                 (run, "--plot", run / "routing.png"), (run, "--json", run / "config.json")):
        code, _, err = cli("bench", target, "--checkpoint", run, "--backends", "torch,onnxruntime", "--batch-sizes",
                           "1", *FAST, option, path)
        assert_one_line_error(code, err, 2, "would replace the input")
    assert {p: p.read_bytes() for p in before} == before


def test_a_batch_whose_inputs_exceed_a_gib_is_refused_before_any_feed_is_built(cli, token_model):
    model, pool = token_model
    code, _, err = cli("bench", model, "--backends", "onnxruntime", "--batch-sizes", "1,20000000", "--data", pool,
                       *FAST)
    assert_one_line_error(code, err, 2, "batch size 20000000 needs 2.1 GiB of inputs per call")
