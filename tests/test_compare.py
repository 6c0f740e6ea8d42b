"""Routing-aware parity between two output dicts (no backend involved)."""

from __future__ import annotations

import numpy as np
import pytest

from deploytool.compare import TOLERANCES, compare, default_tolerance, tie_margin
from deploytool.errors import BadInput


def _outputs(probs: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    probs = probs.astype(np.float32)
    return {"output": rng.standard_normal((len(probs), 3)).astype(np.float32),
            "index": probs.argmax(-1).astype(np.int64), "probs": probs}


def _probs(rows: int = 100, experts: int = 4, seed: int = 0) -> np.ndarray:
    logits = np.random.default_rng(seed).standard_normal((rows, experts)) * 3
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_identical_outputs_pass_with_zero_error():
    ref = _outputs(_probs())
    result = compare(ref, {k: v.copy() for k, v in ref.items()})
    assert result.passed
    assert all(o.max_abs == 0 and o.min_atol == 0 for o in result.outputs)
    assert result.routing.agreement == 100.0 and result.routing.flips == 0


def test_error_above_atol_fails_and_reports_the_smallest_passing_atol():
    ref = _outputs(_probs())
    cand = {k: v.copy() for k, v in ref.items()}
    cand["output"][5, 1] += 1e-3
    result = compare(ref, cand, atol=1e-5, rtol=0)
    out = next(o for o in result.outputs if o.name == "output")
    assert not result.passed and not out.passed
    assert out.max_abs == pytest.approx(1e-3, rel=1e-3)
    assert out.min_atol == pytest.approx(out.max_abs)
    assert compare(ref, cand, atol=out.min_atol * 1.01, rtol=0).passed


def test_flip_below_the_tolerance_margin_is_a_tie_break_not_a_failure():
    probs = _probs()
    probs[7] = [0.40, 0.40 - 1e-6, 0.1, 0.1 + 1e-6]  # top-2 margin 1e-6
    ref = _outputs(probs)
    cand = {k: v.copy() for k, v in ref.items()}
    cand["index"][7] = 1
    cand["output"][7] += 5.0  # another expert ran: that row's output legitimately differs
    result = compare(ref, cand, atol=1e-5, rtol=1e-4)
    assert result.passed, result.summary()
    assert result.routing.flips == 1 and result.routing.tie_breaks == 1 and result.routing.failures == 0
    assert result.routing.agreement == pytest.approx(99.0)
    assert next(o for o in result.outputs if o.name == "output").rows == 99


def test_flip_at_large_margin_fails():
    probs = _probs()
    probs[3] = [0.9, 0.05, 0.03, 0.02]
    ref = _outputs(probs)
    cand = {k: v.copy() for k, v in ref.items()}
    cand["index"][3] = 2
    result = compare(ref, cand)
    assert not result.passed
    assert result.routing.failures == 1 and result.routing.min_flip_margin == pytest.approx(0.85, abs=1e-6)
    bucket = next(b for b in result.routing.buckets if b["lo"] <= 0.85 < b["hi"])
    assert bucket["flips"] == 1
    assert "routing flips" in result.summary()


def test_tie_margin_grows_with_the_tolerance():
    assert tie_margin(*TOLERANCES["float16"]) > tie_margin(*TOLERANCES["float32"])


def test_default_tolerance_takes_the_least_precise_dtype():
    assert default_tolerance("float32", "float32") == TOLERANCES["float32"]
    assert default_tolerance("float32", "float16") == TOLERANCES["float16"]
    assert default_tolerance("bfloat16", "float16") == TOLERANCES["bfloat16"]
    atol16, rtol16 = TOLERANCES["float16"]
    atol32, rtol32 = TOLERANCES["float32"]
    assert atol16 > atol32 and rtol16 > rtol32


def test_float16_candidate_is_judged_by_float16_tolerance():
    ref = _outputs(_probs())
    cand = {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in ref.items()}
    assert not compare(ref, cand, atol=1e-5, rtol=1e-4).passed
    result = compare(ref, cand)
    assert result.passed, result.summary()
    assert next(o for o in result.outputs if o.name == "probs").atol == TOLERANCES["float16"][0]


def test_an_fp32_interface_computed_in_fp16_is_judged_by_the_compute_dtype():
    ref = _outputs(_probs())
    # what an fp32-interface engine lowered to fp16 returns: fp16 values in float32 arrays
    cand = {k: (v.astype(np.float16).astype(np.float32) if v.dtype == np.float32 else v) for k, v in ref.items()}
    assert not compare(ref, cand).passed  # float32 defaults are too tight for it
    result = compare(ref, cand, compute_dtypes=("float16",))
    assert result.passed, result.summary()
    assert {o.atol for o in result.outputs} == {TOLERANCES["float16"][0]}


def test_compare_runners_takes_the_tolerance_from_a_runner_computing_in_fp16():
    from deploytool.parity import compare_runners
    from deploytool.runners.base import Runner, TensorMeta

    ref = _outputs(_probs())

    class Fixed(Runner):
        backend = "fixed"

        def __init__(self, name, outputs, compute_dtype=None):
            super().__init__(name)
            self.outputs_, self.compute_dtype = outputs, compute_dtype

        def _meta(self, kind):
            return [TensorMeta("x", "float32", (None, 3))] if kind == "inputs" else []

        def _activate(self):
            pass

        def _infer(self, feed):
            return self.outputs_

    half = {k: (v.astype(np.float16).astype(np.float32) if v.dtype == np.float32 else v) for k, v in ref.items()}
    x = {"rows": np.zeros((100, 3), np.float32)}
    assert not compare_runners([Fixed("a", ref), Fixed("b", half)], x)[0].passed
    assert compare_runners([Fixed("a", ref), Fixed("b", half, "float16")], x)[0].passed


def test_equal_infinities_have_zero_error_and_opposite_ones_fail():
    ref = _outputs(_probs())
    ref["output"][0, :2] = [np.inf, -np.inf]
    same = compare(ref, {k: v.copy() for k, v in ref.items()})
    out = next(o for o in same.outputs if o.name == "output")
    assert same.passed and out.max_abs == 0 and out.max_rel == 0 and out.min_atol == 0
    flipped = {k: v.copy() for k, v in ref.items()}
    flipped["output"][0, 0] = -np.inf
    out = next(o for o in compare(ref, flipped).outputs if o.name == "output")
    assert not out.passed and out.max_abs == np.inf


def test_nan_on_one_side_fails():
    ref = _outputs(_probs())
    cand = {k: v.copy() for k, v in ref.items()}
    cand["output"][0, 0] = np.nan
    out = next(o for o in compare(ref, cand).outputs if o.name == "output")
    assert not out.passed and out.max_abs == np.inf


def test_shape_mismatch_and_missing_output_fail_with_a_note():
    ref = _outputs(_probs())
    cand = dict(ref, output=ref["output"][:, :2])
    result = compare(ref, cand)
    assert not result.passed and "shape" in next(o for o in result.outputs if o.name == "output").note
    del cand["probs"]
    result = compare(ref, cand)
    assert not result.passed and any("probs" in n for n in result.notes)


def test_to_dict_is_plain_data():
    import json

    json.dumps(compare(_outputs(_probs()), _outputs(_probs())).to_dict())


@pytest.mark.parametrize("option, value", [("atol", -1.0), ("atol", float("nan")), ("rtol", -1e-9),
                                           ("rtol", float("nan")), ("atol", float("inf"))])
def test_negative_nan_or_infinite_tolerance_is_bad_input_not_a_verdict(option, value):
    ref = _outputs(_probs())
    with pytest.raises(BadInput, match=f"--{option} must be a finite number >= 0"):
        compare(ref, ref, **{option: value})
