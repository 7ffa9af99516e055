#!/usr/bin/env bash
# One device call of the engine-v3 work, in two halves so each fits the 10-minute command limit.
# Usage (repo root, GPU machine):
#   bash benchmarks/engine_v3_round.sh tests     GPU tests (engine sweep, CUDA graphs) + `visattn check`
#   bash benchmarks/engine_v3_round.sh profile   stage profile of this tree and of .baseline/ (the previous code,
#                                                 same measurement script), same machine, same process order
# Logs and JSON go to $OUT; a short table is printed last. .baseline/ gets --max-seconds, the flag name it knows.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STAGES=${STAGES:-nat_s1,nat_s2,nat_s3,nat_s4,dinat_s1,dinat_s2,dinat_s3,swin_s1_shift,swin_s2_shift,swin_s3_shift,swin_s4}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
case "${1:-tests}" in
  tests)
    timeout 200 python3 -m pytest -q -m gpu tests/kernels/test_engine_gpu.py tests/kernels/test_cuda_graphs_gpu.py \
      -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/gpu-tests.log"
    timeout 300 python3 -m visattn.cli check --per-rank "${PER_RANK:-1000}" --time-budget "${CHECK_S:-240}" \
      --out "$OUT/check.json" 2>&1 | tail -12 ;;
  profile)
    timeout 280 python3 benchmarks/engine_profile.py --out "$OUT/engine-new.json" --stages "$STAGES" \
      --time-budget 240 ${EXTRA:-} 2>&1 | tail -26
    if [ -d .baseline ]; then
      timeout 280 python3 .baseline/benchmarks/engine_profile.py --out "$OUT/engine-base.json" --stages "$STAGES" \
        --max-seconds 240 ${EXTRA:-} 2>&1 | tail -26
    fi ;;
esac
