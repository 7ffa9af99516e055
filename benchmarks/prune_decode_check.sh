#!/usr/bin/env bash
# Issue 25: does bench-prune's decode figure reproduce? Two back-to-back runs (two consecutive processes, same GPU)
# of the reduced grid, both result files under $OUT, then every decode figure of run A against run B
# (PASS when within 10 %), and the GPU's clocks / power once a second during both runs (a CSV next to them).
# DECODE_MODE picks bench-prune's --decode-mode: graph (default: a CUDA graph over a per-layer static KV cache) or
# generate (step-timed generate(), what the first check of 2026-12-06 ran); it is part of the file names.
# The generate mode took ~2 min per run on one H100 (torch 2.11, transformers 5.17: imports + 7B random-weight build
# ~25 s, 10 configs x 3 rounds at ~3 s each); the graph mode adds one untimed generate() per configuration and round
# (its token check). BUDGET (seconds per run, model build included) caps each run: configs past it are skipped and
# listed in the file, so the whole script stays under ~6 min.
# Usage, from the repository root on the GPU machine:  bash benchmarks/prune_decode_check.sh
# A CPU dry run of the script's plumbing (tiny model, no GPU):  EXTRA_ARGS=--tiny bash benchmarks/prune_decode_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/out}
BUDGET=${BUDGET:-150}
MODE=${DECODE_MODE:-graph}
PY=${PYTHON:-python3}
read -r -a EXTRA <<<"${EXTRA_ARGS:-}"
mkdir -p "$OUT"
stamp() { date -u +%H:%M:%S; }
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())" 2>/dev/null || echo gpu)
DATE=$(date -u +%F)
NAME="prune-decode-$GPU-$DATE-$MODE"
GRID=(--methods fastervlm,visionzip,divprune,fastv --keeps 64 --batches 8 --next-batches 1 --rounds 3
      --decode-mode "$MODE")
echo "===== $(stamp) $NAME: ${GRID[*]}, budget ${BUDGET}s per run"

SMI=""
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.applications.graphics,power.limit \
    --format=csv 2>&1 | sed 's/^/gpu: /'
  FIELDS=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu
  if nvidia-smi --query-gpu=clocks_event_reasons.active --format=csv,noheader >/dev/null 2>&1; then
    FIELDS=$FIELDS,clocks_event_reasons.active
  fi
  nvidia-smi --query-gpu=$FIELDS --format=csv -l 1 >"$OUT/$NAME-clocks.csv" 2>&1 &
  SMI=$!
fi

status=0
for run in A B; do
  echo "===== $(stamp) run $run start"
  "$PY" -m visattn.cli bench-prune "${GRID[@]}" --time-budget "$BUDGET" --doc "" --out "$OUT/$NAME-run$run.json" \
    ${EXTRA[@]+"${EXTRA[@]}"}
  rc=$?
  echo "===== $(stamp) run $run exit $rc"
  [ "$rc" = 0 ] || status=1
done
[ -n "$SMI" ] && kill "$SMI" 2>/dev/null

echo "===== $(stamp) decode, run A vs run B"
if [ -f "$OUT/$NAME-runA.json" ] && [ -f "$OUT/$NAME-runB.json" ]; then
  "$PY" -c 'import sys; from visattn.bench.prune import compare_files; sys.exit(compare_files(*sys.argv[1:3]))' \
    "$OUT/$NAME-runA.json" "$OUT/$NAME-runB.json" || status=1
else
  echo "a result file is missing: no comparison"; status=1
fi
echo "===== $(stamp) done (exit $status)"
exit $status
