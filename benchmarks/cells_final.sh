#!/usr/bin/env bash
# Final device rounds of the small-map path (engine v3).
# Usage (repo root, GPU machine): bash benchmarks/cells_final.sh A|B
#   A: GPU tests, `visattn check`, stage profile of this tree;  B: stage profile of .baseline/ + eager models.
# .baseline/ (a checkout of the previous code) gets --max-seconds, the flag name it knows.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
case "$1" in
  A)
    timeout 150 python3 -m pytest -q -m gpu tests/kernels/test_engine_gpu.py tests/kernels/test_cuda_graphs_gpu.py \
      -p no:cacheprovider 2>&1 | tail -4 | tee "$OUT/gpu-tests.log"
    timeout 170 python3 -m visattn.cli check --per-rank 1000 --time-budget "${CHECK_S:-140}" --out "$OUT/check.json" \
      2>&1 | tail -6
    timeout 230 python3 benchmarks/engine_profile.py --out "$OUT/engine-new.json" --time-budget 200 2>&1 | tail -50 \
      | grep -v '^{' ;;
  B)
    timeout 230 python3 .baseline/benchmarks/engine_profile.py --out "$OUT/engine-base.json" --max-seconds 200 \
      2>&1 | grep -v '^{' | tail -48
    timeout 300 python3 benchmarks/engine_profile.py --out "$OUT/models-new.json" --stages "" \
      --models nat_tiny,dinat_tiny,swin_tiny --time-budget 60 2>&1 | grep -v '^{' | tail -12 ;;
esac
