"""Regenerates docs/routing.md's `deploytool commit` table: soft-train routed-mlp on digits, commit it, measure.

For each seed, what issue 17 reproduces from the command line:

    deploytool train --dataset digits --experts 4 --penalty none --temperature 1 --temperature-end 1 \
        --seed S --out softS
    deploytool commit softS --out cS

then the same soft model committed two other ways, to show what each part of the recipe does:
  commit            deploytool.commit's defaults (the whole model annealed under the load guard);
  commit, no guard  the same with guard=0;
  former recipe     the recipe before the guard: 25 epochs of routers only (alpha 2, annealed), then 15 of
                    the whole model at the final temperature (lr 2e-3), no guard.

Targets (issue 17), per seed: hard accuracy after within 1 point of the soft model's soft accuracy, >= 95%
of routing decisions confident (top probability >= 0.99), every expert >= 10% of the test samples.
Everything runs on one thread (OMP_NUM_THREADS=1, torch.set_num_threads(1)); about 1 minute in all.

    python benchmarks/commit_study.py [--seeds 0 1 2] [--commit-seeds 0] [--variants commit ...]
                                      [--soft-balance entropy] [--json commit_study.json] [--keep DIR]

`--commit-seeds 0 1 2 3 4 --variants commit` commits each soft model 5 times: the test set has 360 samples,
so one seed's accuracy moves by steps of 0.28 point, and one run per seed says little about the margin.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported

import argparse
import datetime
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

import deploytool
from deploytool.io import write_json
from deploytool.machine import cpu_model, machine_info

VARIANTS = {  # CommitSettings fields, and "alpha" for the routing loss
    "commit": {},
    "commit, no guard": {"guard": 0.0},
    "former recipe": {"router_epochs": 25, "model_epochs": 15, "alpha": 2.0, "model_lr": 2e-3, "guard": 0.0},
}
WITHIN_PT, CONFIDENT, MIN_LOAD = 1.0, 0.95, 0.10


def run(seeds: list[int], work: Path, variants: list[str], commit_seeds: list[int],
        soft_balance: str = "entropy") -> list[dict]:
    rows = []
    for seed in seeds:
        start = time.perf_counter()
        soft = deploytool.train(None, work / f"soft{seed}", progress=False, dataset="digits", experts=4,
                                penalty="none", temperature=1.0, temperature_end=1.0, seed=seed,
                                balance=soft_balance)
        soft_seconds = time.perf_counter() - start
        for variant, commit_seed in ((v, c) for v in variants for c in commit_seeds):
            options = VARIANTS[variant]
            start = time.perf_counter()
            name = f"{variant.replace(' ', '').replace(',', '-')}{seed}-{commit_seed}"
            settings = {k: v for k, v in options.items() if k != "alpha"}
            loss = deploytool.CommitSettings.default_loss(alpha=options["alpha"]) if "alpha" in options else None
            committed = deploytool.commit(soft.path, out=work / name, progress=False, loss=loss,
                                          settings=deploytool.CommitSettings(seed=commit_seed, **settings))
            seconds = time.perf_counter() - start
            m, before = committed.metrics, committed.metrics["before"]
            gap = 100 * (m["hard_accuracy"] - before["soft_accuracy"])
            rows.append({
                "variant": variant, "seed": seed, "soft_balance": soft_balance, "commit_seed": commit_seed,
                "options": options,
                "soft_before": before["soft_accuracy"], "hard_before": before["hard_accuracy"],
                "loads_before": soft.metrics["expert_load"],
                "soft_loads_before": next(iter(m["load_targets"].values()), None),
                "hard_after": m["hard_accuracy"], "soft_after": m["soft_accuracy"], "gap_pt": gap,
                "confident": m["frac_confident"], "loads_after": m["expert_load"],
                "min_load": m["min_expert_load"], "soft_seconds": soft_seconds, "commit_seconds": seconds,
                "meets": (gap >= -WITHIN_PT and m["frac_confident"] >= CONFIDENT
                          and m["min_expert_load"] >= MIN_LOAD),
            })
            print(f"{variant:18} seed {seed}, commit seed {commit_seed}: hard {m['hard_accuracy']:.3f} "
                  f"({gap:+.1f} pt), {m['frac_confident']:.1%} confident, loads {_loads(m['expert_load'])}, "
                  f"{seconds:.1f} s",
                  file=sys.stderr, flush=True)
    return rows


def _loads(loads: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in loads)


def table(rows: list[dict], variants: list[str]) -> str:
    lines = ["| recipe | seed | commit seed | soft acc before | hard acc before | soft loads before | hard acc after "
             "| vs soft before | confident | expert loads after | meets targets | seconds (soft train + commit) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loads = " ".join(f"**{v:.2f}**" if v < MIN_LOAD else f"{v:.2f}" for v in r["loads_after"])
        lines.append(f"| {r['variant']} | {r['seed']} | {r['commit_seed']} | {r['soft_before']:.3f} "
                     f"| {r['hard_before']:.3f} | {_loads(r['soft_loads_before'])} | {r['hard_after']:.3f} "
                     f"| {r['gap_pt']:+.1f} pt | {r['confident']:.1%} | {loads} "
                     f"| {'yes' if r['meets'] else 'no'} | {r['soft_seconds']:.1f} + {r['commit_seconds']:.1f} |")
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        lines.append(f"| **{variant}, worst of {len(mine)}** | | | | | "
                     f"| {min(r['hard_after'] for r in mine):.3f} "
                     f"| {min(r['gap_pt'] for r in mine):+.1f} pt | {min(r['confident'] for r in mine):.1%} "
                     f"| min {min(r['min_load'] for r in mine):.2f} "
                     f"| {'yes' if all(r['meets'] for r in mine) else 'no'} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--commit-seeds", type=int, nargs="+", default=[0],
                        help="Commit each soft model once per seed (its shuffling and torch seed).")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT",
                        help=f"Which recipes to run: {', '.join(map(repr, VARIANTS))} (default: all).")
    parser.add_argument("--soft-balance", default="entropy", choices=["entropy", "switch", "none"],
                        help="The soft models' balance term (entropy: issue 17's command, the recipe's default).")
    parser.add_argument("--json", default="commit_study.json", help="Where the rows and the machine go.")
    parser.add_argument("--keep", help="Keep the run directories here (default: a temporary directory).")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = datetime.datetime.now(datetime.timezone.utc)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        rows = run(args.seeds, work, args.variants, args.commit_seeds, args.soft_balance)
    command = "OMP_NUM_THREADS=1 python " + " ".join(shlex.quote(a) for a in sys.argv)
    print(f"Generated by `{command}` on {started:%Y-%m-%d %H:%M} UTC, {cpu_model()}, 1 thread "
          f"(torch {torch.__version__}, deploytool {deploytool.__version__}).\n")
    print(table(rows, args.variants))
    write_json(args.json, {"command": command, "date_utc": started.isoformat(timespec="seconds"), "threads": 1,
                           "machine": machine_info(), "targets": {"within_pt": WITHIN_PT, "confident": CONFIDENT,
                                                                  "min_load": MIN_LOAD}, "rows": rows})
    print(f"\nrows written to {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
