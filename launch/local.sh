#!/usr/bin/env bash
# One host, all its devices (CPU or GPU): installs into .venv if needed, then runs an entry point.
#
#   launch/local.sh [--dry_run] [--extra=cuda12|tpu|none] [ENTRY [FLAGS...]]
#
# With no ENTRY: python -m biomedlm_jax.pretrain --config=configs/pretrain.py:biomedlm-2.7b --workdir=runs/biomedlm-2.7b
# Example: launch/local.sh biomedlm_jax.finetune_mcqa --config=configs/mcqa.py:pubmedqa --workdir=runs/pqa
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/common.sh
source launch/common.sh

EXTRA=auto
ARGS=()
for arg in "$@"; do
  if [ ${#ARGS[@]} -gt 0 ]; then ARGS+=("$arg"); continue; fi  # after ENTRY: the job's own flags
  case "$arg" in
    --dry_run) DRY_RUN=1 ;;
    --extra=*) EXTRA="${arg#--extra=}" ;;
    *) ARGS+=("$arg") ;;
  esac
done
if [ ${#ARGS[@]} -eq 0 ]; then
  ARGS=("$DEFAULT_ENTRY" "${DEFAULT_FLAGS[@]}" --workdir=runs/biomedlm-2.7b)
fi
if [ "$EXTRA" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then EXTRA=cuda12; else EXTRA=none; fi
fi

SPEC="."
[ "$EXTRA" != none ] && SPEC=".[$EXTRA]"
if [ ! -x .venv/bin/python ]; then
  run python3 -m venv .venv
fi
run .venv/bin/pip install -q -e "$SPEC"
if [ "$EXTRA" = cuda12 ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} $GPU_XLA_FLAGS"
  [ "$DRY_RUN" -eq 1 ] && echo "export XLA_FLAGS=$(quote "$XLA_FLAGS")"
fi
run .venv/bin/python -m "${ARGS[@]}"
