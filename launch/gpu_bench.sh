#!/usr/bin/env bash
# The GPU benchmark matrix (issue 18) as one command that fits a lent GPU's time: one Python process
# runs every row of `bench.MATRIX["gpu"]` in priority order (2.7B decoding at batch 1 and 32 against HF
# generate, 355M training against HF, continuous batching and int8 decoding of 2.7B, 2.7B training, then
# two variants), appends each JSON row to
# OUT/bench.jsonl as soon as it is measured, and skips rows that no longer fit --budget_s (default
# 450 s, so with start-up the command stays under 8 minutes). Its stderr goes to OUT/bench.log.
#
#   launch/gpu_bench.sh [--dry_run] [--out=DIR] [--budget_s=S] [--scale=gpu|cpu|small] [train|generate|engine|decode|all]
#
# PY selects the python that has the package importable (default python3). --scale=small runs the same
# rows with tiny shapes (the CPU test of this script); --scale=cpu is docs/benchmarks.md's CPU table.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/common.sh
source launch/common.sh

OUT=bench_out
ONLY=""
BUDGET=450
SCALE=gpu
for arg in "$@"; do
  case "$arg" in
    --dry_run) DRY_RUN=1 ;;
    --out=*) OUT="${arg#--out=}" ;;
    --budget_s=*) BUDGET="${arg#--budget_s=}" ;;
    --scale=*) SCALE="${arg#--scale=}" ;;
    train|generate|engine|decode) ONLY="$arg" ;;
    all) ONLY="" ;;
    *) echo "gpu_bench.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done
PY="${PY:-python3}"
export XLA_FLAGS="${XLA_FLAGS:-} $GPU_XLA_FLAGS"
# JAX and the torch peer share the GPU in one process: JAX takes memory as it needs it instead of
# preallocating 75% of the device.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ "$DRY_RUN" -eq 1 ]; then
  echo "export XLA_FLAGS=$(quote "$XLA_FLAGS")"
  echo "export XLA_PYTHON_CLIENT_PREALLOCATE=false"
fi
run mkdir -p "$OUT"
CMD=("$PY" -m biomedlm_jax.bench matrix "--out=$OUT" "--scale=$SCALE" "--budget_s=$BUDGET")
[ -n "$ONLY" ] && CMD+=("--only=$ONLY")
if [ "$DRY_RUN" -eq 1 ]; then
  echo "$(quote "${CMD[@]}") 2> $OUT/bench.log"
else
  "${CMD[@]}" 2> "$OUT/bench.log"
fi
