"""Hostile input to `deploytool verify` and the feeds every command reads (items 7, 9, 14, 17, 19 of
issue 18). Two copies of one ONNX model compared on onnxruntime: no torch, no training."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import assert_one_line_error
from deploytool.artifacts import open_artifact
from deploytool.errors import BadInput
from deploytool.feeds import load_feed, sample_feed
from deploytool.parity import verify

from .conftest import no_input_onnx


def _pair(path):
    twin = path.with_name("twin.onnx")
    shutil.copyfile(path, twin)
    return [path, twin]


def test_a_huge_sample_count_on_made_up_inputs_is_bad_input_before_any_allocation(tiny):
    with pytest.raises(BadInput, match="made up"):
        verify(_pair(tiny), backends="onnxruntime", samples=100_000_000)


def test_made_up_inputs_of_a_huge_static_dim_are_refused_by_size(tmp_path):
    from .conftest import wide_onnx

    signature = open_artifact(wide_onnx(tmp_path / "wide.onnx", 2_000_000_000)).signature
    with pytest.raises(BadInput, match="GiB"):
        sample_feed(signature, samples=4)


def test_a_verify_of_zero_tokens_is_refused_not_passed(tokens, tmp_path):
    data = tmp_path / "empty.npz"
    np.savez(data, x=np.zeros((4, 0, 4), np.float32))
    with pytest.raises(BadInput, match="no positions"):
        verify(_pair(tokens), backends="onnxruntime", data=str(data))


def test_a_graph_without_inputs_is_bad_input_in_verify(tmp_path):
    with pytest.raises(BadInput, match="no inputs"):
        verify(_pair(no_input_onnx(tmp_path / "none.onnx")), backends="onnxruntime")


# --- 19. one feed check: verify is as strict as load ---------------------------------------------------

def test_extra_arrays_in_a_npz_are_refused(tiny, tmp_path):
    data = tmp_path / "extra.npz"
    np.savez(data, x=np.zeros((4, 8), np.float32), z=np.zeros(4))
    with pytest.raises(BadInput, match=r"holds the arrays \['x', 'z'\]"):
        verify(_pair(tiny), backends="onnxruntime", data=str(data))


def test_float64_arrays_are_refused_as_load_refuses_them(tiny, tmp_path):
    data = tmp_path / "f64.npz"
    np.savez(data, x=np.zeros((4, 8)))
    with pytest.raises(BadInput, match="has dtype float64, the model takes float32"):
        verify(_pair(tiny), backends="onnxruntime", data=str(data))
    signature = open_artifact(tiny).signature
    with pytest.raises(BadInput, match="dtype float64"):
        load_feed({"x": np.zeros((4, 8))}, signature)


def test_a_data_sets_labels_beside_the_inputs_are_still_taken(tiny, tmp_path):
    data = tmp_path / "labelled.npz"
    np.savez(data, x=np.zeros((4, 8), np.float32), y=np.zeros(4, int))
    label, feed = load_feed(str(data), open_artifact(tiny).signature)
    assert label == "labelled.npz" and feed["x"].shape == (4, 8)


def test_out_of_range_ids_in_data_are_refused_by_verify(embedding, tmp_path):
    data = tmp_path / "ids.npz"
    np.savez(data, ids=np.array([[1, 2], [3, 10]]))
    with pytest.raises(BadInput, match="ids 0..9"):
        verify(_pair(embedding), backends="onnxruntime", data=str(data))
    np.savez(data, ids=np.array([[1, 2], [3, -4]]))
    with pytest.raises(BadInput, match="negative id -4"):
        verify(_pair(embedding), backends="onnxruntime", data=str(data))


def test_the_one_feed_check_is_what_load_feed_ends_with(embedding):
    from deploytool.feeds import check_feed

    signature = open_artifact(embedding).signature
    with pytest.raises(BadInput, match="non-integral"):
        check_feed(signature, {"ids": [[0.5, 1]]})
    with pytest.raises(BadInput, match="non-integral"):
        load_feed({"ids": [[0.5, 1]]}, signature)


# --- 17. messages that name the real problem -------------------------------------------------------------

def test_a_npz_with_other_names_says_what_the_model_takes(tokens, tmp_path):
    data = tmp_path / "named.npz"
    np.savez(data, inputs=np.zeros((4, 7, 4), np.float32))
    with pytest.raises(BadInput) as info:
        verify(_pair(tokens), backends="onnxruntime", data=str(data))
    assert "'inputs'" in str(info.value) and "x: float32[batch, tokens, 4]" in str(info.value)


def test_two_different_models_are_not_blamed_on_a_checkpoint(tiny, tokens):
    with pytest.raises(BadInput) as info:
        verify([tiny, tokens], backends="onnxruntime")
    assert "checkpoint" not in str(info.value) and "not exports of one model" in str(info.value)


# --- 14. a run's config.json of the wrong types ------------------------------------------------------------

@pytest.mark.parametrize("config", [{"dataset": "digits", "data_options": "x"}, {"dataset": 5},
                                    {"dataset": "digits", "seed": "x"}])
def test_a_run_config_of_the_wrong_types_is_bad_input(tiny, config):
    with pytest.raises(BadInput, match="config.json"):
        sample_feed(open_artifact(tiny).signature, run_config=config)


def test_data_options_that_are_not_a_table_are_bad_input(tiny):
    with pytest.raises(BadInput, match="data_options must be a table"):
        load_feed("digits", open_artifact(tiny).signature, data_options="x")


def test_cli_verify_of_a_symlink_loop_is_one_line_exit_2(cli, loop, tiny):
    code, _, err = cli("verify", loop, tiny, "--backends", "onnxruntime")
    assert_one_line_error(code, err, 2, "symlink loop")


def test_cli_verify_with_a_huge_sample_count_is_one_line_exit_2(cli, tiny):
    code, _, err = cli("verify", *_pair(tiny), "--backends", "onnxruntime", "-n", "100000000")
    assert_one_line_error(code, err, 2, "made-up samples")
