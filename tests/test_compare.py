"""Routing-aware parity between two output dicts (no backend involved): every router judged on its own."""

from __future__ import annotations

import numpy as np
import pytest

from deploytool.compare import TOLERANCES, compare, default_tolerance, tie_margin
from deploytool.errors import BadInput
from deploytool.signature import RouterMeta, router_output_names

ROUTER = RouterMeta("routed.router", 4, 1.0, *router_output_names("routed.router"))
INDEX, PROBS = ROUTER.index, ROUTER.probs


def _outputs(probs: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    probs = probs.astype(np.float32)
    return {"output": rng.standard_normal((len(probs), 3)).astype(np.float32),
            INDEX: probs.argmax(-1).astype(np.int64), PROBS: probs}


def _probs(rows: int = 100, experts: int = 4, seed: int = 0) -> np.ndarray:
    logits = np.random.default_rng(seed).standard_normal((rows, experts)) * 3
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _copy(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in outputs.items()}


def _output(result, name="output"):
    return next(o for o in result.outputs if o.name == name)


def test_identical_outputs_pass_with_zero_error():
    ref = _outputs(_probs())
    result = compare(ref, _copy(ref), routers=[ROUTER])
    assert result.passed
    assert all(o.max_abs == 0 and o.min_atol == 0 for o in result.outputs)
    (routing,) = result.routing
    assert routing.router == "routed.router" and routing.agreement == 100.0 and routing.flips == 0
    assert routing.rows == 100
    # the index is judged as decisions, not as numbers; probs are compared as an output too
    assert {o.name for o in result.outputs} == {"output", PROBS}


def test_without_routers_the_index_is_compared_as_a_plain_output():
    ref = _outputs(_probs())
    result = compare(ref, _copy(ref))
    assert result.passed and result.routing == []
    assert {o.name for o in result.outputs} == {"output", INDEX, PROBS}


def test_error_above_atol_fails_and_reports_the_smallest_passing_atol():
    ref = _outputs(_probs())
    cand = _copy(ref)
    cand["output"][5, 1] += 1e-3
    result = compare(ref, cand, routers=[ROUTER], atol=1e-5, rtol=0)
    out = _output(result)
    assert not result.passed and not out.passed
    assert out.max_abs == pytest.approx(1e-3, rel=1e-3)
    assert out.min_atol == pytest.approx(out.max_abs)
    assert compare(ref, cand, routers=[ROUTER], atol=out.min_atol * 1.01, rtol=0).passed
    assert "outputs out of tolerance: output" in result.summary()


def test_flip_below_the_tolerance_margin_is_a_tie_break_not_a_failure():
    probs = _probs()
    probs[7] = [0.40, 0.40 - 1e-6, 0.1, 0.1 + 1e-6]  # top-2 margin 1e-6
    ref = _outputs(probs)
    cand = _copy(ref)
    cand[INDEX][7] = 1
    cand["output"][7] += 5.0  # another expert ran: that row's output legitimately differs
    result = compare(ref, cand, routers=[ROUTER], atol=1e-5, rtol=1e-4)
    assert result.passed, result.summary()
    (routing,) = result.routing
    assert routing.flips == 1 and routing.tie_breaks == 1 and routing.failures == 0
    assert routing.agreement == pytest.approx(99.0)
    assert _output(result).rows == 99


def test_flip_at_large_margin_fails():
    probs = _probs()
    probs[3] = [0.9, 0.05, 0.03, 0.02]
    ref = _outputs(probs)
    cand = _copy(ref)
    cand[INDEX][3] = 2
    result = compare(ref, cand, routers=[ROUTER])
    assert not result.passed
    (routing,) = result.routing
    assert routing.failures == 1 and routing.min_flip_margin == pytest.approx(0.85, abs=1e-6)
    bucket = next(b for b in routing.buckets if b["lo"] <= 0.85 < b["hi"])
    assert bucket["flips"] == 1
    assert "router routed.router: 1 decision flips" in result.summary()


# --- several routers -----------------------------------------------------------------------------

FIRST = RouterMeta("layers.0.moe.router", 4, 1.0, *router_output_names("layers.0.moe.router"))
SECOND = RouterMeta("layers.1.moe.router", 2, 0.5, *router_output_names("layers.1.moe.router"))


def _two_routers(rows: int = 60, tokens: int = 5) -> dict[str, np.ndarray]:
    """Outputs of a token-level model with two routers: decisions [rows, tokens], probs [rows, tokens, E]."""
    first = _probs(rows * tokens, 4, seed=1).reshape(rows, tokens, 4)
    second = _probs(rows * tokens, 2, seed=2).reshape(rows, tokens, 2)
    return {"logits": np.random.default_rng(3).standard_normal((rows, 3)).astype(np.float32),
            FIRST.index: first.argmax(-1).astype(np.int64), FIRST.probs: first.astype(np.float32),
            SECOND.index: second.argmax(-1).astype(np.int64), SECOND.probs: second.astype(np.float32)}


def test_every_router_is_judged_and_one_routers_flips_fail_on_their_own():
    ref = _two_routers()
    cand = _copy(ref)
    confident = np.argwhere(np.abs(ref[SECOND.probs][..., 0] - 0.5) > 0.2)
    rows = confident[:10]
    cand[SECOND.index][rows[:, 0], rows[:, 1]] ^= 1  # the second router picks the other expert there
    result = compare(ref, cand, routers=[FIRST, SECOND])
    assert not result.passed
    first, second = result.routing
    assert (first.router, second.router) == (FIRST.path, SECOND.path)
    assert first.passed and first.flips == 0 and first.rows == 60 * 5
    assert not second.passed and second.failures == len(rows) and second.rows == 60 * 5
    assert f"router {SECOND.path}" in result.summary() and f"router {FIRST.path}:" not in result.summary()
    # the other outputs are compared only on the samples where every router agrees
    assert _output(result, "logits").rows == 60 - len(np.unique(rows[:, 0]))


def test_a_router_missing_from_the_candidate_is_a_failure_not_a_silent_pass():
    ref = _two_routers()
    cand = _copy(ref)
    del cand[SECOND.index]
    result = compare(ref, cand, routers=[FIRST, SECOND])
    assert not result.passed and any(SECOND.index in n for n in result.notes)


def test_a_decision_of_another_shape_fails_that_router():
    ref = _two_routers()
    cand = dict(ref, **{FIRST.index: ref[FIRST.index][:, :4]})
    result = compare(ref, cand, routers=[FIRST, SECOND])
    assert not result.passed and not result.routing[0].passed and result.routing[1].passed


def test_a_large_flip_after_another_routers_tie_break_in_the_same_sample_is_not_a_failure():
    """A tie-break upstream runs another expert: everything after it in that sample may differ."""
    ref = _two_routers()
    ref[FIRST.probs][4, 2] = [0.4, 0.4 - 1e-7, 0.1, 0.1 + 1e-7]
    ref[FIRST.index][4, 2] = 0
    ref[SECOND.probs][4, 3] = [0.95, 0.05]
    ref[SECOND.index][4, 3] = 0
    cand = _copy(ref)
    cand[FIRST.index][4, 2] = 1      # tie-break
    cand[SECOND.index][4, 3] = 1     # consequence, at a large margin, in the same sample
    result = compare(ref, cand, routers=[FIRST, SECOND])
    assert result.passed, result.summary()
    assert result.routing[0].tie_breaks == 1 and result.routing[1].flips == 1 and result.routing[1].failures == 0
    cand[SECOND.index][9, 0] ^= 1     # the same flip in a sample without a tie fails
    ref[SECOND.probs][9, 0] = [0.9, 0.1] if ref[SECOND.index][9, 0] == 0 else [0.1, 0.9]
    assert compare(ref, cand, routers=[FIRST, SECOND]).routing[1].failures == 1


# --- tolerances ----------------------------------------------------------------------------------

def test_tie_margin_grows_with_the_tolerance():
    assert tie_margin(*TOLERANCES["float16"]) > tie_margin(*TOLERANCES["float32"])


def test_default_tolerance_takes_the_least_precise_dtype():
    assert default_tolerance("float32", "float32") == TOLERANCES["float32"]
    assert default_tolerance("float32", "float16") == TOLERANCES["float16"]
    assert default_tolerance("bfloat16", "float16") == TOLERANCES["bfloat16"]
    atol16, rtol16 = TOLERANCES["float16"]
    atol32, rtol32 = TOLERANCES["float32"]
    assert atol16 > atol32 and rtol16 > rtol32


def test_per_output_tolerances_apply_to_their_output_and_the_others_keep_the_default():
    ref = _outputs(_probs())
    ref["aux"] = np.ones((100, 2), np.float32)
    cand = _copy(ref)
    cand["output"][0, 0] += 0.01
    cand["aux"][0, 0] += 0.01
    assert not compare(ref, cand, routers=[ROUTER]).passed
    loose = compare(ref, cand, routers=[ROUTER], atol={"output": 0.02})
    assert _output(loose).passed and _output(loose).atol == 0.02
    assert not _output(loose, "aux").passed and _output(loose, "aux").atol == TOLERANCES["float32"][0]
    assert not loose.passed
    result = compare(ref, cand, routers=[ROUTER], atol={"output": 0.02, "aux": 0.02}, rtol={"output": 0.0})
    assert result.passed, result.summary()
    assert _output(result).rtol == 0.0 and _output(result, "aux").rtol == TOLERANCES["float32"][1]
    assert _output(result, PROBS).atol == TOLERANCES["float32"][0]


def test_a_routers_tolerance_is_the_one_given_to_its_probs():
    """A loose tolerance on a router's probs widens the margin its flips are forgiven at."""
    probs = _probs()
    probs[3] = [0.52, 0.48, 0.0, 0.0]  # margin 0.04
    ref = _outputs(probs)
    cand = _copy(ref)
    cand[INDEX][3] = 1
    assert not compare(ref, cand, routers=[ROUTER]).passed
    result = compare(ref, cand, routers=[ROUTER], atol={PROBS: 0.05})
    assert result.passed and result.routing[0].tie_breaks == 1


def test_float16_candidate_is_judged_by_float16_tolerance():
    ref = _outputs(_probs())
    cand = {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in ref.items()}
    assert not compare(ref, cand, routers=[ROUTER], atol=1e-5, rtol=1e-4).passed
    result = compare(ref, cand, routers=[ROUTER])
    assert result.passed, result.summary()
    assert _output(result, PROBS).atol == TOLERANCES["float16"][0]


def test_an_fp32_interface_computed_in_fp16_is_judged_by_the_compute_dtype():
    ref = _outputs(_probs())
    # what an fp32-interface engine lowered to fp16 returns: fp16 values in float32 arrays
    cand = {k: (v.astype(np.float16).astype(np.float32) if v.dtype == np.float32 else v) for k, v in ref.items()}
    assert not compare(ref, cand, routers=[ROUTER]).passed  # float32 defaults are too tight for it
    result = compare(ref, cand, routers=[ROUTER], compute_dtypes=("float16",))
    assert result.passed, result.summary()
    assert {o.atol for o in result.outputs} == {TOLERANCES["float16"][0]}


def test_compare_runners_takes_the_tolerance_from_a_runner_computing_in_fp16():
    from deploytool.comparator import compare_runners
    from deploytool.runners.base import Runner
    from deploytool.signature import ModelSignature, TensorMeta

    ref = _outputs(_probs())

    class Fixed(Runner):
        backend = "fixed"

        def __init__(self, name, outputs, compute_dtype=None):
            super().__init__(name)
            self.outputs_, self.compute_dtype = outputs, compute_dtype

        def _signature(self):
            return ModelSignature((TensorMeta("x", "float32", ("batch", 3)),),
                                  tuple(TensorMeta(k, v.dtype.name, ("batch", *v.shape[1:]))
                                        for k, v in self.outputs_.items()), (ROUTER,))

        def _activate(self):
            pass

        def _infer(self, feed):
            return self.outputs_

    half = {k: (v.astype(np.float16).astype(np.float32) if v.dtype == np.float32 else v) for k, v in ref.items()}
    inputs = {"rows": {"x": np.zeros((100, 3), np.float32)}}
    assert not compare_runners([Fixed("a", ref), Fixed("b", half)], inputs)[0].passed
    (result,) = compare_runners([Fixed("a", ref), Fixed("b", half, "float16")], inputs)
    assert result.passed and [r.router for r in result.routing] == [ROUTER.path]


# --- non-finite values -----------------------------------------------------------------------------

def test_equal_infinities_have_zero_error_and_opposite_ones_fail():
    ref = _outputs(_probs())
    ref["output"][0, :2] = [np.inf, -np.inf]
    same = compare(ref, _copy(ref), routers=[ROUTER])
    out = _output(same)
    assert same.passed and out.max_abs == 0 and out.max_rel == 0 and out.min_atol == 0
    flipped = _copy(ref)
    flipped["output"][0, 0] = -np.inf
    out = _output(compare(ref, flipped, routers=[ROUTER]))
    assert not out.passed and out.max_abs == np.inf


def test_nan_on_one_side_fails():
    ref = _outputs(_probs())
    cand = _copy(ref)
    cand["output"][0, 0] = np.nan
    out = _output(compare(ref, cand, routers=[ROUTER]))
    assert not out.passed and out.max_abs == np.inf


def test_nan_on_both_sides_fails():
    """Two backends agreeing on NaN have not computed the model: NaN never matches, not even NaN."""
    ref = _outputs(_probs())
    ref["output"][4, 2] = np.nan
    result = compare(ref, _copy(ref), routers=[ROUTER], atol=1.0, rtol=1.0)
    assert not result.passed and not _output(result).passed and _output(result).max_abs == np.inf
    nan_probs = _outputs(_probs())
    nan_probs[PROBS][:] = np.nan
    result = compare(nan_probs, _copy(nan_probs), routers=[ROUTER])
    assert not result.passed and not _output(result, PROBS).passed


def test_shape_mismatch_and_missing_output_fail_with_a_note():
    ref = _outputs(_probs())
    cand = dict(ref, output=ref["output"][:, :2])
    result = compare(ref, cand, routers=[ROUTER])
    assert not result.passed and "shape" in _output(result).note
    del cand[PROBS]
    result = compare(ref, cand, routers=[ROUTER])
    assert not result.passed and any(PROBS in n for n in result.notes)


def test_to_dict_is_plain_data():
    import json

    data = compare(_outputs(_probs()), _outputs(_probs()), routers=[ROUTER]).to_dict()
    assert json.loads(json.dumps(data))["routing"][0]["router"] == ROUTER.path


@pytest.mark.parametrize("option, value", [("atol", -1.0), ("atol", float("nan")), ("rtol", -1e-9),
                                           ("rtol", float("nan")), ("atol", float("inf")),
                                           ("atol", {"output": -1.0}), ("rtol", {PROBS: float("nan")})])
def test_negative_nan_or_infinite_tolerance_is_bad_input_not_a_verdict(option, value):
    ref = _outputs(_probs())
    with pytest.raises(BadInput, match=f"^{option} must be a finite number >= 0"):
        compare(ref, ref, routers=[ROUTER], **{option: value})


def test_a_cold_routers_probs_get_the_tolerance_its_temperature_amplifies_logit_errors_to():
    from deploytool.compare import temperature_gain
    from deploytool.ops.reference import tempered_softmax

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(256, 4)) * 0.05  # close decisions: where the amplification shows
    noisy = logits + rng.normal(scale=2e-6, size=logits.shape)  # what fp32 reorderings upstream cause

    def outputs(z, temperature):
        probs = tempered_softmax(z, temperature).astype(np.float32)
        return {"r.index": probs.argmax(-1), "r.probs": probs}

    cold = RouterMeta("r", 4, 0.02, "r.index", "r.probs")
    assert compare(outputs(logits, 0.02), outputs(noisy, 0.02), routers=[cold]).passed
    # the same logit error through T=1 moves the probs 50x less, within the plain fp32 default
    warm = RouterMeta("r", 4, 1.0, "r.index", "r.probs")
    assert compare(outputs(logits, 1.0), outputs(noisy, 1.0), routers=[warm]).passed
    # without the gain (the plain fp32 default given explicitly) the cold router's probs would fail
    atol, rtol = default_tolerance("float32")
    assert not compare(outputs(logits, 0.02), outputs(noisy, 0.02), routers=[cold], atol=atol, rtol=rtol).passed
    assert temperature_gain(0.02) == 12.5 and temperature_gain(1.0) == 1.0
