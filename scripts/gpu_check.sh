#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU and torch preinstalled (no package index), build mltoolkit._C,
# run the CUDA self-checks and the GPU tests, then `bench --quick --device cuda`. Results land in
# benchmarks/results/<gpu>.{jsonl,md,png}; logs and results are also copied to $OUT when it is set (device tool).
#   STAGES="build selfcheck test bench" (default: all, in that order; a later call can run only "bench")
#   PYTEST_K="attention or rotary"      (optional -k filter for the GPU tests)
# Every stage has its own timeout; the whole run is meant to fit a 10-minute call on an H100/H200. The GPU tests use
# one Triton config per kernel (MLTK_TRITON_AUTOTUNE=0): autotuning every small test shape would take longer than
# the tests; the benchmarks autotune.
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

STAGES="${STAGES:-build selfcheck test bench}"
has() { [[ " $STAGES " == *" $1 "* ]]; }

if has build; then
  step "build (arch $TORCH_CUDA_ARCH_LIST)"
  rm -f .venv/.mltk-built
  timeout 420 make install PYTHON=python3 >"$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
  tail -5 "$OUT/build.log"
fi

if has selfcheck; then
  step "CUDA kernel self-checks"
  timeout 60 .venv/bin/python -X faulthandler scripts/cuda_norm_selfcheck.py 2>&1 | tee "$OUT/selfcheck.log" \
    | tail -8 || status=1
  timeout 150 .venv/bin/python -X faulthandler scripts/cuda_attention_selfcheck.py --quick 2>&1 \
    | tee "$OUT/selfcheck-attention.log" | tail -40 || status=1
  timeout 120 .venv/bin/python -X faulthandler scripts/cuda_conv_selfcheck.py --quick 2>&1 \
    | tee "$OUT/selfcheck-conv.log" | tail -60 || status=1
fi

if has test; then
  step "GPU tests"
  xdist=$(.venv/bin/python -c "import xdist" 2>/dev/null && echo "-n 8")
  MLTK_TRITON_AUTOTUNE=0 timeout 300 .venv/bin/python -m pytest -q -m cuda -p no:cacheprovider $xdist \
    ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$OUT/pytest.log" | tail -40 || status=1
fi

if has bench; then
  step "benchmarks"
  timeout 300 .venv/bin/python -m mltoolkit bench --quick --device cuda 2>&1 | tee "$OUT/bench.log" || status=1
  slug=$(.venv/bin/python -c "from mltoolkit.benchmark.harness import device_slug; print(device_slug('cuda'))")
  cp benchmarks/results/"$slug".* "$OUT"/ 2>/dev/null
fi
step "done (status $status)"
exit $status
