#!/usr/bin/env bash
# Shared by the launchers: dry-run printing and the XLA flags that matter on GPU, in one place.
# Source it; do not run it.

# XLA GPU flags: overlap collectives with compute (latency-hiding scheduler) and combine the FSDP
# all-gathers / reduce-scatters into large transfers.
GPU_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true \
--xla_gpu_all_gather_combine_threshold_bytes=134217728 \
--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728 \
--xla_gpu_all_reduce_combine_threshold_bytes=134217728"
export GPU_XLA_FLAGS

# The documented default job: BioMedLM 2.7B pretraining (used by the scripts that source this file).
# shellcheck disable=SC2034
DEFAULT_ENTRY="biomedlm_jax.pretrain"
# shellcheck disable=SC2034
DEFAULT_FLAGS=(--config=configs/pretrain.py:biomedlm-2.7b)

DRY_RUN=0

# quote ARGS...: shell words on one line, single-quoted where needed (copy-pasteable).
quote() {
  local out="" word
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+="$word "
    else
      out+="'${word//\'/\'\\\'\'}' "
    fi
  done
  printf '%s' "${out% }"
}

# run CMD...: execute, or with --dry_run print it on one line.
run() {
  if [ "$DRY_RUN" -eq 1 ]; then
    quote "$@"
    printf '\n'
  else
    "$@"
  fi
}
