#!/usr/bin/env bash
# The checks that need the lent GPU machine (H200), as one script (see the device notes in README).
# Run from the repo root there; results land in $OUT (default runs/gpu), at most 8 small files:
#   1. unified model: bf16 training MFU of the llama-3.2-1b preset, through the full logits and
#      through the trainer's labelled-positions-only output layer, and base-100m (bench_unified.py)
#   2. ShapesWorld data (CPU) and its image codes with a CPU demo's stage-2 tokenizer (GPU)
#   3. at once, for ~330 s: (a) the zero-shot sweep of bench/tokenizer_sweep_zs.yaml at the CPU
#      demo's step count (tokenizer_sweep.py), (b) the unified model's long VQA curve on those codes
#      (unified_budget.py: the demo's configuration for up to 12,000 steps, at two learning rates)
# Needs: $TOKENIZER (a demo's runs/demo/tokenizer_stage2/export) and $TEXT_MODEL (its
# text_tokenizer.model), carried in .carry/ by default; webdataset/braceexpand as wheels in .whl/
# (the machine has no registry access). Each part is time-limited and copies what it has to $OUT.
set -u
OUT=${OUT:-runs/gpu}
TOKENIZER=${TOKENIZER:-.carry/export}
TEXT_MODEL=${TEXT_MODEL:-.carry/text_tokenizer.model}
WORK=${WORK:-/tmp/gpu_checks}
# Session 19's run (36 px images, patch 12): DATA_CONFIG=configs/data/shapesworld_cell.yaml SKIP_MFU=1
#   SWEEP_FILE=bench/tokenizer_sweep_cell.yaml SWEEP_DATA_OVERRIDES=image_size=36 UNIFIED_VARIANTS=muon_long,muon_onegroup_long
# a CPU smoke run of this script: DEVICE=cpu MFU_PRESETS=tiny MFU_SEQ=64 UNIFIED_STEPS=4 EVAL_EVERY=2
#   SWEEP_STEPS=2 SWEEP_ONLY=base_s0,hn8_s1 SWEEP_JOBS=2 bash bench/gpu_checks.sh
DEVICE=${DEVICE:-cuda}
MFU_PRESETS=${MFU_PRESETS:-llama-3.2-1b}
MFU_SEQ=${MFU_SEQ:-2048}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
start=$(date +%s)
stamp() { echo "--- $(( $(date +%s) - start )) s: $*"; }

stamp "data generation (background, CPU)"
python3 -m unified_mm.data.shapesworld_cli --config "${DATA_CONFIG:-configs/data/shapesworld.yaml}" --out "$WORK/data" --overwrite \
  >"$WORK/data.log" 2>&1 &
data_pid=$!

stamp "1. unified-model training MFU (bf16 autocast, fp32 master weights, seq 2048 x batch 8)"
[ -n "${SKIP_MFU:-}" ] || timeout 150 python3 bench/bench_unified.py --device "$DEVICE" --presets "$MFU_PRESETS" --seq "$MFU_SEQ" --batch 8 \
  --steps 5 --warmup 2 --loss logits --out "$OUT/mfu_logits.json" 2>&1 | grep -v -i warning
[ -n "${SKIP_MFU:-}" ] || timeout 150 python3 bench/bench_unified.py --device "$DEVICE" --presets "$MFU_PRESETS${MFU_EXTRA-,base-100m}" \
  --seq "$MFU_SEQ" --batch 8 --steps 5 --warmup 2 --loss hidden --out "$OUT/mfu_hidden.json" 2>&1 | grep -v -i warning

stamp "2. codes"
wait $data_pid || { tail -5 "$WORK/data.log"; exit 1; }
tail -2 "$WORK/data.log"
timeout 150 python3 -m unified_mm.tokenizer_cli precompute --tokenizer "$TOKENIZER" --data "$WORK/data" \
  --out "$WORK/codes" --overwrite --device "$DEVICE" 2>&1 | grep -v -i warning | tail -3

stamp "3. zero-shot sweep and unified VQA curve, side by side"
timeout ${UNIFIED_TIMEOUT:-330} python3 bench/unified_budget.py --codes "$WORK/codes" --tokenizer "$TOKENIZER" \
  --variants ${UNIFIED_VARIANTS:-hl_iw0.25_pos2d_12k,hl_iw0.25_pos2d_lr1e-3_12k} --device "$DEVICE" --jobs 2 \
  --threads 1 --eval-every ${EVAL_EVERY:-1500} ${UNIFIED_STEPS:+--steps $UNIFIED_STEPS} --out "$WORK/unified" \
  >"$WORK/unified.log" 2>&1 &
unified_pid=$!
timeout ${SWEEP_TIMEOUT:-340} python3 bench/tokenizer_sweep.py --sweep "${SWEEP_FILE:-bench/tokenizer_sweep_zs.yaml}" \
  --data "$WORK/data" ${SWEEP_DATA_OVERRIDES:+--data-overrides $SWEEP_DATA_OVERRIDES} --text-tokenizer "$TEXT_MODEL" --out "$WORK/zs" --jobs ${SWEEP_JOBS:-8} --threads 1 \
  --device "$DEVICE" --time-limit ${SWEEP_LIMIT:-320} ${SWEEP_STEPS:+--steps $SWEEP_STEPS} \
  ${SWEEP_ONLY:+--only $SWEEP_ONLY} 2>&1 | grep -v -i warning
wait $unified_pid
grep -v -i warning "$WORK/unified.log" | tail -30
cp "$WORK/zs/sweep.jsonl" "$OUT/zs_sweep.jsonl" 2>/dev/null
cp "$WORK/zs/sweep.md" "$OUT/zs_sweep.md" 2>/dev/null
cp "$WORK/unified/budget_curve.jsonl" "$OUT/unified_curve.jsonl" 2>/dev/null
cp "$WORK/unified/budget.jsonl" "$OUT/unified_budget.jsonl" 2>/dev/null
stamp "done"
