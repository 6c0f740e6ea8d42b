"""Batch-1 latency: ONNX Runtime (CPU) vs PyTorch eager for routed-mlp on digits, and the runner overhead.

Four callables timed interleaved in one process by deploytool's harness: PyTorch eager (the module
under inference_mode), the TorchRunner around it, a bare onnxruntime InferenceSession.run, and the
OnnxRuntimeRunner around the same model. Targets: ORT <= 0.2x torch eager; runner overhead <= 10 us.

    python benchmarks/bench_runners.py [--run-dir RUN] [--batch 1] [--threads 1] [--duration-s 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from deploytool.benchmark import harness
from deploytool.machine import machine_info
from deploytool.benchmark.stats import summarize
from deploytool.io import write_json

TARGET_RATIO = 0.2
TARGET_OVERHEAD_US = 10.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default=None, help="a trained routed-mlp run (default: train one, 2 epochs)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (0: ORT's default)")
    ap.add_argument("--duration-s", type=float, default=3.0)
    ap.add_argument("--warmup-ms", type=float, default=500.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from deploytool.data import load_digits
    from deploytool.export.onnx import export_onnx
    from deploytool.runners import make_runner
    from deploytool.checkpoints import load_model
    from deploytool.training import train

    work = Path(tempfile.mkdtemp(prefix="bench-runners-"))
    run_dir = Path(args.run_dir) if args.run_dir else train(None, work / "run", progress=False, epochs=2).path
    onnx_path = export_onnx(run_dir, work / "model.onnx").path
    x = np.ascontiguousarray(load_digits(0).x_test[: args.batch])
    feed = {"x": x}  # the built-in models' input

    model = load_model(run_dir)
    xt = torch.from_numpy(x)

    def torch_eager():
        with torch.inference_mode():
            return model(xt)

    options = ort.SessionOptions()
    if args.threads:
        options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def ort_bare():
        return session.run(names, feed)

    torch_runner = make_runner("torch", run_dir)
    ort_runner = make_runner("onnxruntime", onnx_path, threads=args.threads or None)
    with torch_runner, ort_runner:
        np.testing.assert_allclose(ort_runner.infer(feed)["output"], torch_eager().numpy(), atol=1e-5)
        calls = {"torch eager": torch_eager, "TorchRunner.infer": lambda: torch_runner.infer(feed),
                 "ort InferenceSession.run": ort_bare, "OnnxRuntimeRunner.infer": lambda: ort_runner.infer(feed)}
        samples = harness.measure(list(calls.values()), warmup_ms=args.warmup_ms, duration_s=args.duration_s)
    stats = {name: summarize(s, args.batch) for name, s in zip(calls, samples)}

    base = stats["torch eager"].median_ms
    print(f"routed-mlp digits, batch {args.batch}; torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"onnxruntime {ort.__version__} ({args.threads or 'default'} intra-op threads)")
    print(f"{'callable':<26} {'median us':>10} {'p90 us':>9} {'p99 us':>9} {'iters':>8} {'x torch eager':>14}")
    for name, s in stats.items():
        print(f"{name:<26} {s.median_ms * 1e3:>10.1f} {s.p90_ms * 1e3:>9.1f} {s.p99_ms * 1e3:>9.1f} "
              f"{s.iterations:>8} {s.median_ms / base:>14.3f}")
    ratio = stats["OnnxRuntimeRunner.infer"].median_ms / base
    overhead = (stats["OnnxRuntimeRunner.infer"].median_ms - stats["ort InferenceSession.run"].median_ms) * 1e3
    print(f"ORT runner / torch eager (median): {ratio:.3f} (target <= {TARGET_RATIO}: "
          f"{'met' if ratio <= TARGET_RATIO else 'MISSED'})")
    print(f"runner overhead over bare InferenceSession.run (median): {overhead:.2f} us (target <= "
          f"{TARGET_OVERHEAD_US:g} us: {'met' if overhead <= TARGET_OVERHEAD_US else 'MISSED'})")
    if args.json:
        write_json(args.json, {"machine": machine_info(), "batch": args.batch, "threads": args.threads,
                               "stats": {k: v.to_dict() for k, v in stats.items()},
                               "ort_over_torch": ratio, "runner_overhead_us": overhead})


if __name__ == "__main__":
    main()
