#!/usr/bin/env bash
# One call on the GPU machine: install carried wheels, run the requested steps; logs, result JSONs and plots come
# back as $OUT/bundle.tgz (the device returns at most 8 files).
# Usage (from the repo root there):
#   bash benchmarks/device_run.sh info smoke gpu-tests check bench-models bench-attn bench-prune
#   bash benchmarks/device_run.sh bench-scaling          # on a 2-GPU machine (nvidia-h200-x2)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/out}; LOGS=/tmp/visattn-logs; mkdir -p "$OUT" "$LOGS"
DATE=$(date +%F); GPU=$(python3 -c "import torch;print(torch.cuda.get_device_name().split()[1].lower())" 2>/dev/null || echo gpu)
RESULTS=benchmarks/results
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
# The models of the one-invocation comparison: timm's stock models, timm's Swin on visattn windows, visattn's own.
MODELS="swin_tiny_patch4_window7_224 swin_tiny_patch4_window7_224@visattn convnext_tiny vit_small_patch16_224 nat_tiny dinat_tiny biformer_tiny agent_swin_t agent_pvt_t agent_deit_t"
COMMON="--bench both --amp --amp-dtype bfloat16 --channels-last -b 256 --num-warm-iter 3 --num-bench-iter 15 --no-progress"
status=0
for step in "$@"; do
  echo "===== $step ($(date +%T))"
  case "$step" in
    info) python3 -m visattn.cli info ;;
    smoke) python3 -m visattn.cli smoke ;;
    gpu-tests) python3 -m pytest -q -m gpu tests -p no:cacheprovider ;;
    check) python3 -m visattn.cli check --out "$LOGS/check.json" ;;
    # eager inference + train step for every model, then compiled inference; ~6 min on an H200 with the budget
    bench|bench-models) python3 -m visattn.cli bench -m $MODELS $COMMON --compare-compile --time-budget 300 \
        --results-file "$RESULTS/models-$GPU-$DATE.json" --plot "$LOGS/plots-models" ;;
    # 2 processes, one per GPU: per-rank inference, DDP train step, scaling vs one process; ~3 min
    bench-scaling) python3 -m torch.distributed.run --standalone --nproc_per_node "${NGPU:-2}" -m visattn.cli bench \
        -m nat_tiny swin_tiny_patch4_window7_224 swin_tiny_patch4_window7_224@visattn $COMMON --time-budget 120 \
        --results-file "$RESULTS/scaling-${NGPU:-2}x$GPU-$DATE.json" --plot "$LOGS/plots-scaling" ;;
    bench-attn) python3 -m visattn.cli bench-attn --out "$RESULTS/attn-$GPU-$DATE.json" --plot "$LOGS/plots-attn" ;;
    bench-attn-vision) python3 -m visattn.cli bench-attn --suite vision --skip-slow-peers \
        --out "$RESULTS/attn-vision-$GPU-$DATE.json" --plot "$LOGS/plots-attn-vision" ;;
    bench-attn-video) python3 -m visattn.cli bench-attn --suite video --suite flux --skip-slow-peers \
        --out "$RESULTS/attn-video-$GPU-$DATE.json" --plot "$LOGS/plots-attn-video" ;;
    bench-bra) python3 -m visattn.cli bench-bra --out "$RESULTS/bra-$GPU-$DATE.json" ;;
    bench-prune) python3 -m visattn.cli bench-prune ;;
    bench-prune-kernels) python3 -m visattn.cli bench-prune-kernels ;;
    report) python3 -m visattn.cli report --out "$LOGS/PERF.md" --prune-out "$LOGS/PRUNE_PERF.md" ;;
    *) echo "unknown step $step"; false ;;
  esac 2>&1 | tee "$LOGS/$step.log"
  rc=${PIPESTATUS[0]}; echo "===== $step exit $rc"; [ "$rc" = 0 ] || status=1
done
tar czf "$OUT/bundle.tgz" -C / "${LOGS#/}" -C "$PWD" benchmarks/results 2>/dev/null || true
exit $status
