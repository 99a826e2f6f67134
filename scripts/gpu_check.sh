#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU and torch preinstalled (no package index), build mltoolkit._C,
# run the CUDA self-check and the GPU tests, then `bench --quick --device cuda`. Results land in
# benchmarks/results/<gpu>.{jsonl,md,png}; logs and results are also copied to $OUT when it is set (device tool).
# Meant to finish in under 8 minutes on an H100/H200.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu-check-logs}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(python3 -c 'import torch; p=torch.cuda.get_device_capability(); print(f"{p[0]}.{p[1]}")')}"
status=0
[ -n "${MLTK_GIT_SHA:-}" ] || export MLTK_GIT_SHA=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
step() { echo "=== $1 ($(date +%T))"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/env.txt"

step "build (arch $TORCH_CUDA_ARCH_LIST)"
rm -f .venv/.mltk-built
make install PYTHON=python3 >"$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
tail -15 "$OUT/build.log"

step "CUDA kernel self-check"
.venv/bin/python -X faulthandler scripts/cuda_norm_selfcheck.py 2>&1 | tee "$OUT/selfcheck.log" | tail -15 || status=1

step "GPU tests"
xdist=$(.venv/bin/python -c "import xdist" 2>/dev/null && echo "-n 8")
timeout 300 .venv/bin/python -m pytest -q -m cuda -p no:cacheprovider $xdist 2>&1 \
  | tee "$OUT/pytest.log" | tail -25 || status=1

step "benchmarks"
timeout 300 .venv/bin/python -m mltoolkit bench --quick --device cuda 2>&1 | tee "$OUT/bench.log" || status=1
slug=$(.venv/bin/python -c "from mltoolkit.benchmark.harness import device_slug; print(device_slug('cuda'))")
cp benchmarks/results/"$slug".* "$OUT"/ 2>/dev/null
step "done (status $status)"
exit $status
