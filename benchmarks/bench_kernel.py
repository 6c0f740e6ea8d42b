"""Fused tempered-softmax + top-1 kernel vs copy bandwidth, torch eager and torch.compile, on one GPU.

For each dtype and expert count E, B = ceil(elements / E) rows (default >= 32M elements, beyond L2).
The kernel must read B*E and write B*E + B values; its bandwidth is compared with a measured
device-to-device copy of the same tensor (which reads and writes B*E). Eager and torch.compile run
the model's own routing step, softmax(logits / T) then argmax. One table, all ratios from one run.
Targets (issue 5): >= 85% of copy bandwidth, >= 2.5x eager, >= 1.0x torch.compile.

    python benchmarks/bench_kernel.py [--elements 33554432] [--experts 8,64,1000] [--dtypes fp32,fp16,bf16]

Exits 3 with one line on a machine without a CUDA GPU.
"""

from __future__ import annotations

import argparse
import sys

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _times(fn, warmup: int, repeats: int) -> list[float]:
    """Milliseconds per call, each call timed with its own CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def _stats(ms: list[float]) -> tuple[float, float, float]:
    """(median, p90, p99) by deploytool's one definition (nearest rank), as every bench table reports them."""
    from deploytool.benchmark.stats import summarize

    stats = summarize([t * 1e6 for t in ms])
    return stats.median_ms, stats.p90_ms, stats.p99_ms


def _measure(logits, dtype_name: str, temperature: float, routing, args) -> list[tuple]:
    """Table rows for one (dtype, E): copy, kernel, eager, compile."""
    import torch

    from deploytool.kernels import tempered_softmax_select

    torch._dynamo.reset()  # a fresh compile per shape and dtype, never a silent eager fallback at the recompile limit
    compiled = torch.compile(routing, dynamic=False)

    batch, experts = logits.shape
    copy_dst = torch.empty_like(logits)
    size = logits.element_size()
    copy_bytes = 2 * logits.numel() * size
    routing_bytes = copy_bytes + batch * torch.empty((), dtype=torch.int64).element_size()
    candidates = {
        "copy": (copy_bytes, lambda: copy_dst.copy_(logits)),
        "kernel": (routing_bytes, lambda: tempered_softmax_select(logits, temperature)),
        "eager": (routing_bytes, lambda: routing(logits)),
        "compile": (routing_bytes, lambda: compiled(logits)),
    }
    results = {name: (moved, _stats(_times(fn, args.warmup, args.repeats))) for name, (moved, fn) in candidates.items()}
    copy_bw = copy_bytes / results["copy"][1][0] / 1e6  # GB/s from bytes per ms
    kernel_median = results["kernel"][1][0]
    rows = []
    for name, (moved, (median, p90, p99)) in results.items():
        bandwidth = moved / median / 1e6
        rows.append((dtype_name, experts, batch, name, median, p90, p99, bandwidth, bandwidth / copy_bw,
                     None if name == "copy" else median / kernel_median))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=1 << 25, help="B*E per configuration (default 32M).")
    parser.add_argument("--experts", default="8,64,1000", help="Comma-separated expert counts E.")
    parser.add_argument("--dtypes", default="fp32,fp16,bf16", help="Comma-separated: fp32, fp16, bf16.")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("bench_kernel: no CUDA GPU on this machine; run it on an NVIDIA GPU (nothing was measured)")
        return 3
    from deploytool.cli.render import console, table
    from deploytool.kernels import tempered_softmax_select, torch_tempered_softmax_select

    temperature = args.temperature

    def routing(logits):
        probs = torch.softmax(logits / temperature, dim=-1)
        return probs, probs.argmax(dim=-1)

    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, DTYPES[dtype_name.strip()])
        for experts in (int(e) for e in args.experts.split(",")):
            batch = -(-args.elements // experts)
            logits = torch.randn(batch, experts, device="cuda", dtype=dtype) * 3
            probs, _ = tempered_softmax_select(logits, temperature)
            ref_probs, _ = torch_tempered_softmax_select(logits, temperature)
            if not torch.allclose(probs.float(), ref_probs.float(), atol=1e-2, rtol=0):
                print(f"bench_kernel: kernel output differs from torch for {dtype_name} E={experts}; not timing it")
                return 1
            del probs, ref_probs
            rows += _measure(logits, dtype_name, temperature, routing, args)
            del logits
            torch.cuda.empty_cache()
    device = torch.cuda.get_device_name(0)
    console().print(table(
        f"tempered softmax + top-1, {args.elements} elements per row set, T={temperature}, {device}",
        ["dtype", "E", "B", "impl", "median ms", "p90 ms", "p99 ms", "GB/s", "x copy BW", "kernel speedup"],
        rows))
    print("targets: kernel >= 0.85x copy bandwidth, >= 2.5x eager, >= 1.0x compile "
          "(kernel speedup = that row's median / kernel median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
