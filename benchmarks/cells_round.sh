#!/usr/bin/env bash
# Quick device round of the small-map path: GPU tests, then stage profiles (this tree, then .baseline/ when
# present) of the small-map stages, then the launch-shape sweep. Logs and JSON under $OUT; a short table last.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STAGES=${STAGES:-nat_s3,nat_s4,dinat_s3,swin_s3_shift,swin_s4}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
timeout ${TEST_S:-200} python3 -m pytest -q -m gpu tests/kernels/test_engine_gpu.py tests/kernels/test_cuda_graphs_gpu.py \
  -p no:cacheprovider -x 2>&1 | tail -15 | tee "$OUT/gpu-tests.log"
timeout 200 python3 benchmarks/engine_profile.py --out "$OUT/engine-new.json" --stages "$STAGES" \
  --max-seconds 120 --cells "${CELLS:-nat_s3,nat_s4}" 2>&1 | grep -v '^{' | tail -14
if [ -d .baseline ] && [ "${BASE:-1}" = 1 ]; then
  timeout 150 python3 .baseline/benchmarks/engine_profile.py --out "$OUT/engine-base.json" --stages "$STAGES" \
    --max-seconds 120 2>&1 | tail -12
fi
python3 - "$OUT/engine-new.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d.get("cell_rows", []):
    print(r["stage"], r.get("cell_variant"), round(r.get("fwd_ms", -1), 3), round(r.get("fwd_bwd_ms", -1), 3),
          r.get("error", ""))
PY
