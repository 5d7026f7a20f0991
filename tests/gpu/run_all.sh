#!/usr/bin/env bash
# Everything that needs the GPU, in one go (run from the repository root):
#   OUT=/path/to/folder tests/gpu/run_all.sh
# 1. the GPU tests (compiled kernels at full size; triton vs torch per method and the
#    CUDA-graph capture of a decode step), one pytest process per file so that a device
#    assert in one cannot take the other down; logs in $OUT/gpu_tests*.log;
# 2. the kernel benchmark ($OUT/bench_kernels_<gpu>.json/.png, log $OUT/bench.log), then
#    Tactic's rows and the per-stage profile at N=128k, B=8 in a second process
#    ($OUT/extra/..., log $OUT/bench_extra.log).
set -uo pipefail
OUT=${OUT:-nucleus-attn-results/bench}  # not the committed results/: pass OUT=results to update them
mkdir -p "$OUT/extra"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv;
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  > "$OUT/env.txt" 2>&1
for f in methods ops; do
  start=$(date +%s)
  # OPS_FILTER: a pytest -k expression for the (long) ops file, e.g. to re-run changed kernels
  filter=(); [ "$f" = ops ] && [ -n "${OPS_FILTER:-}" ] && filter=(-k "$OPS_FILTER")
  timeout "${TEST_TIMEOUT:-200}" $PY -m pytest -q -rf -p no:cacheprovider "tests/gpu/test_gpu_$f.py" \
    "${filter[@]}" 2>&1 | grep -v "Assertion .idx_dim" | tail -n 300 > "$OUT/gpu_tests_$f.log"
  echo "gpu tests ($f): rc=${PIPESTATUS[0]} in $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu_tests_$f.log"
  tail -n 12 "$OUT/gpu_tests_$f.log"
done
start=$(date +%s)
timeout "${BENCH_TIMEOUT:-300}" $PY -m nucleus_attn.cli bench kernels --out "$OUT" \
  --methods dense sparse quest twilight ${BENCH_ARGS:-} 2>&1 | grep -v Warning | tee "$OUT/bench.log" | tail -n 70
echo "bench: rc=${PIPESTATUS[0]} in $(( $(date +%s) - start )) s"
start=$(date +%s)
timeout "${EXTRA_TIMEOUT:-200}" $PY -m nucleus_attn.cli bench kernels --out "$OUT/extra" \
  --methods tactic --profile 131072 8 ${BENCH_ARGS:-} 2>&1 | grep -v Warning | tee "$OUT/bench_extra.log" | tail -n 60
echo "bench extra: rc=${PIPESTATUS[0]} in $(( $(date +%s) - start )) s"
