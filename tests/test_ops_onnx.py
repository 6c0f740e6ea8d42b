"""The ONNX function bodies of TemperedSoftmax and HardSelect against the float64 NumPy reference.

Both onnx.reference (the spec's own evaluator) and ONNX Runtime run the same routing-only model.
"""

from __future__ import annotations

import numpy as np
import pytest

from deploytool.ops import DOMAIN, HARD_SELECT, TEMPERED_SOFTMAX, reference
from onnx_models import routing_model


def _run_reference_evaluator(model, logits):
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(None, {"logits": logits})


def _run_ort(model, logits):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"logits": logits})


EVALUATORS = {"onnx.reference": _run_reference_evaluator, "onnxruntime": _run_ort}


def _logits(batch: int, experts: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, experts)).astype(np.float32) * 3
    x[0] = 1.5                       # a full tie: every expert equal -> index 0
    if experts > 2 and batch > 1:
        x[1] = 0.0
        x[1, [1, experts - 1]] = 2.0  # a tie between experts 1 and E-1 -> index 1
    return x


@pytest.mark.parametrize("evaluator", list(EVALUATORS))
@pytest.mark.parametrize("experts", [2, 3, 8, 64])
@pytest.mark.parametrize("batch", [1, 1000])
@pytest.mark.parametrize("temperature", [1e-3, 1.0, 1e3])
def test_routing_ops_match_the_float64_reference(evaluator, experts, batch, temperature):
    logits = _logits(batch, experts, seed=experts)
    probs, mask, index = EVALUATORS[evaluator](routing_model(experts, temperature), logits)
    # the op shifts and divides in the input's dtype; at T = 1e-3 that float32 rounding of z alone moves
    # probs by ~1e-4, so the reference starts from the same float32 z and the rest must agree to 1e-6
    z32 = (logits - logits.max(-1, keepdims=True)) / np.float32(temperature)
    want = reference.tempered_softmax(z32, 1.0)
    atol = 1e-6
    np.testing.assert_allclose(probs, want, atol=atol, rtol=0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert index.dtype == np.int64 and mask.dtype == probs.dtype
    # HardSelect on the op's own probs is exact: first maximum, one-hot mask
    want_mask, want_index = reference.hard_select(probs)
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_array_equal(mask, want_mask)
    # and it agrees with the reference decision wherever the reference is not near a tie
    clear = reference.top2_margin(want) > 2 * atol
    np.testing.assert_array_equal(index[clear], reference.hard_select(want)[1][clear])


@pytest.mark.parametrize("evaluator", list(EVALUATORS))
def test_ties_go_to_the_lowest_index(evaluator):
    logits = np.array([[1, 1, 1, 1], [0, 3, 0, 3], [2, 0, 2, 1], [0, 0, 0, 5]], np.float32)
    _, mask, index = EVALUATORS[evaluator](routing_model(4, 0.7), logits)
    np.testing.assert_array_equal(index, [0, 1, 0, 3])
    np.testing.assert_array_equal(mask, np.eye(4, dtype=np.float32)[[0, 1, 0, 3]])


def test_large_logits_do_not_overflow():
    """The max subtraction keeps exp finite where a naive softmax gives inf / inf = NaN."""
    logits = np.array([[1e4, 0.0, -1e4], [500.0, 499.0, 0.0]], np.float32)
    for run in EVALUATORS.values():
        probs, _, index = run(routing_model(3, 0.01), logits)
        assert np.isfinite(probs).all()
        np.testing.assert_allclose(probs, reference.tempered_softmax(logits, 0.01), atol=1e-6)
        np.testing.assert_array_equal(index, [0, 0])


def test_float16_keeps_its_dtype_and_matches_within_half_precision():
    logits = _logits(64, 8, seed=1).astype(np.float16)
    probs, mask, index = _run_ort(routing_model(8, 0.5, dtype="float16"), logits)
    assert probs.dtype == mask.dtype == np.float16
    np.testing.assert_allclose(probs, reference.tempered_softmax(logits, 0.5), atol=2e-3)
    np.testing.assert_array_equal(index, reference.hard_select(probs)[1])


FP16_OVERFLOW = (np.array([[1400.0, 0.0, -5.0], [-3.0, 1200.0, 1190.0]], np.float16), 0.02)


@pytest.mark.parametrize("evaluator", list(EVALUATORS))
def test_float16_logits_over_the_max_over_temperature_do_not_overflow(evaluator):
    """1400 / 0.02 = 70000 exceeds fp16's 65504: dividing before the max subtraction gave inf - inf = NaN."""
    logits, temperature = FP16_OVERFLOW
    probs, mask, index = EVALUATORS[evaluator](routing_model(3, temperature, dtype="float16"), logits)
    assert probs.dtype == np.float16 and np.isfinite(probs).all()
    np.testing.assert_allclose(probs, reference.tempered_softmax(logits, temperature), atol=1e-3)
    np.testing.assert_array_equal(index, [0, 1])


def test_float16_torch_tempered_softmax_does_not_overflow():
    import torch

    from deploytool.ops import functional

    logits, temperature = FP16_OVERFLOW
    probs = functional.tempered_softmax(torch.from_numpy(logits), temperature)
    assert probs.dtype == torch.float16 and torch.isfinite(probs).all()
    np.testing.assert_allclose(probs.numpy(), reference.tempered_softmax(logits, temperature), atol=1e-3)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_routing_model_passes_the_full_checker(dtype):
    import onnx

    model = routing_model(8, 0.5, dtype=dtype)
    onnx.checker.check_model(model, full_check=True)
    assert {(f.domain, f.name) for f in model.functions} == {(DOMAIN, TEMPERED_SOFTMAX), (DOMAIN, HARD_SELECT)}
    assert (DOMAIN, 1) in {(o.domain, o.version) for o in model.opset_import}
