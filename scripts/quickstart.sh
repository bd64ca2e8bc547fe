#!/usr/bin/env bash
# Sets up and builds prismaquant, then runs the main job on MODEL_DIR.
# The built-in default is the trained Qwen3 checkpoint qwen3-dense-tiny from ../shared/models
# (14.5M parameters, BF16), which every developer and CI machine has beside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:-../shared/models/qwen3-dense-tiny}"
bash scripts/setup.sh
./build/src/cli/prismaquant inspect "$model"
