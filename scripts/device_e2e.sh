#!/usr/bin/env bash
# The end-to-end decode benchmark on the lent GPU (device tool), run from the repository root:
#   OUT=/path E2E_ARGS="--n 131072 --batch 1 4" scripts/device_e2e.sh
# The GPU image has transformers 5.17; the 5.24 wheel (what CI installs) travels in .whl/
# and goes to /tmp/site. GPU_TESTS (a pytest -k expression) first runs those GPU tests.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/transformers-*.whl || exit 1
export PYTHONPATH=$PWD/src:/tmp/site
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; python3 -c "import torch, \
transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'triton', triton.__version__)"; } | tee "$OUT/env.txt"
if [ -n "${GPU_TESTS:-}" ]; then
  timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -rf -p no:cacheprovider tests/gpu \
    -k "$GPU_TESTS" 2>&1 | tail -n 40 | tee "$OUT/gpu_tests.log"
fi
start=$(date +%s)
timeout "${BENCH_TIMEOUT:-420}" python3 -m nucleus_attn.cli bench e2e --out "$OUT" \
  ${E2E_ARGS:-} 2>&1 | grep -v -E "Warning|warn\(" | tee "$OUT/bench_e2e.log" | tail -n 80
echo "bench e2e: rc=${PIPESTATUS[0]} in $(( $(date +%s) - start )) s"
