"""The fused tempered-softmax/top-1 op against the float64 reference, on every implementation.

The same cases run through the Triton kernel in the CPU interpreter (one subprocess started with
TRITON_INTERPRET=1, since the interpreter must be chosen before triton is imported), the torch
fallback, and on a GPU when there is one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import torch

from deploytool.errors import BadInput
from deploytool.kernels import tempered_softmax_select, torch_tempered_softmax_select
from deploytool.ops import reference

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# absolute tolerance on probabilities: float32 arithmetic, then rounding to the output dtype
ATOL = {"float32": 2e-5, "float16": 1e-3, "bfloat16": 8e-3}
TEMPERATURES = (0.05, 0.5, 1.0, 3.0, 20.0)


def _cases() -> list[dict]:
    cases = []
    small = [(e, b) for e in (2, 3, 8, 64, 1000) for b in (1, 7)]
    for i, (e, b) in enumerate(small):
        for dtype in DTYPES:
            cases.append(dict(E=e, B=b, dtype=dtype, T=TEMPERATURES[i % len(TEMPERATURES)], kind="random"))
    for e, dtype, t in ((2, "float16", 0.05), (8, "float32", 1.0), (64, "bfloat16", 20.0), (1000, "float32", 0.5),
                        (3, "float16", 3.0)):
        cases.append(dict(E=e, B=4096, dtype=dtype, T=t, kind="random"))
    for e in (2, 3, 8, 64, 1000):
        cases.append(dict(E=e, B=7, dtype="float32", T=1.0, kind="ties"))
        cases.append(dict(E=e, B=7, dtype="float16", T=0.5, kind="inf"))
    # online softmax over several column blocks, including a ragged last block
    cases.append(dict(E=1000, B=7, dtype="float32", T=0.5, kind="random", max_block_e=256))
    cases.append(dict(E=1000, B=4096, dtype="bfloat16", T=3.0, kind="random", max_block_e=256, index="int32"))
    cases.append(dict(E=64, B=7, dtype="float16", T=1.0, kind="ties", max_block_e=16))
    cases.append(dict(E=3, B=7, dtype="float32", T=1.0, kind="inf", max_block_e=2))
    for i, case in enumerate(cases):
        case.setdefault("index", "int64")
        case["id"] = f"E{case['E']}-B{case['B']}-{case['dtype']}-T{case['T']}-{case['kind']}" + (
            f"-blocks{case['max_block_e']}" if "max_block_e" in case else "") + f"-{i}"
    return cases


CASES = _cases()


def _logits(case: dict) -> torch.Tensor:
    """Deterministic logits in the case's dtype; ties and infinities placed in known rows."""
    rng = np.random.default_rng(zlib.crc32(case["id"].encode()))
    b, e = case["B"], case["E"]
    x = rng.normal(0.0, 3.0, size=(b, e))
    if case["kind"] == "ties":
        for r in range(b):
            cols = rng.choice(e, size=min(e, 3), replace=False)
            x[r, cols] = x[r].max() + 1.0  # equal maxima: the lowest column must win
        x[0, :] = 0.5  # a fully tied row
    if case["kind"] == "inf":
        x[0, -1] = np.inf
        x[1, :] = -np.inf
        x[2, 0] = -np.inf
        x[3, : e - 1] = -np.inf
        x[4, 1 % e] = np.inf
        x[5, 0] = np.nan
    return torch.from_numpy(x).to(DTYPES[case["dtype"]])


def _check(case: dict, logits: torch.Tensor, probs: torch.Tensor, index: torch.Tensor) -> None:
    x64 = logits.double().numpy()
    ref_probs, ref_index = reference.tempered_softmax_select(x64, case["T"])
    assert probs.dtype == logits.dtype and probs.shape == logits.shape
    assert index.dtype == getattr(torch, case["index"]) and index.shape == logits.shape[:-1]
    got = probs.double().numpy()
    idx = index.long().numpy()
    nan_rows = np.isnan(ref_probs).any(axis=-1)
    # rows torch turns into NaN (a +inf or NaN logit, or all -inf) are NaN here too, and pick index 0
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref_probs))
    np.testing.assert_array_equal(idx[nan_rows], ref_index[nan_rows])
    ok = ~nan_rows
    np.testing.assert_allclose(got[ok], ref_probs[ok], rtol=0, atol=ATOL[case["dtype"]])
    # the index is HardSelect of the probabilities as returned: first maximum, ties to the lowest column
    np.testing.assert_array_equal(idx, np.argmax(got, axis=-1))
    # and agrees with the exact reference wherever the top-2 margin exceeds rounding
    clear = ok & (reference.top2_margin(np.nan_to_num(ref_probs)) > 2 * ATOL[case["dtype"]])
    np.testing.assert_array_equal(idx[clear], ref_index[clear])
    if case["kind"] == "ties":
        np.testing.assert_array_equal(idx[ok], ref_index[ok])


_WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from deploytool.kernels import tempered_softmax_select
    from deploytool.kernels import triton_kernel
    assert triton_kernel.interpreting()
    cases = np.load(sys.argv[1], allow_pickle=True)["cases"]
    data = np.load(sys.argv[1])
    out = {}
    for case in cases:
        x = torch.from_numpy(data["x_" + case["id"]]).to(getattr(torch, case["dtype"]))
        index_dtype = getattr(torch, case["index"])
        if "max_block_e" in case:
            probs, index = triton_kernel.launch(x, case["T"], index_dtype, max_block_e=case["max_block_e"])
        else:  # through the public op: on CPU with TRITON_INTERPRET=1 it must take the kernel
            probs, index = tempered_softmax_select(x, case["T"], index_dtype)
        out["p_" + case["id"]] = probs.float().numpy()
        out["i_" + case["id"]] = index.numpy()
    np.savez(sys.argv[2], **out)
""")


@pytest.fixture(scope="module")
def interpreter_outputs(tmp_path_factory) -> dict:
    """Kernel outputs for every case, computed once in an interpreter subprocess."""
    pytest.importorskip("triton")
    tmp = tmp_path_factory.mktemp("kernel")
    inputs = {f"x_{c['id']}": _logits(c).float().numpy() for c in CASES}  # float32 holds fp16/bf16 exactly
    np.savez(tmp / "in.npz", cases=np.array(CASES, dtype=object), **inputs)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _WORKER, str(tmp / "in.npz"), str(tmp / "out.npz")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(tmp / "out.npz"))


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_triton_kernel_in_interpreter_matches_reference(case, interpreter_outputs):
    logits = _logits(case)
    probs = torch.from_numpy(interpreter_outputs["p_" + case["id"]]).to(logits.dtype)
    index = torch.from_numpy(interpreter_outputs["i_" + case["id"]])
    _check(case, logits, probs, index)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_torch_fallback_matches_reference(case):
    logits = _logits(case)
    _check(case, logits, *torch_tempered_softmax_select(logits, case["T"], getattr(torch, case["index"])))


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_triton_kernel_on_gpu_matches_reference(case):
    from deploytool.kernels import triton_kernel

    logits = _logits(case)
    index_dtype = getattr(torch, case["index"])
    probs, index = triton_kernel.launch(logits.cuda(), case["T"], index_dtype,
                                        max_block_e=case.get("max_block_e", triton_kernel.MAX_BLOCK_E))
    _check(case, logits, probs.cpu(), index.cpu())


@pytest.mark.gpu
def test_public_op_on_gpu_keeps_leading_dims():
    x = torch.randn(3, 5, 8, device="cuda", dtype=torch.float16)
    probs, index = tempered_softmax_select(x, 0.7)
    assert probs.shape == x.shape and index.shape == (3, 5) and index.is_cuda
    ref_probs, _ = torch_tempered_softmax_select(x, 0.7)
    torch.testing.assert_close(probs, ref_probs, atol=1e-3, rtol=0)


def test_public_op_on_cpu_falls_back_to_torch_and_keeps_leading_dims():
    x = torch.randn(3, 5, 8)
    probs, index = tempered_softmax_select(x, 0.7, torch.int32)
    assert probs.shape == (3, 5, 8) and index.shape == (3, 5) and index.dtype == torch.int32
    torch.testing.assert_close(probs, torch.softmax(x / 0.7, dim=-1))
    assert torch.equal(index.long(), probs.argmax(dim=-1))


def test_export_sees_one_custom_op():
    class Routing(torch.nn.Module):
        def forward(self, x):
            return tempered_softmax_select(x, 0.5)

    program = torch.export.export(Routing(), (torch.randn(4, 8),))
    ops = [str(n.target) for n in program.graph.nodes if n.op == "call_function" and "getitem" not in str(n.target)]
    assert ops == ["deploytool.tempered_softmax_select.default"]


@pytest.mark.parametrize("logits, temperature, index_dtype, message", [
    (torch.randn(4, 1), 1.0, torch.int64, "at least 2"),
    (torch.randint(0, 3, (4, 3)), 1.0, torch.int64, "float32"),
    (torch.randn(4, 3), 0.0, torch.int64, "temperature"),
    (torch.randn(4, 3), float("inf"), torch.int64, "temperature"),
    (torch.randn(4, 3), 1.0, torch.int16, "index_dtype"),
])
def test_bad_arguments_raise_bad_input(logits, temperature, index_dtype, message):
    with pytest.raises(BadInput, match=message):
        tempered_softmax_select(logits, temperature, index_dtype)


@pytest.mark.parametrize("variant, outputs", [
    (dict(probs_dtype="float16"), 1),                          # TemperedSoftmax plugin
    (dict(mask_dtype="float32", index_dtype="int64"), 2),      # HardSelect plugin
])
def test_kernel_compiles_to_ptx_in_tensorrt_argument_order(variant, outputs):
    """TensorRT AOT plugins pass (inputs, int32 extras, outputs): the PTX entry must take exactly that."""
    triton_kernel = pytest.importorskip("deploytool.kernels.triton_kernel")
    if triton_kernel.interpreting():
        pytest.skip("this process runs the Triton interpreter; it cannot compile")
    from triton.backends.compiler import GPUTarget

    x_dtype = variant.get("probs_dtype", "float32")
    kernel = triton_kernel.compile_ptx(x_dtype, n_cols=8, target=GPUTarget("cuda", 90, 32), **variant)
    entry = kernel.ptx.split(f".entry {kernel.name}(")[1].split(")")[0]
    params = [line.split()[1].lstrip(".") for line in entry.strip().splitlines()]
    assert params[:4 + outputs] == ["u64"] + ["u32"] * 3 + ["u64"] * outputs
    assert all(p == "u64" for p in params[4 + outputs:])  # Triton's hidden scratch pointers, passed null
    assert kernel.blocks.one_block and kernel.blocks.block_e == 8
