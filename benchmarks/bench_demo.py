"""`deploytool bench` on the demo model (routed-mlp, digits-4 recipe): the README's latency claims.

Trains the recipe (or takes --run DIR), exports it to DIR/model.onnx, then benchmarks PyTorch eager
(dense and sparse dispatch) and ONNX Runtime CPU in one run, for every batch size and routing
pattern; prints the tables and writes the JSON and the plot.

    python benchmarks/bench_demo.py [--run DIR] [--out-dir benchmarks/results] [--duration-s 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from deploytool.benchmark.run import bench
from deploytool.cli.bench import render
from deploytool.export.onnx import export_onnx
from deploytool.training import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None, help="a trained run directory (default: train digits-4)")
    ap.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--backends", default="torch,torch-sparse,onnxruntime")
    ap.add_argument("--batch-sizes", default="1,8,64,256")
    ap.add_argument("--routing", default="uniform,skewed,single")
    ap.add_argument("--duration-s", type=float, default=3.0)
    args = ap.parse_args()

    run = args.run or train("digits-4", Path(tempfile.mkdtemp(prefix="bench-demo-")) / "run").path
    if not (run / "model.onnx").is_file():
        export_onnx(run, run / "model.onnx")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path, plot_path = args.out_dir / "bench_demo.json", args.out_dir / "bench_demo.png"
    result = bench(run, backends=args.backends.split(","), batch_sizes=args.batch_sizes,
                   routing=args.routing.split(","), duration_s=args.duration_s, json_path=json_path,
                   plot_path=plot_path)
    render(result, json_path, plot_path)
    by = {(ln.backend, ln.batch_size, ln.routing): ln for ln in result.lines}
    ort1 = by.get(("onnxruntime", 1, "uniform"))
    if ort1 is not None and result.backends[0] == "torch":
        print(f"target: onnxruntime batch 1 median <= 0.2x torch eager: measured {ort1.ratio:.3f}x")


if __name__ == "__main__":
    main()
