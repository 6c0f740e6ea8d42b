#!/usr/bin/env bash
# One-shot GPU check for an H100/H200 machine: GPU tests, the routing kernel benchmark, and dense vs
# sparse dispatch (torch on CUDA, ONNX Runtime CPU for reference), every table and log written to OUT.
# Each step has its own time limit (460 s in all, 5 s more each to kill) so the run stays under 8
# minutes; a step that fails or times out is logged and the rest still run. Exits 3 with one line where there is no CUDA GPU, else
# the number of failed steps.
#
#     bash benchmarks/gpu_check.sh OUT
set -u
if [ $# -ne 1 ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUT_DIR" >&2
    exit 2
fi
out=$1
python=${PYTHON:-python}
if ! command -v nvidia-smi >/dev/null 2>&1 \
        || ! "$python" -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1; then
    echo "gpu_check: no CUDA GPU here (nvidia-smi or torch.cuda missing); nothing was run"
    exit 3
fi
mkdir -p "$out"
cd "$(dirname "$0")/.."
failed=0

step() {  # step NAME SECONDS COMMAND...: runs COMMAND under `timeout`, output to OUT/NAME.log
    local name=$1 seconds=$2
    shift 2
    local start=$SECONDS
    timeout --kill-after=5 "$seconds" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/summary.txt"
    [ $rc -eq 0 ] || failed=$((failed + 1))
}

nvidia-smi >"$out/nvidia-smi.txt" 2>&1
step pytest-gpu 130 "$python" -m pytest -m gpu -q
step bench-kernel 110 "$python" benchmarks/bench_kernel.py
step bench-dispatch-cuda 80 "$python" benchmarks/bench_dispatch.py --device cuda --duration-s 1 \
    --json "$out/bench_dispatch_cuda.json"
step bench-dispatch-cpu 30 "$python" benchmarks/bench_dispatch.py --device cpu --duration-s 1 \
    --json "$out/bench_dispatch_cpu.json"
step bench-deployed-ort-cpu 60 "$python" benchmarks/bench_deployed_dispatch.py --duration-s 0.5 --threads 0 \
    --json "$out/bench_deployed_dispatch.json"
# ONNX Runtime's CUDA provider through the backend registry: verify against torch, bench against ORT CPU
# (exit 3 in its log where onnxruntime-gpu is not installed)
step ort-cuda 50 bash -c "deploytool train --recipe digits-4 --epochs 3 --out '$out/run' --quiet --force \
    && deploytool export '$out/run' --out '$out/model.onnx' > /dev/null \
    && deploytool verify '$out/model.onnx' -c '$out/run' --backends torch,onnxruntime-cuda \
    && deploytool bench '$out/model.onnx' --backends onnxruntime,onnxruntime-cuda --batch-sizes 1,256 \
       --duration-s 1 --json '$out/bench_ort_cuda.json'"
exit $failed
