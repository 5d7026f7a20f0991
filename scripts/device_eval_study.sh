#!/usr/bin/env bash
# The accuracy-vs-budget study of results/eval/, run on the lent GPU (device tool): every
# Twilight base (dense, cluster, quest pages of 16 and of 4), Tactic, and the baselines, with
# the candidate-quality study of the bases (eval --candidates) on the same prefills.
#
# The bundled model (98 MB GGUF) is larger than what one device call carries (64 MiB), so it
# travels in two halves made here with `split -n 2 -d <gguf> .model/smollm2.gguf.part`:
# call 1 carries .model/smollm2.gguf.part00 (and runs the GPU tests), call 2, made while the
# machine is still warm, carries .model/smollm2.gguf.part01 and runs this script, which joins
# the halves, checks the checksum and runs the sweep. Rows go to .device/eval/ on the machine
# (kept between calls while it stays warm), so a call that runs out of time is resumed by the
# next one with the same command: run it until it prints "eval rc=0".
# METHODS (method specs), EXTRA (further eval options) and SAMPLES override the sweep below.
# The gguf wheel travels in .whl/ (the GPU image lacks it).
#
# Budget (predicted from the previous study's cell seconds, H100: 608 s of decoding for 21
# settings over the swept cells): ~23 settings at 100 samples per cell, kv and vartrack left
# out (dense scored under 50% on them at every length), ~12-18 min of device time, i.e. two
# or three calls of EVAL_TIMEOUT=540 s.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/src:/tmp/site
if [ ! -f .model/smollm2.gguf ]; then
  cat .model/smollm2.gguf.part00 .model/smollm2.gguf.part01 > .model/smollm2.gguf || exit 1
fi
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  .model/smollm2.gguf" \
  | sha256sum -c - || exit 1
mkdir -p .device/eval "${OUT:-/tmp/out}"
{ nvidia-smi --query-gpu=name --format=csv,noheader; python3 --version;
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__,
  'transformers', transformers.__version__, 'triton', triton.__version__)"; } \
  | tee .device/eval/env.txt
METHODS=${METHODS:-"oracle-topp:p=0.8,0.9,0.95 streaming:window=128,256,1024
  quest:budget=128,256,512,1024 twilight:base=dense,p=0.8,0.9,0.95
  twilight:base=cluster,p=0.8,0.9,0.95 twilight:base=quest,p=0.9,0.95
  twilight:base=quest,page_size=4,p=0.9,0.95 tactic:p=0.8,0.9,0.95"}
EXTRA=${EXTRA-"--candidates --perplexity --ppl-prefix 4096 --ppl-tokens 32 --ppl-windows 4"}
# shellcheck disable=SC2086  # METHODS and EXTRA are word lists
timeout -s INT "${EVAL_TIMEOUT:-540}" python3 -m nucleus_attn.cli eval \
  --model .model/smollm2.gguf \
  --tasks passkey multikey multivalue --lengths 2048 4096 8192 \
  --samples "${SAMPLES:-100}" --batch-size 25 --min-dense-accuracy 0.5 \
  --methods $METHODS $EXTRA \
  --out .device/eval 2>&1 | grep -v -E "GGUF|Loading weights|deprecated|forward_call" \
  | tee -a .device/eval/log.txt
echo "eval rc=${PIPESTATUS[0]}"
# the per-sample candidate rows (~80 KB a sample) travel compressed; the summary is
# candidates.json / .md / .png
gzip -kf .device/eval/candidates_rows.jsonl 2>/dev/null
cp .device/eval/*.{json,jsonl,md,png,txt,gz} "${OUT:-/tmp/out}/" 2>/dev/null
rm -f "${OUT:-/tmp/out}/candidates_rows.jsonl"
ls -la "${OUT:-/tmp/out}"
