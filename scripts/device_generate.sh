#!/usr/bin/env bash
# What users run, measured on the lent GPU (device tool), from the repository root:
#   OUT=$OUT STAGES="tests host gen32" scripts/device_generate.sh        # call 1 (~9 min)
#   OUT=$OUT STAGES="gen128 long" scripts/device_generate.sh             # call 2 (~9 min)
#   OUT=$OUT STAGES="e2e" E2E_ARGS="--n 4096 131072 --batch 1 4" scripts/device_generate.sh
# Stages (each under its own timeout, output and log under $OUT):
#   tests   tests/gpu/test_gpu_generate.py (compiled switch vs eager, warm-up, no syncs)
#   host    bench host: measured host time per eager layer call and step (tiny model)
#   gen32   bench generate at 32k, eager and compiled, every row
#   gen128  bench generate at 128k, eager and compiled, every row
#   e2e     bench e2e --compile (the lean step: whole forward compiled), $E2E_ARGS
#   long    bench memory: a 10k-token generation per method (memory vs account, ms/token)
# The GPU image has transformers 5.17; the 5.24 wheel (what CI installs) travels in .whl/
# and goes to /tmp/site. Inductor's cache goes to .device/inductor (kept between calls).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/transformers-*.whl || exit 1
export PYTHONPATH=$PWD/src:/tmp/site
export TORCHINDUCTOR_CACHE_DIR=$PWD/.device/inductor TRITON_CACHE_DIR=$PWD/.device/triton
mkdir -p "$TORCHINDUCTOR_CACHE_DIR" "$TRITON_CACHE_DIR"
OUT=${OUT:-/tmp/out}
STAGES=${STAGES:-tests host gen32}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; python3 -c "import torch, \
transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'triton', triton.__version__)"; nproc; } | tee "$OUT/env.txt"

stage() {  # stage NAME TIMEOUT command...
  local name=$1 limit=$2; shift 2
  local start; start=$(date +%s)
  timeout "$limit" "$@" 2>&1 | grep -v -E "Warning|warn\(|^\s*$" > "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  tail -n "${TAIL:-45}" "$OUT/$name.log"
  echo "== $name: rc=$rc in $(( $(date +%s) - start )) s"
}

for s in $STAGES; do
  case $s in
    tests) stage gpu_tests_generate "${TEST_TIMEOUT:-240}" python3 -m pytest -q -rf \
             -p no:cacheprovider tests/gpu/test_gpu_generate.py ;;
    host) stage bench_host 90 python3 -m nucleus_attn.cli bench host --out "$OUT" ;;
    gen32) stage bench_generate_32k "${GEN_TIMEOUT:-330}" python3 -m nucleus_attn.cli \
             bench generate --n 32768 --out "$OUT/gen32k" ${GEN_ARGS:-} ;;
    gen128) stage bench_generate_128k "${GEN_TIMEOUT:-360}" python3 -m nucleus_attn.cli \
             bench generate --n 131072 --out "$OUT/gen128k" ${GEN_ARGS:-} ;;
    e2e) stage bench_e2e "${E2E_TIMEOUT:-560}" python3 -m nucleus_attn.cli bench e2e --compile \
             --out "$OUT" --profile 131072 4 ${E2E_ARGS:-} ;;
    long) stage bench_long "${LONG_TIMEOUT:-300}" python3 -m nucleus_attn.cli bench memory \
             --steps 10000 --out "$OUT" ${LONG_ARGS:-} ;;
    *) echo "unknown stage $s (tests host gen32 gen128 e2e long)"; exit 2 ;;
  esac
done
