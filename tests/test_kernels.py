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
    cases.append(dict(E=1000, B=1, dtype="float16", T=0.05, kind="random", max_block_e=128, index="int32"))
    cases.append(dict(E=1000, B=7, dtype="bfloat16", T=20.0, kind="inf", max_block_e=128, index="int32"))
    for i, case in enumerate(cases):
        case.setdefault("index", "int64")
        case["id"] = f"E{case['E']}-B{case['B']}-{case['dtype']}-T{case['T']}-{case['kind']}" + (
            f"-blocks{case['max_block_e']}" if "max_block_e" in case else "") + f"-{i}"
    return cases


def _select_cases() -> list[dict]:
    """The HardSelect variant (what the TensorRT HardSelect plugin embeds), on raw values with ties,
    infinities and NaN."""
    cases = []
    for i, (e, b, dtype, kind, extra) in enumerate([
        (2, 1, "float32", "random", {}), (3, 7, "float16", "ties", {}), (8, 7, "bfloat16", "inf", {}),
        (64, 7, "float32", "ties", {"max_block_e": 16}), (1000, 7, "float16", "inf", {"max_block_e": 256}),
        (1000, 4096, "bfloat16", "random", {"index": "int32"}), (5, 7, "float32", "inf", {"max_block_e": 2}),
    ]):
        case = {"E": e, "B": b, "dtype": dtype, "T": 1.0, "kind": kind, "op": "select", "index": "int64", **extra}
        case["id"] = f"select-E{e}-B{b}-{dtype}-{kind}" + (
            f"-blocks{extra['max_block_e']}" if "max_block_e" in extra else "") + f"-{i}"
        cases.append(case)
    return cases


CASES = _cases()
SELECT_CASES = _select_cases()


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
        blocks = {"max_block_e": case["max_block_e"]} if "max_block_e" in case else {}
        if case.get("op") == "select":
            probs, index = triton_kernel.hard_select(x, index_dtype, **blocks)
        elif blocks:
            probs, index = triton_kernel.launch(x, case["T"], index_dtype, **blocks)
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
    cases = CASES + SELECT_CASES
    inputs = {f"x_{c['id']}": _logits(c).float().numpy() for c in cases}  # float32 holds fp16/bf16 exactly
    np.savez(tmp / "in.npz", cases=np.array(cases, dtype=object), **inputs)
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


def _check_select(case: dict, x: torch.Tensor, mask: torch.Tensor, index: torch.Tensor) -> None:
    ref_mask, ref_index = reference.hard_select(x.double().numpy())
    assert mask.dtype == x.dtype and index.dtype == getattr(torch, case["index"])
    # exact: first maximum (ties to the lowest column), a NaN wins at its first position, as np.argmax
    np.testing.assert_array_equal(index.long().numpy(), ref_index)
    np.testing.assert_array_equal(mask.double().numpy(), ref_mask)


@pytest.mark.parametrize("case", SELECT_CASES, ids=[c["id"] for c in SELECT_CASES])
def test_hard_select_variant_in_interpreter_matches_reference(case, interpreter_outputs):
    x = _logits(case)
    mask = torch.from_numpy(interpreter_outputs["p_" + case["id"]]).to(x.dtype)
    _check_select(case, x, mask, torch.from_numpy(interpreter_outputs["i_" + case["id"]]))


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
@pytest.mark.parametrize("case", SELECT_CASES, ids=[c["id"] for c in SELECT_CASES])
def test_hard_select_variant_on_gpu_matches_reference(case):
    from deploytool.kernels import triton_kernel

    x = _logits(case)
    mask, index = triton_kernel.hard_select(x.cuda(), getattr(torch, case["index"]),
                                            max_block_e=case.get("max_block_e", triton_kernel.MAX_BLOCK_E))
    _check_select(case, x, mask.cpu(), index.cpu())


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


def _compiler():
    """triton_kernel in a process that can compile (not the interpreter), or skip."""
    triton_kernel = pytest.importorskip("deploytool.kernels.triton_kernel")
    if triton_kernel.interpreting():
        pytest.skip("this process runs the Triton interpreter; it cannot compile")
    return triton_kernel


def _compile_for_h100(triton_kernel, x_dtype, **variant):
    """sm_90 at PTX ISA 8.0 (any CUDA 12 driver); compiling needs no GPU."""
    from triton.backends.compiler import GPUTarget

    return triton_kernel.compile_ptx(x_dtype, target=GPUTarget("cuda", 90, 32), ptx_limit=80, **variant)


@pytest.mark.parametrize("variant, outputs", [
    (dict(probs_dtype="float16", n_cols=8), 1),                                # TemperedSoftmax plugin
    (dict(probs_dtype="bfloat16", n_cols=None), 1),                            # unknown E: looped blocks
    (dict(mask_dtype="float32", index_dtype="int64", n_cols=1000), 2),         # HardSelect plugin
])
def test_kernel_compiles_to_ptx_taking_exactly_the_tensorrt_aot_arguments(variant, outputs):
    """TensorRT AOT plugins pass (inputs, int32 extras, outputs) and nothing else: the PTX entry must
    declare exactly those, without Triton's hidden scratch pointers, in an ISA the driver can JIT."""
    triton_kernel = _compiler()
    kernel = _compile_for_h100(triton_kernel, variant.get("probs_dtype", "float32"), **variant)
    entry = kernel.ptx.split(f".entry {kernel.name}(")[1].split(")")[0]
    params = [line.split()[1].lstrip(".") for line in entry.strip().splitlines()]
    assert params == ["u64"] + ["u32"] * 3 + ["u64"] * outputs
    assert triton_kernel.ptx_isa(kernel.ptx) == 80
    assert kernel.blocks == triton_kernel.blocks(None, variant["n_cols"])
    assert kernel.num_warps == kernel.blocks.num_warps


def test_trimmed_ptx_still_assembles_for_sm90(tmp_path):
    triton_kernel = _compiler()
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path
    except (ImportError, AttributeError, TypeError) as exc:
        pytest.skip(f"this triton exposes no ptxas: {exc}")
    kernel = _compile_for_h100(triton_kernel, "float16", mask_dtype="float16", index_dtype="int64", n_cols=64)
    (tmp_path / "k.ptx").write_text(kernel.ptx)
    proc = subprocess.run([ptxas, "-arch=sm_90a", str(tmp_path / "k.ptx"), "-o", str(tmp_path / "k.cubin")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_hidden_parameter_that_the_kernel_reads_is_refused():
    triton_kernel = pytest.importorskip("deploytool.kernels.triton_kernel")
    ptx = (".version 8.0\n.visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u64 k_param_1\n)\n{\n"
           "\tld.param.b64 %rd1, [k_param_1];\n}\n")
    with pytest.raises(RuntimeError, match="k_param_1"):
        triton_kernel.drop_unused_trailing_params(ptx, "k", 1)
    unused = ptx.replace("[k_param_1]", "[k_param_0]")
    assert "k_param_1" not in triton_kernel.drop_unused_trailing_params(unused, "k", 1)
    assert triton_kernel.ptx_isa(ptx) == 80


@pytest.mark.parametrize("n_rows, n_cols, interpret", [
    (1, 2, False), (7, 3, False), (4096, 8, False), (4096, 1000, False), (3, 5000, False), (None, None, False),
    (None, 64, False), (1, 1000, True), (4096, 8, True),
])
def test_blocks_cover_every_row_and_column_within_a_tile(n_rows, n_cols, interpret):
    triton_kernel = pytest.importorskip("deploytool.kernels.triton_kernel")
    cfg = triton_kernel.blocks(n_rows, n_cols, interpret=interpret)
    tile = triton_kernel.INTERPRETER_TILE if interpret else triton_kernel.GPU_TILE
    assert cfg.block_e & (cfg.block_e - 1) == 0 and cfg.block_b & (cfg.block_b - 1) == 0  # tl.arange needs 2**k
    assert cfg.block_b * cfg.block_e <= max(tile, cfg.block_e)
    assert cfg.block_e <= triton_kernel.MAX_BLOCK_E
    # one block per row exactly when the whole row fits; otherwise the kernel loops over column blocks
    assert cfg.one_block == (n_cols is not None and n_cols <= cfg.block_e)
    if cfg.one_block:
        assert cfg.block_e < 2 * n_cols  # at most one power of two of padding
    if n_rows is not None:
        (programs,) = triton_kernel.grid(n_rows, cfg)
        assert programs * cfg.block_b >= n_rows > (programs - 1) * cfg.block_b
        assert cfg.block_b < 2 * n_rows  # B=1 does not launch a 1024-row program


def test_temperature_travels_as_its_float32_bits():
    triton_kernel = pytest.importorskip("deploytool.kernels.triton_kernel")
    for t in (0.05, 0.7, 1.0, 20.0):
        bits = triton_kernel.temperature_bits(t)
        assert 0 < bits < 2**31  # a positive float32 is a positive int32, as SymInt32 carries it
        assert np.array([bits], dtype=np.int32).view(np.float32)[0] == np.float32(t)
