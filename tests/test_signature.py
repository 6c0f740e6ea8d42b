"""The model signature, the feed loader and the artifact opener: the facts every command reads."""

from __future__ import annotations

import numpy as np
import pytest

from deploytool.errors import BadInput
from deploytool.feeds import load_feed, random_feed
from deploytool.signature import ModelSignature, RouterMeta, TensorMeta, from_json, to_json

TOKENS = ModelSignature(
    inputs=(TensorMeta("x", "float32", ("batch", "tokens", 8)), TensorMeta("mask", "int64", ("batch", "tokens"))),
    outputs=(TensorMeta("logits", "float32", ("batch", 10)),
             TensorMeta("l0.router.index", "int64", ("batch", "tokens")),
             TensorMeta("l0.router.probs", "float32", ("batch", "tokens", 4))),
    routers=(RouterMeta("l0.router", 4, 0.02, "l0.router.index", "l0.router.probs"),),
    dim_examples={"batch": 2, "tokens": 6},
)
IMAGE = ModelSignature((TensorMeta("img", "float32", ("batch", 1, 8, 8)),), (), ())


def test_the_signature_survives_its_json_form():
    assert from_json(to_json(TOKENS), "test") == TOKENS


@pytest.mark.parametrize("text", ["{", "[]", '{"inputs": [{"name": "x"}]}', '{"outputs": []}'])
def test_a_malformed_signature_is_bad_input_naming_its_source(text):
    with pytest.raises(BadInput, match="m.onnx: its deploytool signature is unreadable"):
        from_json(text, "m.onnx")


def _feed(batch=3, tokens=5):
    return {"x": np.zeros((batch, tokens, 8), np.float32), "mask": np.ones((batch, tokens), np.int64)}


def test_a_feed_that_fits_passes_with_any_size_of_its_dynamic_dims():
    feed = TOKENS.check_feed(_feed(tokens=11))
    assert feed["x"].shape == (3, 11, 8) and feed["x"].flags.c_contiguous


@pytest.mark.parametrize("change, message", [
    (lambda f: f.pop("mask"), "do not match the model's inputs"),
    (lambda f: f.update(extra=f["mask"]), "do not match the model's inputs"),
    (lambda f: f.update(x=f["x"].astype(np.float64)), "dtype float64, the model takes float32"),
    (lambda f: f.update(x=f["x"][0]), "add a batch dim"),
    (lambda f: f.update(x=np.zeros((3, 5, 7), np.float32)), "dim 2 differs"),
    (lambda f: f.update(mask=f["mask"][:2]), "different batch sizes"),
    (lambda f: f.update(x=f["x"][:0], mask=f["mask"][:0]), "empty batch"),
])
def test_a_feed_that_does_not_fit_names_what_the_model_takes(change, message):
    feed = _feed()
    change(feed)
    with pytest.raises(BadInput, match=message) as info:
        TOKENS.check_feed(feed)
    assert "\n" not in str(info.value)


def test_nan_or_inf_in_a_feed_names_the_samples():
    feed = _feed()
    feed["x"][1, 2, 3] = np.inf
    with pytest.raises(BadInput, match=r"NaN or inf in sample\(s\) 1"):
        TOKENS.check_feed(feed)


def test_static_batch_is_read_from_the_inputs():
    fixed = ModelSignature((TensorMeta("x", "float32", (4, 8)),), ())
    assert fixed.static_batch == 4 and TOKENS.static_batch is None


def test_a_signature_without_routers_is_refused_and_one_missing_its_outputs_too():
    with pytest.raises(BadInput, match="has no deploytool router"):
        IMAGE.require_router("m.onnx")
    broken = ModelSignature(TOKENS.inputs, TOKENS.outputs[:2], TOKENS.routers)
    with pytest.raises(BadInput, match="lacks the routing output"):
        broken.require_router("m.onnx")


def test_data_set_rows_are_reshaped_to_an_image_input():
    label, feed = load_feed("digits", IMAGE, samples=5)
    assert label == "digits held-out" and feed["img"].shape == (5, 1, 8, 8)


def test_rows_of_the_wrong_size_are_refused_naming_the_input():
    with pytest.raises(BadInput, match="input 'img' samples have shape"):
        load_feed(np.zeros((4, 63), np.float32), IMAGE)


def test_a_multi_input_model_takes_a_npz_of_named_arrays_and_refuses_one_array(tmp_path):
    path = tmp_path / "inputs.npz"
    np.savez(path, **_feed(batch=4))
    label, feed = load_feed(str(path), TOKENS)
    assert label == "inputs.npz" and feed["mask"].shape == (4, 5)
    with pytest.raises(BadInput, match="takes 2 inputs"):
        load_feed(np.zeros((4, 5, 8), np.float32), TOKENS)


def test_made_up_feeds_follow_the_signature_and_its_example_sizes():
    feed = random_feed(TOKENS, 7, seed=1)
    assert feed["x"].shape == (7, 6, 8) and feed["x"].dtype == np.float32
    assert feed["mask"].dtype == np.int64 and set(np.unique(feed["mask"])) <= {0, 1}
    assert TOKENS.check_feed(feed)
    np.testing.assert_array_equal(random_feed(TOKENS, 7, seed=1)["x"], feed["x"])
