#!/usr/bin/env bash
# One call on the GPU machine: install carried wheels, run the requested steps; logs and result JSONs come back
# as $OUT/bundle.tgz (the device returns at most 8 files).
# Usage (from the repo root there): bash benchmarks/device_run.sh info smoke gpu-tests check bench-attn bench-prune
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/out}; LOGS=/tmp/visattn-logs; mkdir -p "$OUT" "$LOGS"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
status=0
for step in "$@"; do
  echo "===== $step ($(date +%T))"
  case "$step" in
    info) python3 -m visattn.cli info ;;
    smoke) python3 -m visattn.cli smoke ;;
    gpu-tests) python3 -m pytest -q -m gpu tests -p no:cacheprovider ;;
    check) python3 -m visattn.cli check --out "$LOGS/check.json" ;;
    bench) python3 -m visattn.cli bench ;;
    bench-attn) python3 -m visattn.cli bench-attn ;;
    bench-bra) python3 -m visattn.cli bench-bra ;;
    bench-prune) python3 -m visattn.cli bench-prune ;;
    bench-prune-kernels) python3 -m visattn.cli bench-prune-kernels ;;
    *) echo "unknown step $step"; false ;;
  esac 2>&1 | tee "$LOGS/$step.log"
  rc=${PIPESTATUS[0]}; echo "===== $step exit $rc"; [ "$rc" = 0 ] || status=1
done
tar czf "$OUT/bundle.tgz" -C / "${LOGS#/}" -C "$PWD" benchmarks/results 2>/dev/null || true
exit $status
