"""Hugging Face MoE language models deployed at top-1: deploytool's exports against HF eager and plain ONNX.

Tiny Mixtral-like (softmax, top-2 renormalised, SwiGLU experts of width 2H) and Qwen3-MoE-like (top-2
renormalised, experts of width H) causal LMs, 2 layers, 8 experts, vocab 256, random weights, built
from their configs. Per hidden size and token batch, every callable of a row runs interleaved in one
process (deploytool's harness), so their ratios share the machine's load:
  hf-k2        HF eager at the model's own k=2 (its default experts implementation), torch
  hf-k1        HF eager with its routers set to k=1, torch
  plain-k1     torch.onnx.export(dynamo) of the HF model at k=1 with experts_implementation
               "batched_mm" (the one that exports), ONNX Runtime
  sparse       deploytool.from_hf(top_k=1) + export_onnx (the default: each expert on its tokens), ORT
  dense        the same with dispatch="dense", ORT
  moe-op       the same with moe_op="ort" (com.microsoft::MoE), ORT
  auto         the same with moe_op="auto" (the MoE op below 128 tokens a call, sparse from there on), ORT
Every ONNX model's logits are checked against hf-k1 first. torch and ORT run with the same thread count.

    python benchmarks/bench_hf_moe.py [--duration-s 1.5] [--threads 2,1] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import deploytool
from deploytool.benchmark import harness
from deploytool.benchmark.stats import summarize
from deploytool.io import write_json
from deploytool.machine import machine_info

FAMILIES = {"mixtral": lambda h: dict(intermediate_size=2 * h, num_local_experts=8),
            "qwen3_moe": lambda h: dict(moe_intermediate_size=h, num_experts=8, norm_topk_prob=True,
                                        decoder_sparse_step=1, mlp_only_layers=[])}
#: (hidden, batch, tokens)
SIZES = [(64, 8, 64), (256, 8, 64), (256, 32, 128)]
KINDS = ("hf-k2", "hf-k1", "plain-k1", "sparse", "dense", "moe-op", "auto")
TARGETS = {"hf-k2": 0.4, "plain-k1": 0.5}  # sparse / that row, at most
OWN_LOWERINGS = ("sparse", "dense", "moe-op", "auto")


def build(family: str, hidden: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=hidden // 4, vocab_size=256, num_experts_per_tok=2,
                                  max_position_embeddings=512, **FAMILIES[family](hidden))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def set_hf_top_k(model, k: int) -> None:
    for module in model.modules():
        if type(module).__name__.endswith(("TopKRouter", "TopkRouter")):
            module.top_k = k


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def plain_export(model, ids: torch.Tensor, path: Path) -> Path:
    model = copy.deepcopy(model)
    set_hf_top_k(model, 1)
    model.set_experts_implementation("batched_mm")
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("tokens")},)
    torch.onnx.export(Logits(model), (ids,), str(path), dynamo=True, dynamic_shapes=dims, optimize=True,
                      verbose=False)
    return path


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration-s", type=float, default=1.5, help="timed seconds per callable and row")
    ap.add_argument("--warmup-ms", type=float, default=200.0)
    ap.add_argument("--threads", default="2,1", help="threads for torch and ONNX Runtime, one run each")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    for name in ("torch.onnx", "torch.export", "torch.fx", "torch._export", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    threads_list = [int(t) for t in args.threads.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-hf-moe-"))
    print(f"torch {torch.__version__}, ONNX Runtime {ort.__version__}, CPU; latency in ms (median p90 p99); "
          "ratios of medians; sparse is deploytool's default export at top-1")
    print(f"{'model':<10} {'H':>4} {'B x T':>8} {'thr':>3} " + " ".join(f"{k:>20}" for k in KINDS)
          + f" {'sp/hf-k2':>8} {'sp/plain':>8} {'sp/best':>7}  targets")
    rows = []
    for family in args.families.split(","):
        for hidden, batch, tokens in SIZES:
            model = build(family, hidden)
            hf_k1 = copy.deepcopy(model)
            set_hf_top_k(hf_k1, 1)
            ids = torch.randint(0, 256, (batch, tokens), generator=torch.Generator().manual_seed(1))
            example = torch.randint(0, 256, (2, 16))
            stem = f"{family}-{hidden}"
            paths = {"plain-k1": plain_export(model, example, tmp / f"{stem}-plain.onnx")}
            converted = deploytool.from_hf(copy.deepcopy(model), top_k=1)
            for kind, options in (("sparse", {}), ("dense", {"dispatch": "dense"}), ("moe-op", {"moe_op": "ort"}),
                                  ("auto", {"moe_op": "auto"})):
                paths[kind] = deploytool.export_onnx(converted, tmp / f"{stem}-{kind}.onnx", example_inputs=example,
                                                     validate=False, **options).path
            with torch.no_grad():
                want = hf_k1(ids).logits.numpy()
            for threads in threads_list:
                torch.set_num_threads(threads)
                sessions = {k: session(p, threads) for k, p in paths.items()}
                feed = ids.numpy()
                for kind, s in sessions.items():
                    got = s.run(None, {s.get_inputs()[0].name: feed})[0]
                    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3, err_msg=kind)

                def torch_call(m):
                    def call():
                        with torch.inference_mode():
                            return m(ids).logits
                    return call

                fns = {"hf-k2": torch_call(model), "hf-k1": torch_call(hf_k1),
                       **{k: (lambda s=s: s.run(None, {s.get_inputs()[0].name: feed})) for k, s in sessions.items()}}
                samples = harness.measure(list(fns.values()), warmup_ms=args.warmup_ms, duration_s=args.duration_s)
                stats = {k: summarize(ns, batch) for k, ns in zip(fns, samples)}
                med = {k: v.median_ms for k, v in stats.items()}
                ratios = {"hf-k2": med["sparse"] / med["hf-k2"], "plain-k1": med["sparse"] / med["plain-k1"],
                          "best": med["sparse"] / min(med[k] for k in OWN_LOWERINGS)}
                verdicts = [f"<={goal} {k}: {'met' if ratios[k] <= goal else 'MISSED'}" for k, goal in TARGETS.items()]
                verdicts.append(f"<=1.05 best: {'met' if ratios['best'] <= 1.05 else 'MISSED'}")
                cells = " ".join(f"{stats[k].median_ms:6.2f} {stats[k].p90_ms:6.2f} {stats[k].p99_ms:6.2f}"
                                 for k in KINDS)
                print(f"{family:<10} {hidden:>4} {f'{batch}x{tokens}':>8} {threads:>3} {cells} "
                      f"{ratios['hf-k2']:8.3f} {ratios['plain-k1']:8.3f} {ratios['best']:7.3f}  {', '.join(verdicts)}",
                      flush=True)
                rows.append({"family": family, "hidden": hidden, "batch": batch, "tokens": tokens, "threads": threads,
                             **{k: v.to_dict() for k, v in stats.items()}, "ratios": ratios, "targets": verdicts})
    machine = machine_info()
    print(f"{machine['cpu']}, {machine['cores']} cores")
    if args.json:
        write_json(args.json, {"args": vars(args), "rows": rows, "machine": machine})


if __name__ == "__main__":
    main()
