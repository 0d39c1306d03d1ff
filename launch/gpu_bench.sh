#!/usr/bin/env bash
# The issue-9 GPU benchmark matrix on one GPU: every row of the docs/benchmarks.md GPU table, appended
# as JSON lines to OUT/bench.jsonl (each command's stderr in OUT/NAME.log). Runs with the python that
# has the package importable (default python3; set PY=.venv/bin/python).
#
#   launch/gpu_bench.sh [--dry_run] [--out=DIR] [train|generate|all]
#
# "train" and "generate" each fit in about 10 minutes on an H100; "all" runs both.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/common.sh
source launch/common.sh

OUT=bench_out
PART=all
for arg in "$@"; do
  case "$arg" in
    --dry_run) DRY_RUN=1 ;;
    --out=*) OUT="${arg#--out=}" ;;
    train|generate|all) PART="$arg" ;;
    *) echo "gpu_bench.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done
PY="${PY:-python3}"
export XLA_FLAGS="${XLA_FLAGS:-} $GPU_XLA_FLAGS"
[ "$DRY_RUN" -eq 1 ] && echo "export XLA_FLAGS=$(quote "$XLA_FLAGS")"
run mkdir -p "$OUT"

# bench NAME ARGS...: one benchmark process; its JSON rows go to OUT/bench.jsonl. A failed row (an OOM,
# say) is recorded in its log and does not stop the rest.
bench() {
  local name="$1"
  shift
  if [ "$DRY_RUN" -eq 1 ]; then
    echo "$(quote "$PY" -m biomedlm_jax.bench "$@") >> $OUT/bench.jsonl 2> $OUT/$name.log"
  else
    "$PY" -m biomedlm_jax.bench "$@" >> "$OUT/bench.jsonl" 2> "$OUT/$name.log" || echo "$name failed: see $OUT/$name.log" >&2
  fi
}

M355=(--model=gpt2-medium --vocab=28896 --batch=16 --seq=1024 --dtype=bfloat16 --attention_impl=cudnn)
B27=(--model=biomedlm-2.7b --batch=8 --seq=1024 --dtype=bfloat16 --scan_layers
     --remat=dots_with_no_batch_dims_saveable --attention_impl=cudnn)
if [ "$PART" != generate ]; then
  bench train-355m train "${M355[@]}" --peer
  bench train-355m-chunk train "${M355[@]}" --loss_chunk=256
  bench train-355m-remat train "${M355[@]}" --remat=dots_with_no_batch_dims_saveable
  bench train-2.7b train "${B27[@]}"  # no --peer: HF runs out of memory at batch 8 on 80 GB
  bench train-2.7b-chunk train "${B27[@]}" --loss_chunk=256
fi
if [ "$PART" != train ]; then
  for b in 1 32; do
    bench "generate-2.7b-b$b" generate --model=biomedlm-2.7b --dtype=bfloat16 --batch="$b" --prompt=128 --new=256 --peer
  done
fi
