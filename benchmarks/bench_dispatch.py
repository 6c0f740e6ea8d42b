"""Dense vs sparse dispatch of RoutedExperts in PyTorch eager, at E experts and one large batch.

Dense runs every expert on every row and masks; sparse runs each expert on its own rows only, so its
ideal cost is 1/E of dense. Two timings per routing pattern, each dense and sparse interleaved by
deploytool's harness in one process:
  dispatch  the experts alone (RoutedExperts with the routing decision precomputed): what the
            dispatch choice changes;
  model     the whole forward (router, experts, head), which adds the same router cost to both.
Rows are picked so the router sends them uniformly, Zipf-skewed, or all to one expert.
Sparse runs plain Linear/ReLU experts by hand (no module calls, shared buffers); the third column,
`modules`, is sparse on a copy whose experts carry a no-op hook, which makes it call them as modules
(what any other expert gets).

On --device cuda each timed call ends with torch.cuda.synchronize(), so host latency covers the
GPU's work (sparse's one host sync, for the per-expert row counts, is inside it too).

    python benchmarks/bench_dispatch.py [--experts 8] [--batch 4096] [--threads N] [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
from torch import nn

from deploytool.benchmark import harness, patterns
from deploytool.machine import machine_info
from deploytool.benchmark.stats import summarize
from deploytool.data import load_blobs
from deploytool.io import write_json
from deploytool.models import RoutedMLP
from deploytool.nn import RoutedExperts, RouterOutput, routed_modules, set_dispatch


class FixedRouter(nn.Module):
    """Stands in for the router with a decision computed beforehand, so only the dispatch is timed."""

    def __init__(self, routing: RouterOutput, router: nn.Module):
        super().__init__()
        self.routing, self.n_experts, self.temperature = routing, router.n_experts, router.temperature

    def forward(self, x: torch.Tensor) -> RouterOutput:
        return self.routing


def with_module_calls(module: nn.Module) -> nn.Module:
    """A copy whose experts carry a no-op hook, so that sparse dispatch calls them as modules."""
    module = copy.deepcopy(module)
    for routed in routed_modules(module):
        for expert in routed.experts:
            expert.register_forward_pre_hook(lambda mod, args: None)
    return module


def timed(module: nn.Module, dispatch: str, x: torch.Tensor):
    def call():
        set_dispatch(module, dispatch)
        with torch.inference_mode():
            out = module(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        return out
    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--expert-hidden", type=int, default=256)
    ap.add_argument("--routing", default="uniform,skewed,single")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--duration-s", type=float, default=3.0)
    ap.add_argument("--warmup-ms", type=float, default=500.0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    data = load_blobs(0, n_samples=8192, n_features=args.features)
    pool = torch.from_numpy(np.concatenate([data.x_test, data.x_train]))
    model = RoutedMLP(args.features, data.n_classes, n_experts=args.experts, expert_hidden=args.expert_hidden).eval()
    model.to(args.device)
    pool = pool.to(args.device)
    routed = model.routed
    with torch.inference_mode():
        routes = routed.router(pool).index.cpu().numpy()

    print(f"RoutedMLP: {args.features} features, E={args.experts}, expert hidden {args.expert_hidden}, "
          f"batch {args.batch}; torch {torch.__version__} on {args.device}, {torch.get_num_threads()} threads; "
          "medians in ms")
    print(f"{'routing':<8} {'experts %':<25} {'timed':<9} {'dense':>7} {'sparse':>7} {'modules':>7} "
          f"{'d p90':>7} {'s p90':>7} {'d p99':>7} {'s p99':>7} {'sparse/dense':>12} {'modules/dense':>13}")
    rows = []
    for pattern in args.routing.split(","):
        (feed,) = patterns.select_rows(pattern, routes, args.experts, args.batch)
        x = pool[torch.from_numpy(feed).to(args.device)]
        with torch.inference_mode():
            routing = routed.router(x)
        hist = patterns.histogram(routing.index.cpu().numpy(), args.experts)
        mix = "/".join(f"{100 * c / args.batch:.0f}" for c in hist)
        dispatch_only = RoutedExperts(FixedRouter(routing, routed.router), list(routed.experts)).eval()
        dense_out, sparse_out = timed(dispatch_only, "dense", x)(), timed(dispatch_only, "sparse", x)()
        torch.testing.assert_close(sparse_out.output, dense_out.output, rtol=1e-5, atol=1e-5)
        for label, module in (("dispatch", dispatch_only), ("model", model)):
            fns = [timed(module, "dense", x), timed(module, "sparse", x), timed(with_module_calls(module), "sparse", x)]
            ns = harness.measure(fns, warmup_ms=args.warmup_ms, duration_s=args.duration_s)
            dense, sparse, modules = (summarize(v, args.batch) for v in ns)
            ratio, modules_ratio = sparse.median_ms / dense.median_ms, modules.median_ms / dense.median_ms
            print(f"{pattern:<8} {mix:<25} {label:<9} {dense.median_ms:7.3f} {sparse.median_ms:7.3f} "
                  f"{modules.median_ms:7.3f} {dense.p90_ms:7.3f} {sparse.p90_ms:7.3f} {dense.p99_ms:7.3f} "
                  f"{sparse.p99_ms:7.3f} {ratio:12.3f} {modules_ratio:13.3f}")
            rows.append({"routing": pattern, "timed": label, "histogram": hist, "dense": dense.to_dict(),
                         "sparse": sparse.to_dict(), "modules": modules.to_dict(), "ratio": ratio,
                         "modules_ratio": modules_ratio})
    machine = machine_info()
    print(f"{machine['cpu']}, {machine['cores']} cores; target sparse/dense <= 0.15 (1/E = {1 / args.experts:.3f})")
    if args.json:
        write_json(args.json, {"args": vars(args), "rows": rows, "machine": machine})


if __name__ == "__main__":
    main()
