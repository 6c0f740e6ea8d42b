"""A tiny Mixtral-like LM trained from scratch on Python's standard library, made top-1 four ways.

Issue 17, item 5. The corpus is every machine's own Python standard library (*.py, bytes as tokens, vocab 256;
test/, idlelib/, site-packages/ and encodings/ left out), files sorted by path, the last 10% of files held out.
A Mixtral config (hidden 64, 2 layers, 8 experts, top-2) is trained from scratch with `deploytool fit`, then
made top-1 at the same step budget: naive (k = 1, no training), plain top-1 fine-tuning (LM loss, k = 1),
`deploytool commit` without distillation, and `deploytool commit` (distillation from the top-2 model's logits,
the default), each row from `deploytool.lm_study.study_lm` (what `deploytool study --model DIR --data TOKENS`
runs). Prints the markdown table and writes a JSON beside --work. One thread (OMP_NUM_THREADS=1).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/lm_commit_study.py --work /tmp/lmstudy --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
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


def study(work: Path, seed: int, *, pretrain_steps: int, steps: int, long_steps: int, seq_len: int,
          batch_size: int, eval_tokens: int) -> list[dict]:
    """The seed's top-2 model (trained once, cached in --work), then its rows from deploytool.lm_study.study_lm:
    the four ways and MORE_METHODS at `steps`, the shipped commit again at `long_steps`."""
    import torch

    from deploytool.lm import LMSettings, fit_lm, routing_loss
    from deploytool.lm_study import METHODS, MORE_METHODS, study_lm

    torch.set_num_threads(1)
    train, test = corpus(work)
    common = dict(seq_len=seq_len, batch_size=batch_size, test_data=test, eval_tokens=eval_tokens)
    top2 = work / f"top2-s{seed}"
    if not (top2 / "metrics.json").exists():
        fit_lm(base_model(seed), train, out=top2, test_data=test, eval_tokens=eval_tokens, progress=False, force=True,
               loop=LMSettings(seq_len=seq_len, batch_size=batch_size, steps=pretrain_steps, lr=3e-3, seed=seed),
               loss=routing_loss(penalty="none", balance="switch", beta=0.01))
    names = list(METHODS)
    order = [*names[:2], *list(MORE_METHODS)[:1], *names[2:], *list(MORE_METHODS)[1:]]
    rows = study_lm(top2, data=train, out=None, seeds=[seed], steps=steps, methods=order, progress=False,
                    **common)["rows"][seed]
    commit = names[-1]
    longer = study_lm(top2, data=train, out=None, seeds=[seed], steps=long_steps, methods=[commit], progress=False,
                      **common)["rows"][seed][1]
    return [*rows, {**longer, "method": f"commit, {long_steps} steps"}]


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
    from deploytool.lm_study import per_seed_table

    print(per_seed_table(results))


if __name__ == "__main__":
    main()
