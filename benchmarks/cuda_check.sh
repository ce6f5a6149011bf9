#!/usr/bin/env bash
# The GPU checks in one prepared run: the device-parametrized tests, then speed on the GPU.
#
#   bash benchmarks/cuda_check.sh MODELS_DIR BOOK OUT
#
# MODELS_DIR holds one folder per model with config.json and the tokenizer files (a folder without weights gets
# random ones in the model's shape, benchmarks/random_weights.py: they time exactly as the real ones do).
# BOOK is a .txt file the prompts are cut from; results (JSON and logs) go to OUT. CHUNK (default 512) is the
# prefill chunk of the speed runs.
set -uo pipefail
MODELS=${1:?MODELS_DIR}; BOOK=${2:?BOOK}; OUT=${3:?OUT}; CHUNK=${CHUNK:-512}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/tests.txt"
python3 -m pytest -q -p no:cacheprovider -o addopts="" -rs tests/test_device.py >> "$OUT/tests.txt" 2>&1
tail -3 "$OUT/tests.txt"
python3 benchmarks/random_weights.py "$MODELS"/*/
for m in "$MODELS"/*/; do
  name=$(basename "$m")
  python3 benchmarks/sparse_speed.py --model "$m" --device cuda --transformers --lengths 2048 32768 --steps 32 \
    --chunk-size "$CHUNK" --books "$(dirname "$BOOK")" --out "$OUT/speed-$name.json" 2>&1 | grep -v "^[0-9]* tokens:" | tail -8
done
first=$(ls -d "$MODELS"/*/ | head -1)
python3 benchmarks/batching.py --model "$first" --device cuda --clients 1,4,16,64 --prompt-tokens 2048 --new-tokens 64 \
  --long-tokens 8192 --sessions 0 --book "$BOOK" --out "$OUT/batching.json" 2>&1 | tail -12
python3 benchmarks/profile_step.py --model "$first" --device cuda --length 32768 --policy block_topk --chunk-size "$CHUNK" \
  --books "$(dirname "$BOOK")" > "$OUT/profile.txt" 2>&1
