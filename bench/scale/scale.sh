#!/usr/bin/env bash
# Synthesizes the checkpoint of SHAPE under WORK/model (unless it is already there), runs
# prismaquant's stages on it and writes WORK/scale.md and WORK/scale.json (docs/scaling.md).
# Usage: bench/scale/scale.sh SHAPE WORK [pq_scale run options...]
# Set KEEP_MODEL=0 to delete the synthetic checkpoint afterwards (they take 1.5-60 GB).
set -euo pipefail
shape=$1
work=$2
shift 2
build=${BUILD:-$(dirname "$0")/../../build}
# OpenMP threads sleep rather than spin when idle: on a shared machine spinning inflates CPU time
# and slows everyone (docs/runtime.md, performance notes).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
if [[ ! -f $work/model/config.json ]]; then
  "$build/bench/pq_scale" synth --shape "$shape" --out "$work/model"
fi
"$build/bench/pq_scale" run --shape "$shape" --model "$work/model" --work "$work/run" \
  --json "$work/scale.json" "$@" | tee "$work/scale.md"
if [[ ${KEEP_MODEL:-1} == 0 ]]; then rm -rf "$work/model"; fi
