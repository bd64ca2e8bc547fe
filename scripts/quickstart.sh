#!/usr/bin/env bash
# Sets up and builds prismaquant, then runs the main job: quantize MODEL_DIR at 4.75 bits per
# parameter, calibrated on TEXT_FILE. The built-in default is the trained Qwen3 checkpoint
# qwen3-dense-tiny and the WikiText-2 test text from ../shared, which every developer and CI
# machine has beside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:-../shared/models/qwen3-dense-tiny}"
data="${2:-../shared/data/wikitext-2-test.txt}"
out="out/$(basename "$model")"
bash scripts/setup.sh
./build/src/cli/prismaquant inspect "$model"
./build/src/cli/prismaquant quantize "$model" --data "$data" --out "$out" --target-bits 4.75 --force
echo "Wrote $out (the compressed-tensors checkpoint: vllm serve $out) and $out.work (stage artifacts)"
