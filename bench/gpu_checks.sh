#!/usr/bin/env bash
# The checks that need the lent GPU machine (H200), as one script (see the device notes in README).
# Run from the repo root there; results land in $OUT (default runs/gpu):
#   1. unified model: bf16 training MFU of the llama-3.2-1b and base-100m presets (bench_unified.py)
#   2. tokenizer hyper-parameter sweep at the CPU demo's step budget (tokenizer_sweep.py)
#   3. QLIP B/16 encoder vs timm ViT-B/16 vs transformers ViT on that machine's CPU (timm imports there)
# webdataset/braceexpand travel as wheels in .whl/ (the machine has no registry access).
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
echo "=== 1. unified-model training MFU (bf16 autocast, fp32 master weights)"
timeout 150 python3 bench/bench_unified.py --device cuda --presets llama-3.2-1b,base-100m --seq 2048 --batch 8 \
  --steps 5 --warmup 2 --out "$OUT/unified_gpu.json" 2>&1 | grep -v -i warning
echo "=== 2. tokenizer sweep"
timeout ${SWEEP_TIMEOUT:-330} python3 bench/tokenizer_sweep.py --out /tmp/sweep --jobs 8 --time-limit ${SWEEP_LIMIT:-290} 2>&1 \
  | grep -v -i warning | tail -40
cp /tmp/sweep/sweep.jsonl /tmp/sweep/sweep.md "$OUT/" 2>/dev/null
echo "=== 3. encoder throughput on this machine's CPU, with timm"
timeout 120 python3 bench/bench_tokenizer.py --only encoder --threads 16 --out "$OUT/encoder_cpu16.json" 2>&1 | grep -v -i warning
