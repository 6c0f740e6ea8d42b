"""Deployed dispatch on ONNX Runtime CPU: deploytool's exports (sparse, dense, MoE op, auto) vs ORT's MoE op.

routed-mlp (E=8 experts Linear(64, 256) ReLU Linear(256, 64) ReLU, router Linear(64, 8), head
Linear(64, 10)) is exported by deploytool.export_onnx (what `deploytool export` writes: the logits and
the router's index and probs) four ways: dispatch="sparse" (the default; deploytool.dispatch: each
expert on its own rows), dispatch="dense" (every expert on every row, one-hot mask), moe_op="ort"
(com.microsoft::MoE, routed by the router's own HardSelect) and moe_op="auto" (the MoE op below 128
rows, the sparse graph from there on, by an ONNX If). Routing
is steered by the router's weights, not the inputs (x ~ N(0, 1)):
  uniform  router weight 8*I on the first 8 features: a row goes to its largest of them;
  skewed   the same plus a bias falling by 3 per expert: most rows go to the first experts;
  single   weight 0, bias favouring expert 0: every row goes there.
`moe` is the same model built by hand around com.microsoft.MoE, returning the logits only (the floor
for the op: no routing outputs, no If) (k=1, activation relu,
normalize_routing_weights=1, so the one chosen expert's weight is exactly 1): router Gemm ->
Softmax -> MoE (fc1 = each expert's first Linear [E, 256, 64], fc2 = its second [E, 64, 256]) ->
Relu (the expert's final ReLU, which the op has no slot for; relu(1 * y) = relu(y)) -> head Gemm.
`token` is the same model on [B, T, 64] inputs (B*T = 4096), routed per token.

All calls of one row are interleaved (deploytool's harness) so their ratios share the machine's
load; every output is checked against the dense model first. Threads: ORT's default and 1.

    python benchmarks/bench_deployed_dispatch.py [--duration-s 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

import deploytool
from deploytool.benchmark import harness
from deploytool.benchmark.stats import summarize
from deploytool.io import write_json
from deploytool.machine import machine_info
from deploytool.models import RoutedMLP
from deploytool.ops.onnx_functions import DEFAULT_OPSET

E, D, HIDDEN, CLASSES = 8, 64, 256, 10
#: (label, routing, batch or (B, T), include the MoE op)
CASES = [("routed-mlp", "uniform", 1, False), ("routed-mlp", "uniform", 64, True),
         ("routed-mlp", "uniform", 4096, True), ("routed-mlp", "skewed", 64, False),
         ("routed-mlp", "skewed", 4096, False), ("routed-mlp", "single", 64, False),
         ("routed-mlp", "single", 4096, False), ("token", "uniform", (16, 256), False)]
#: (label, batch) -> the most the default (sparse) / dense may be; batch -> the most auto / moe may be
DENSE_TARGETS = {("routed-mlp", 4096): 0.15, ("routed-mlp", 64): 0.5, ("routed-mlp", 1): 1.0, ("token", 4096): 0.5}
MOE_TARGETS = {4096: 1.0, 64: 1.0}
#: deploytool's exports: kind -> export_onnx options
COLUMNS = ("dense", "sparse", "ort", "auto", "moe")
EXPORTS = {"dense": {"dispatch": "dense"}, "sparse": {}, "ort": {"moe_op": "ort"}, "auto": {"moe_op": "auto"}}


def steer(model: RoutedMLP, routing: str) -> None:
    """Set the router's weights so that N(0, 1) rows follow `routing`."""
    layer = model.routed.router.net[0]
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
        if routing == "single":
            layer.bias[0] = 8.0
        else:
            layer.weight[:, :E] = 8 * torch.eye(E)
            if routing == "skewed":
                layer.bias.copy_(-3.0 * torch.arange(E))


def export(model: RoutedMLP, example: torch.Tensor, options: dict, path: Path) -> bytes:
    dims = {"x": {1: "tokens"}} if example.dim() == 3 else None
    deploytool.export_onnx(model, path, example_inputs=example, dynamic_dims=dims, validate=False, **options)
    return path.read_bytes()


def moe_graph(model: RoutedMLP) -> bytes:
    """The same weights around com.microsoft.MoE (see the module docstring for the mapping)."""
    def weights(name: str, tensor: torch.Tensor):
        return numpy_helper.from_array(tensor.detach().numpy().astype(np.float32), name)

    first = [expert[0][0] for expert in model.routed.experts]   # Sequential(Sequential(fc1, ReLU, fc2), ReLU)
    second = [expert[0][2] for expert in model.routed.experts]
    router, head = model.routed.router.net[0], model.head
    init = [weights("router_w", router.weight), weights("router_b", router.bias),
            weights("fc1_w", torch.stack([m.weight for m in first])), weights("fc1_b", torch.stack([m.bias for m in first])),
            weights("fc2_w", torch.stack([m.weight for m in second])), weights("fc2_b", torch.stack([m.bias for m in second])),
            weights("head_w", head.weight), weights("head_b", head.bias)]
    nodes = [helper.make_node("Gemm", ["x", "router_w", "router_b"], ["logits"], transB=1),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
             helper.make_node("MoE", ["x", "probs", "fc1_w", "fc1_b", "fc2_w", "fc2_b"], ["mixed"],
                              domain="com.microsoft", k=1, activation_type="relu", normalize_routing_weights=1),
             helper.make_node("Relu", ["mixed"], ["routed"]),
             helper.make_node("Gemm", ["routed", "head_w", "head_b"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", CLASSES])], init)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return proto.SerializeToString()


def session(model: bytes, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0: ORT's default (one per core)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration-s", type=float, default=2.0, help="timed seconds per callable and row")
    ap.add_argument("--warmup-ms", type=float, default=200.0)
    ap.add_argument("--threads", default="0,1", help="ORT intra-op threads to run, 0 = ORT's default")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    for name in ("torch.onnx", "torch.export", "torch.fx", "torch._export"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.simplefilter("ignore")

    tmp = Path(tempfile.mkdtemp(prefix="bench-deployed-"))
    torch.manual_seed(0)
    model = RoutedMLP(D, CLASSES, n_experts=E, expert_hidden=HIDDEN, width=D).eval()
    rng = np.random.default_rng(0)
    graphs: dict[tuple[str, str], dict[str, bytes]] = {}
    routers: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # routing -> the router's (weight, bias)
    for label, routing, shape, with_moe in CASES:
        if (label, routing) not in graphs:
            steer(model, routing)
            layer = model.routed.router.net[0]
            routers[routing] = (layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy())
            example = torch.randn(2, D) if label == "routed-mlp" else torch.randn(2, 3, D)
            graphs[label, routing] = {k: export(model, example, options, tmp / f"{label}-{routing}-{k}.onnx")
                                      for k, options in EXPORTS.items()}
            if label == "routed-mlp" and routing == "uniform":
                graphs[label, routing]["moe"] = moe_graph(model)

    print(f"ONNX Runtime {ort.__version__} CPU; routed-mlp E={E}, D={D}, expert hidden {HIDDEN}; "
          f"latency in ms (median, p90, p99); ratios of medians")
    header = (f"{'model':<10} {'routing':<8} {'rows':>5} {'thr':>3} {'experts %':<24} "
              + " ".join(f"{k:>20}" for k in COLUMNS) + f" {'sp/dense':>8} {'auto/moe':>8} {'auto/ort':>8}  targets")
    print(header)
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        for label, routing, shape, with_moe in CASES:
            batch = shape if isinstance(shape, int) else shape[0] * shape[1]
            x = rng.standard_normal((*np.atleast_1d(shape), D)).astype(np.float32)
            kinds = [k for k in COLUMNS if k in graphs[label, routing] and (with_moe or k != "moe")]
            sessions = {k: session(graphs[label, routing][k], threads) for k in kinds}
            results = {k: s.run(None, {s.get_inputs()[0].name: x}) for k, s in sessions.items()}
            for k in kinds[1:]:
                np.testing.assert_allclose(results[k][0], results["dense"][0], rtol=1e-4, atol=1e-4, err_msg=k)
            weight, bias = routers[routing]
            hist = np.bincount((x.reshape(-1, D) @ weight.T + bias).argmax(-1), minlength=E)
            mix = "/".join(f"{100 * c / batch:.0f}" for c in hist)
            fns = [lambda s=s: s.run(None, {s.get_inputs()[0].name: x}) for s in sessions.values()]
            stats = dict(zip(kinds, (summarize(ns, batch) for ns in
                                     harness.measure(fns, warmup_ms=args.warmup_ms, duration_s=args.duration_s))))
            ratio = stats["sparse"].median_ms / stats["dense"].median_ms
            moe_ratio = stats["auto"].median_ms / stats["moe"].median_ms if "moe" in stats else None
            ort_ratio = stats["auto"].median_ms / stats["ort"].median_ms
            verdicts = []
            if routing == "uniform" and (label, batch) in DENSE_TARGETS:
                goal = DENSE_TARGETS[label, batch]
                verdicts.append(f"dense<={goal}: {'met' if ratio <= goal else 'MISSED'}")
            if moe_ratio is not None:
                goal = MOE_TARGETS[batch]
                verdicts.append(f"auto/moe<={goal}: {'met' if moe_ratio <= goal else 'MISSED'}")
            cells = " ".join(f"{stats[k].median_ms:6.3f} {stats[k].p90_ms:6.3f} {stats[k].p99_ms:6.3f}" if k in stats
                             else f"{'-':>20}" for k in COLUMNS)
            print(f"{label:<10} {routing:<8} {batch:>5} {threads:>3} {mix:<24} {cells} {ratio:8.3f} "
                  f"{moe_ratio if moe_ratio is not None else float('nan'):8.3f} {ort_ratio:8.3f}  "
                  f"{', '.join(verdicts)}", flush=True)
            rows.append({"model": label, "routing": routing, "shape": shape, "threads": threads,
                         "histogram": hist.tolist(),
                         **{k: v.to_dict() for k, v in stats.items()}, "sparse_over_dense": ratio,
                         "auto_over_moe": moe_ratio, "auto_over_ort": ort_ratio, "targets": verdicts})
    machine = machine_info()
    print(f"{machine['cpu']}, {machine['cores']} cores; threads 0 = ORT's default")
    if args.json:
        write_json(args.json, {"args": vars(args), "rows": rows, "machine": machine})


if __name__ == "__main__":
    main()
