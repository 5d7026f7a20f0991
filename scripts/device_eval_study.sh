#!/usr/bin/env bash
# The accuracy-vs-budget study of results/eval/, run on the lent GPU (device tool).
#
# The bundled model (98 MB GGUF) is larger than what one device call carries (64 MiB), so it
# travels in two halves made here with `split -n 2 -d <gguf> .model/smollm2.gguf.part`:
# call 1 carries .model/smollm2.gguf.part00 (and runs the GPU tests), call 2, made while the
# machine is still warm, carries .model/smollm2.gguf.part01 and runs this script, which joins
# the halves, checks the checksum and runs the sweep. Rows go to .device/eval/rows.jsonl on
# the machine (kept between calls), so a call that runs out of time is resumed by the next.
# The gguf wheel travels in .whl/ (the GPU image lacks it).
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
timeout "${EVAL_TIMEOUT:-540}" python3 -m nucleus_attn.cli eval \
  --model .model/smollm2.gguf \
  --tasks passkey multikey multivalue kv vartrack --lengths 8192 2048 4096 \
  --samples 100 --batch-size 25 --min-dense-accuracy 0.5 \
  --methods oracle-topp:p=0.8,0.9,0.95 streaming:window=256,1024 \
            quest:budget=128,256,512,1024 \
            twilight:p=0.8,0.9,0.95,0.99,base_budget=0.25,0.5 tactic:p=0.8,0.9,0.95 \
  --perplexity --ppl-prefix 4096 --ppl-tokens 32 --ppl-windows 4 \
  --out .device/eval 2>&1 | grep -v -E "GGUF|Loading weights|deprecated|forward_call" \
  | tee .device/eval/log.txt
echo "eval rc=${PIPESTATUS[0]}"
cp .device/eval/* "${OUT:-/tmp/out}/" 2>/dev/null
ls -la "${OUT:-/tmp/out}"
