#!/usr/bin/env bash
# Cloud TPU VM slice: create (or reuse) it, install this repo with the TPU extra on every worker, and
# start the same command on all workers. jax.distributed.initialize() reads the TPU topology itself.
#
#   launch/tpu_pod.sh [--dry_run] [--name=biomedlm] [--zone=us-central2-b] [--accelerator_type=v4-128]
#                     [--version=tpu-ubuntu2204-base] [--project=PROJECT] [--workdir=/mnt/gcs/runs/biomedlm-2.7b]
#                     [--skip_aot_check] [ENTRY [FLAGS...]]
#
# Before it creates or uses the slice, a training job (pretrain, finetune_mcqa, finetune_seq2seq) is
# compiled for the slice on this host (python -m biomedlm_jax.aot, docs/tpu.md; needs the [tpu] extra
# here): a config that does not fit the chips' HBM stops here, in minutes, before a pod is booked.
# --skip_aot_check skips that.
#
# With no ENTRY: BioMedLM 2.7B pretraining (configs/pretrain.py:biomedlm-2.7b). The workdir must be on a
# filesystem every worker sees (e.g. a GCS bucket mounted with gcsfuse at /mnt/gcs, or Filestore): orbax
# writes each host's shards there and process 0 finalises the checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/common.sh
source launch/common.sh

NAME=biomedlm
ZONE=us-central2-b
ACCEL=v4-128
VERSION=tpu-ubuntu2204-base
PROJECT=""
WORKDIR=/mnt/gcs/runs/biomedlm-2.7b
AOT_CHECK=1
ARGS=()
for arg in "$@"; do
  if [ ${#ARGS[@]} -gt 0 ]; then ARGS+=("$arg"); continue; fi  # after ENTRY: the job's own flags
  case "$arg" in
    --dry_run) DRY_RUN=1 ;;
    --name=*) NAME="${arg#--name=}" ;;
    --zone=*) ZONE="${arg#--zone=}" ;;
    --accelerator_type=*) ACCEL="${arg#--accelerator_type=}" ;;
    --version=*) VERSION="${arg#--version=}" ;;
    --project=*) PROJECT="${arg#--project=}" ;;
    --workdir=*) WORKDIR="${arg#--workdir=}" ;;
    --skip_aot_check) AOT_CHECK=0 ;;
    *) ARGS+=("$arg") ;;
  esac
done
if [ ${#ARGS[@]} -eq 0 ]; then
  ARGS=("$DEFAULT_ENTRY" "${DEFAULT_FLAGS[@]}" "--workdir=$WORKDIR")
fi
GCLOUD=(gcloud compute tpus tpu-vm)
LOC=(--zone="$ZONE")
[ -n "$PROJECT" ] && LOC+=(--project="$PROJECT")

# 0. the compile check, here: the job's config and overrides compiled for the slice's chips
case "${ARGS[0]}" in
  biomedlm_jax.pretrain|biomedlm_jax.finetune_mcqa|biomedlm_jax.finetune_seq2seq) ;;
  *) AOT_CHECK=0 ;;  # not a training job: nothing to compile ahead
esac
if [ "$AOT_CHECK" -eq 1 ]; then
  AOT=("${PYTHON:-.venv/bin/python}" -m biomedlm_jax.aot --topology="$ACCEL")
  for arg in "${ARGS[@]:1}"; do
    case "$arg" in --config=*|--config.*) AOT+=("$arg") ;; esac
  done
  if ! run "${AOT[@]}"; then
    echo "tpu_pod.sh: the job does not fit $ACCEL (numbers above); change the config (python -m biomedlm_jax.aot --fit" \
         "prints overrides that fit) or pass --skip_aot_check" >&2
    exit 1
  fi
fi

# 1. the slice: reuse it if it exists
if [ "$DRY_RUN" -eq 1 ]; then
  echo "$(quote "${GCLOUD[@]}" describe "$NAME" "${LOC[@]}") >/dev/null 2>&1 || \\"
  echo "  $(quote "${GCLOUD[@]}" create "$NAME" "${LOC[@]}" --accelerator-type="$ACCEL" --version="$VERSION")"
elif ! "${GCLOUD[@]}" describe "$NAME" "${LOC[@]}" >/dev/null 2>&1; then
  "${GCLOUD[@]}" create "$NAME" "${LOC[@]}" --accelerator-type="$ACCEL" --version="$VERSION"
fi

# 2. this checkout (tracked files at HEAD) on every worker, installed with the TPU extra
TARBALL=/tmp/biomedlm_jax-src.tar.gz
run git archive --format=tar.gz -o "$TARBALL" HEAD
run "${GCLOUD[@]}" scp "$TARBALL" "$NAME:~/biomedlm_jax-src.tar.gz" "${LOC[@]}" --worker=all
INSTALL="mkdir -p ~/biomedlm-jax && tar xzf ~/biomedlm_jax-src.tar.gz -C ~/biomedlm-jax && cd ~/biomedlm-jax \
&& python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
run "${GCLOUD[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$INSTALL"

# 3. the same command on all workers
run "${GCLOUD[@]}" ssh "$NAME" "${LOC[@]}" --worker=all \
  --command="cd ~/biomedlm-jax && .venv/bin/python -m $(quote "${ARGS[@]}")"
