"""The Triton kernel behind the fused op, its launcher, and its ahead-of-time (PTX) compilation.

One kernel serves three callers: the torch op (probs + index), the TensorRT `TemperedSoftmax` plugin
(probs only) and the `HardSelect` plugin (mask + index from probs). Outputs a caller does not want are
passed as None, which Triton specialises away, so every variant keeps TensorRT's AOT argument order:
input pointer, int32 scalars (n_rows, n_cols, temperature as float32 bits), output pointers;
compile_ptx cuts the unused scratch pointers Triton appends, so the PTX entry takes exactly those.
The temperature travels as bits because TensorRT AOT plugins pass only int32 extra arguments.

Imported only when a kernel is needed (a CUDA tensor, the interpreter, a TensorRT build): it imports
triton at the top. The CPU interpreter needs TRITON_INTERPRET=1 before triton is first imported
(triton.language's own helpers are built for one mode at import), so it is a per-process choice.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

import triton
import triton.language as tl

from deploytool.dtypes import TRITON_LANG_TYPES

#: widest column block; rows with more experts loop over blocks of this size (online softmax)
MAX_BLOCK_E = 4096
#: elements per program: compiled programs keep a tile in registers; the interpreter is fastest with
#: few, large programs
GPU_TILE = 8192
INTERPRETER_TILE = 1 << 16
#: compile options every GPU variant shares: FMA contraction stays on (Triton 3.9 warns that its
#: default will flip; pinning it keeps JIT and embedded kernels identical across Triton versions)
COMPILE_OPTIONS = {"enable_fp_fusion": True}


@triton.jit
def tempered_softmax_select_kernel(
    x_ptr, n_rows, n_cols, temp_bits,
    probs_ptr, mask_ptr, index_ptr,
    BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr, ONE_BLOCK: tl.constexpr, SOFTMAX: tl.constexpr,
):
    """Per row of x[n_rows, n_cols]: probs = softmax(x / T) (if SOFTMAX), then top-1 of probs.

    The top-1 is taken over the probabilities as stored (rounded to the output dtype), so the result
    equals TemperedSoftmax followed by HardSelect; ties go to the lowest index and a NaN wins at its
    first position, as torch.argmax does. Rows hit by +inf, NaN or all -inf logits become NaN rows,
    as torch.softmax makes them. Accumulation is float32.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < n_rows
    row_start = rows.to(tl.int64) * n_cols
    cols0 = tl.arange(0, BLOCK_E)
    neg_inf = float("-inf")
    no_col = tl.zeros([BLOCK_B], tl.int32) + n_cols  # "no such column" sentinel for min-reductions
    if SOFTMAX:
        temperature = temp_bits.to(tl.float32, bitcast=True)

    if ONE_BLOCK:
        ok = row_ok[:, None] & (cols0[None, :] < n_cols)
        offs = row_start[:, None] + cols0[None, :]
        x = tl.load(x_ptr + offs, mask=ok, other=neg_inf).to(tl.float32)
        if SOFTMAX:
            z = x / temperature
            e = tl.exp(z - tl.max(z, axis=1)[:, None])
            p = (e / tl.sum(e, axis=1)[:, None]).to(probs_ptr.dtype.element_ty)
            tl.store(probs_ptr + offs, p, mask=ok)
            v = tl.where(ok, p.to(tl.float32), neg_inf)
        else:
            v = x
        nan_col = tl.min(tl.where(v != v, cols0[None, :], no_col[:, None]), axis=1)
        top = tl.max(v, axis=1)
        top_col = tl.min(tl.where(v == top[:, None], cols0[None, :], no_col[:, None]), axis=1)
        index = tl.where(nan_col < n_cols, nan_col, top_col)
        if mask_ptr is not None:
            hot = tl.where(cols0[None, :] == index[:, None], 1.0, 0.0).to(mask_ptr.dtype.element_ty)
            tl.store(mask_ptr + offs, hot, mask=ok)
    else:
        if SOFTMAX:
            # pass 1: running max and rescaled running sum (online softmax)
            run_max = tl.full([BLOCK_B], neg_inf, tl.float32)
            run_sum = tl.zeros([BLOCK_B], tl.float32)
            for start in range(0, n_cols, BLOCK_E):
                cols = start + cols0
                ok = row_ok[:, None] & (cols[None, :] < n_cols)
                z = tl.load(x_ptr + row_start[:, None] + cols[None, :], mask=ok, other=neg_inf)
                z = z.to(tl.float32) / temperature
                new_max = tl.maximum(run_max, tl.max(z, axis=1))
                # subtracting -inf would turn all-(-inf) prefixes into NaN; their sum is 0 anyway
                shift = tl.where(new_max == neg_inf, 0.0, new_max)
                run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
                run_max = new_max
        # pass 2: write probs, track the top-1 across blocks (earlier blocks win ties)
        best = tl.full([BLOCK_B], neg_inf, tl.float32)
        best_col = tl.zeros([BLOCK_B], tl.int32)
        nan_col = no_col
        for start in range(0, n_cols, BLOCK_E):
            cols = start + cols0
            ok = row_ok[:, None] & (cols[None, :] < n_cols)
            offs = row_start[:, None] + cols[None, :]
            x = tl.load(x_ptr + offs, mask=ok, other=neg_inf).to(tl.float32)
            if SOFTMAX:
                p = (tl.exp(x / temperature - run_max[:, None]) / run_sum[:, None]).to(probs_ptr.dtype.element_ty)
                tl.store(probs_ptr + offs, p, mask=ok)
                v = tl.where(ok, p.to(tl.float32), neg_inf)
            else:
                v = x
            nan_col = tl.minimum(nan_col, tl.min(tl.where(v != v, cols[None, :], no_col[:, None]), axis=1))
            top = tl.max(v, axis=1)
            top_col = tl.min(tl.where(v == top[:, None], cols[None, :], no_col[:, None]), axis=1)
            take = top > best
            best = tl.where(take, top, best)
            best_col = tl.where(take, top_col, best_col)
        index = tl.where(nan_col < n_cols, nan_col, best_col)
        if mask_ptr is not None:
            for start in range(0, n_cols, BLOCK_E):
                cols = start + cols0
                ok = row_ok[:, None] & (cols[None, :] < n_cols)
                hot = tl.where(cols[None, :] == index[:, None], 1.0, 0.0).to(mask_ptr.dtype.element_ty)
                tl.store(mask_ptr + row_start[:, None] + cols[None, :], hot, mask=ok)
    if index_ptr is not None:
        tl.store(index_ptr + rows, index.to(index_ptr.dtype.element_ty), mask=row_ok)


def interpreting() -> bool:
    """True when this process runs Triton kernels in the CPU interpreter (TRITON_INTERPRET=1)."""
    return bool(triton.knobs.runtime.interpret)


@dataclass(frozen=True)
class Blocks:
    block_b: int
    block_e: int
    one_block: bool
    num_warps: int


def blocks(n_rows: int | None, n_cols: int | None, *, interpret: bool = False,
           max_block_e: int = MAX_BLOCK_E) -> Blocks:
    """Tile shape: a whole row per block when it fits, as many rows per program as the tile allows.

    n_cols None (unknown at build time) loops over max_block_e blocks, which is correct for any width.

    Args:
        n_rows: rows, or None when unknown.
        n_cols: experts, or None when unknown.
        interpret: size the tile for Triton's CPU interpreter.
        max_block_e: the widest column block.

    Returns:
        The Blocks.
    """
    tile = INTERPRETER_TILE if interpret else GPU_TILE
    block_e = max_block_e if n_cols is None else min(triton.next_power_of_2(n_cols), max_block_e)
    block_b = max(1, tile // block_e)
    if n_rows is not None:
        block_b = min(block_b, triton.next_power_of_2(max(n_rows, 1)))
    num_warps = 8 if block_b * block_e >= 4096 else 4
    return Blocks(block_b, block_e, n_cols is not None and n_cols <= block_e, num_warps)


def temperature_bits(temperature: float) -> int:
    """float32 bit pattern of the temperature as a signed int32 (the kernel bitcasts it back)."""
    return struct.unpack("<i", struct.pack("<f", float(temperature)))[0]


def grid(n_rows: int, cfg: Blocks) -> tuple[int]:
    """One program per BLOCK_B rows (the AOT plugin states the same rule symbolically).

    Args:
        n_rows: rows.
        cfg: the tile shape.

    Returns:
        The launch grid.
    """
    return (triton.cdiv(n_rows, cfg.block_b),)


def launch(logits, temperature: float, index_dtype=None, *, max_block_e: int = MAX_BLOCK_E):
    """TemperedSoftmax + top-1 on a 2-D tensor: compiled on CUDA, in the interpreter for CPU tensors.

    Args:
        logits: [rows, experts].
        temperature: the softmax temperature.
        index_dtype: torch.int64 (default) or torch.int32.
        max_block_e: the widest column block.

    Returns:
        (probs, index).
    """
    import torch

    probs = torch.empty_like(logits)
    index = _run(logits, temperature_bits(temperature), probs, None, index_dtype, max_block_e)
    return probs, index


def hard_select(probs, index_dtype=None, *, max_block_e: int = MAX_BLOCK_E):
    """The HardSelect variant the TensorRT plugin embeds: (one-hot mask, index) of a 2-D tensor.

    Args:
        probs: [rows, experts].
        index_dtype: torch.int64 (default) or torch.int32.
        max_block_e: the widest column block.

    Returns:
        (mask, index).
    """
    import torch

    mask = torch.empty_like(probs)
    index = _run(probs, 0, None, mask, index_dtype, max_block_e)
    return mask, index


def _run(x, temp_bits: int, probs, mask, index_dtype, max_block_e: int):
    import torch

    interpret = interpreting()
    if not (interpret or x.is_cuda):
        raise RuntimeError("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing triton")
    x = x.contiguous()
    n_rows, n_cols = x.shape
    index = torch.empty(n_rows, dtype=index_dtype or torch.int64, device=x.device)
    if n_rows == 0:
        return index
    cfg = blocks(n_rows, n_cols, interpret=interpret, max_block_e=max_block_e)
    options = {} if interpret else {"num_warps": cfg.num_warps, **COMPILE_OPTIONS}
    tempered_softmax_select_kernel[grid(n_rows, cfg)](
        x, n_rows, n_cols, temp_bits, probs, mask, index,
        BLOCK_B=cfg.block_b, BLOCK_E=cfg.block_e, ONE_BLOCK=cfg.one_block, SOFTMAX=probs is not None, **options,
    )
    return index


# --- ahead-of-time compilation for the TensorRT plugin ----------------------------------------

#: TensorRT / torch dtype names -> Triton pointer element types
TRITON_TYPES = TRITON_LANG_TYPES


@dataclass(frozen=True)
class CompiledKernel:
    name: str
    ptx: str
    num_warps: int
    shared: int
    blocks: Blocks


def compile_ptx(x_dtype: str, *, probs_dtype: str | None = None, mask_dtype: str | None = None,
                index_dtype: str | None = None, n_cols: int | None = None, target=None,
                ptx_limit: int | None = None) -> CompiledKernel:
    """Compile one variant to PTX for embedding in an engine (TensorRT AOT plugin).

    Dtypes are names ("float16"); an output left None is compiled out. With probs_dtype the kernel
    computes the tempered softmax; without it, it is HardSelect over x. `target` is a
    triton.backends.compiler.GPUTarget (default: the current GPU). The PTX ISA version is capped at
    `ptx_limit` (default: what the local CUDA driver can JIT), because Triton labels its PTX with the
    ISA of its own bundled ptxas, which may be newer than the driver that loads the engine.

    Args:
        x_dtype: the input's dtype.
        probs_dtype: the probs output's dtype (None: HardSelect).
        mask_dtype: the mask output's dtype, or None.
        index_dtype: the index output's dtype, or None.
        n_cols: the expert count when known at build time.
        target: the GPU target (default: the current GPU).
        ptx_limit: the highest PTX ISA version to emit.

    Returns:
        The CompiledKernel.
    """
    pointer = {name: f"*{TRITON_TYPES[dtype]}" for name, dtype in
               (("x_ptr", x_dtype), ("probs_ptr", probs_dtype), ("mask_ptr", mask_dtype),
                ("index_ptr", index_dtype)) if dtype is not None}
    cfg = blocks(None, n_cols)
    signature = {"x_ptr": pointer["x_ptr"], "n_rows": "i32", "n_cols": "i32", "temp_bits": "i32"}
    constexprs = {"BLOCK_B": cfg.block_b, "BLOCK_E": cfg.block_e, "ONE_BLOCK": cfg.one_block,
                  "SOFTMAX": probs_dtype is not None}
    for name in ("probs_ptr", "mask_ptr", "index_ptr"):
        if name in pointer:
            signature[name] = pointer[name]
        else:
            signature[name] = "constexpr"
            constexprs[name] = None
    for name in ("BLOCK_B", "BLOCK_E", "ONE_BLOCK", "SOFTMAX"):
        signature[name] = "constexpr"
    src = triton.compiler.ASTSource(fn=tempered_softmax_select_kernel, signature=signature, constexprs=constexprs)
    options = {"num_warps": cfg.num_warps, **COMPILE_OPTIONS}
    kernel = triton.compile(src, target=target, options=options)
    limit = driver_ptx_isa() if ptx_limit is None else ptx_limit
    if limit is not None and ptx_isa(kernel.asm["ptx"]) > limit:
        kernel = triton.compile(src, target=target, options={**options, "ptx_version": limit})
    meta = kernel.metadata
    for field in ("global_scratch_size", "profile_scratch_size"):
        if getattr(meta, field, 0):
            raise RuntimeError(f"kernel {meta.name} needs {field}={getattr(meta, field)}; TensorRT cannot supply it")
    n_args = sum(1 for kind in signature.values() if kind != "constexpr")
    ptx = drop_unused_trailing_params(kernel.asm["ptx"], meta.name, n_args)
    return CompiledKernel(meta.name, ptx, meta.num_warps, meta.shared, cfg)


def ptx_isa(ptx: str) -> int:
    """The `.version X.Y` of a PTX module as Triton spells it (X * 10 + Y)."""
    match = re.search(r"^\s*\.version\s+(\d+)\.(\d+)", ptx, flags=re.MULTILINE)
    if match is None:
        raise ValueError("PTX without a .version directive")
    return int(match[1]) * 10 + int(match[2])


def driver_ptx_isa() -> int | None:
    """Highest PTX ISA the installed CUDA driver can JIT (87 for a CUDA 12.8 driver), or None without one."""
    import ctypes

    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int()
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    try:  # Triton's own CUDA -> PTX ISA table
        from triton.backends.nvidia.compiler import ptx_get_version
    except ImportError:
        return None
    return ptx_get_version(f"{version.value // 1000}.{version.value % 1000 // 10}")


def drop_unused_trailing_params(ptx: str, name: str, keep: int) -> str:
    """Cut the kernel entry's parameter list to its first `keep` parameters.

    Triton >= 3.3 appends hidden scratch-pointer parameters that its own launcher fills in. A
    TensorRT AOT plugin passes exactly inputs, extra int32 scalars and outputs, so the entry must
    declare exactly those. Only parameters the kernel body never reads are dropped; anything else
    is an error rather than a kernel reading garbage.

    Args:
        ptx: the PTX text.
        name: the kernel's entry name.
        keep: the parameters to keep.

    Returns:
        The PTX with the entry's parameter list cut.

    Raises:
        RuntimeError: a dropped parameter the kernel body reads.
    """
    head = f".entry {name}("
    start = ptx.index(head) + len(head)
    end = ptx.index(")", start)
    params = [p.strip() for p in ptx[start:end].split(",")]
    for extra in params[keep:]:
        param_name = extra.split()[-1]
        if len(re.findall(rf"\b{re.escape(param_name)}\b", ptx)) != 1:
            raise RuntimeError(f"kernel {name} reads its hidden parameter {param_name}; TensorRT cannot supply it")
    body = "".join(f"\n\t{p}," for p in params[:keep]).rstrip(",")
    return ptx[:start] + body + "\n" + ptx[end:]
