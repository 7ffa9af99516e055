#!/usr/bin/env bash
# Issue 24: the device measurements token reduction v2 still lacks, in one call (about 6 min on one H100).
#   1. the fused scorers against their eager loops (CDPruner's DPP MAP, VisPruner's removal; equal picks checked)
#      and DART's batched selection against the per-image one;
#   2. the scorer kernels' GPU tests;
#   3. bench-prune at LLaVA-1.5 batch 8 and 1, keep 64 / 128: the 2025 methods beside the unpruned model, FasterVLM,
#      VisionZip and random (the target: >= 3x TTFT at batch 8 keep 64, scoring <= 5% of the pruned TTFT);
#   4. DyMU's prefill per variant (is the deterministic merge's shape stable, and fast?);
#   5. with QWEN=1 (default; about 3 min more): the 32-frame Qwen2.5-VL video rows with and without --fast-vision
#      (tokenprune.patch_vision_attention), unpruned and temporal-merge, two processes on the same GPU.
# Every file lands under $OUT; BUDGET (seconds) caps the bench-prune run.
# Usage, from the repository root on the GPU machine:  bash benchmarks/prune_v2_round.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/out}
BUDGET=${BUDGET:-170}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 90 "$PY" benchmarks/time_scorers.py --out "$OUT/time-scorers.json" --time-budget 45 2>&1 | tail -14
timeout 90 "$PY" benchmarks/time_dart.py --out "$OUT/time-dart.json" --time-budget 45 2>&1 | tail -10
timeout 90 "$PY" -m pytest -q -m gpu tests/tokenprune/kernels/test_scorers_gpu.py -p no:cacheprovider 2>&1 | tail -2
timeout $((BUDGET + 60)) "$PY" -m visattn.cli bench-prune \
  --methods fastervlm,visionzip,random,cdpruner,vispruner,dart,dymu --keeps 64,128 --batches 8,1 --next-batches "" \
  --decode-tokens 4 --decode-calls 1 --rounds 1 --time-budget "$BUDGET" --out "$OUT/prune-v2.json" --doc "" 2>&1 \
  | grep -E "^\| llava|FLAG|skip|Error" | cut -c1-150
timeout 150 "$PY" benchmarks/profile_dymu.py --out "$OUT/profile-dymu.json" --time-budget 120 2>&1 | tail -12
if [ "${QWEN:-1}" = 1 ]; then
  for FLAG in "" --fast-vision; do
    timeout 200 "$PY" -m visattn.cli bench-prune --qwen-videos 1 --qwen-methods temporal-merge --keeps 128 \
      --batches "" --next-batches "" --decode-tokens 2 --decode-calls 1 --time-budget 150 $FLAG \
      --out "$OUT/prune-qwen-video${FLAG:+-fast-vision}.json" --doc "" 2>&1 | grep -E "^\| qwen|Error" | cut -c1-150
  done
fi
