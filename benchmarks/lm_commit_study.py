"""A tiny Mixtral-like LM trained from scratch on Python's standard library, made top-1 four ways.

Issue 17, item 5. The corpus is every machine's own Python standard library (*.py, bytes as tokens, vocab 256;
test/, idlelib/, site-packages/ and encodings/ left out), files sorted by path, the last 10% of files held out.
A Mixtral config (hidden 64, 2 layers, 8 experts, top-2) is trained from scratch with `deploytool fit`, then
made top-1 at the same step budget: naive (k = 1, no training), plain top-1 fine-tuning (LM loss, k = 1),
`deploytool commit` without distillation, and `deploytool commit` (distillation from the top-2 model's logits,
the default). Prints the markdown table and writes a JSON beside --work. One thread (OMP_NUM_THREADS=1).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/lm_commit_study.py --work /tmp/lmstudy --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
SKIP = {"test", "tests", "idlelib", "site-packages", "encodings", "__pycache__", "lib2to3", "turtledemo"}


def corpus(work: Path) -> tuple[Path, Path]:
    """train.txt and test.txt: the standard library's sources, the last 10% of files held out."""
    train, test = work / "train.txt", work / "test.txt"
    if train.exists() and test.exists():
        return train, test
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SKIP & set(p.relative_to(root).parts[:-1]))
    cut = int(len(files) * 0.9)
    for path, part in ((train, files[:cut]), (test, files[cut:])):
        with open(path, "wb") as fh:
            for f in part:
                fh.write(f.read_bytes())
    return train, test


def base_model(seed: int):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from deploytool.hf import from_hf

    torch.manual_seed(seed)
    config = MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=256, num_local_experts=8,
                           num_experts_per_tok=2, max_position_embeddings=512, tie_word_embeddings=False)
    return from_hf(MixtralForCausalLM(config).eval())


def row(name: str, run_metrics: dict, seconds: float | None, reference: float) -> dict:
    m = run_metrics
    return {"method": name, "perplexity": m["perplexity"], "ratio": m["perplexity"] / reference,
            "confident": {p: r["frac_confident"] for p, r in m["routers"].items()},
            "min_load": min(r["min_expert_load"] for r in m["routers"].values()),
            "loads": {p: r["expert_load"] for p, r in m["routers"].items()}, "seconds": seconds}


def study(work: Path, seed: int, *, pretrain_steps: int, steps: int, long_steps: int, seq_len: int,
          batch_size: int, eval_tokens: int) -> list[dict]:
    import torch

    import deploytool.nn
    from deploytool.hf import set_top_k
    from deploytool.lm import LMCommitSettings, LMSettings, commit_lm, fit_lm, routing_loss
    from deploytool.metrics import lm_metrics
    from deploytool.tokens import load_tokens

    torch.set_num_threads(1)
    train, test = corpus(work)
    common = dict(test_data=test, progress=False, force=True)
    loop = dict(seq_len=seq_len, batch_size=batch_size, seed=seed)

    def commit(out, loss=None, **settings):
        return commit_lm(top2, train, out=out, settings=LMCommitSettings(**loop, eval_tokens=eval_tokens, **settings),
                         loss=loss, **common)

    top2 = work / f"top2-s{seed}"
    if not (top2 / "metrics.json").exists():
        fit_lm(base_model(seed), train, out=top2, loop=LMSettings(**loop, steps=pretrain_steps, lr=3e-3),
               loss=routing_loss(penalty="none", balance="switch", beta=0.01), eval_tokens=eval_tokens, **common)
    ref = json.loads((top2 / "metrics.json").read_text())
    reference = ref["topk_perplexity"]
    rows = [dict(row("top-2 original", {**ref, "perplexity": reference}, None, reference))]  # trained once, cached
    rows[0]["confident"] = {p: float("nan") for p in ref["routers"]}
    rows[0]["min_load"] = float("nan")

    from deploytool.checkpoints import open_module

    naive = open_module(top2).module
    set_top_k(naive, 1)
    rows.append(row("naive (k = 1)", lm_metrics(naive, load_tokens(test), seq_len=seq_len, max_tokens=eval_tokens),
                    0.0, reference))
    # commit_lm as plain top-1: no penalty, no guard, no anneal
    plain = dict(guard=0.0, temperature_end=1.0, straight_through=False)
    plain_loss = LMCommitSettings.default_loss(alpha=0.0)
    runs = {
        "plain top-1 fine-tuning": lambda out: fit_lm(top2, train, out=out, top_k=1, eval_tokens=eval_tokens,
                                                      loop=LMSettings(**loop, steps=steps, lr=1e-3), **common),
        "commit, no distillation": lambda out: commit(out, steps=steps, distill=0.0),
        "**commit** (distillation, default)": lambda out: commit(out, steps=steps),
        "plain top-1 fine-tuning + distillation": lambda out: commit(out, plain_loss, steps=steps, **plain),
        f"commit, {long_steps} steps": lambda out: commit(out, steps=long_steps),
    }
    for i, (name, go) in enumerate(runs.items()):
        out = work / f"row{i}-s{seed}"
        t0 = time.process_time()
        run = go(out)
        rows.append(row(name, run.metrics, time.process_time() - t0, reference))
        if i == 0:  # the plain model's routers at commit's deployed temperature: the output is the same at k = 1
            cold = open_module(out).module
            deploytool.nn.set_temperature(cold, 0.05)
            rows.append(row("plain top-1 fine-tuning, temperature then set to 0.05",
                            lm_metrics(cold, load_tokens(test), seq_len=seq_len, max_tokens=eval_tokens), None,
                            reference))
    return rows


def markdown(results: dict[int, list[dict]]) -> str:
    lines = ["| seed | method | perplexity | x top-2 | confident (layer 0 / 1) | min expert load | CPU s |",
             "|---|---|---|---|---|---|---|"]
    for seed, rows in results.items():
        for r in rows:
            conf = " / ".join("-" if math.isnan(v) else f"{v:.1%}" for v in r["confident"].values())
            load = "-" if math.isnan(r["min_load"]) else f"{r['min_load']:.1%}"
            secs = "-" if r["seconds"] is None else f"{r['seconds']:.0f}"
            lines.append(f"| {seed} | {r['method']} | {r['perplexity']:.3f} | {r['ratio']:.3f} | {conf} | {load} | "
                         f"{secs} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/lm-commit-study"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps of every row")
    parser.add_argument("--long-steps", type=int, default=2500, help="steps of the last row (within 3x plain's CPU)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-tokens", type=int, default=1 << 15)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = {s: study(args.work, s, pretrain_steps=args.pretrain_steps, steps=args.steps, long_steps=args.long_steps,
                        seq_len=args.seq_len,
                        batch_size=args.batch_size, eval_tokens=args.eval_tokens) for s in args.seeds}
    (args.work / "results.json").write_text(json.dumps(results, indent=1))
    print(markdown(results))


if __name__ == "__main__":
    main()
