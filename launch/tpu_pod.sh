#!/usr/bin/env bash
# Cloud TPU VM slice: create (or reuse) it, install this repo with the TPU extra on every worker, and
# start the same command on all workers. jax.distributed.initialize() reads the TPU topology itself.
#
#   launch/tpu_pod.sh [--dry_run] [--name=biomedlm] [--zone=us-central2-b] [--accelerator_type=v4-128]
#                     [--version=tpu-ubuntu2204-base] [--project=PROJECT] [--workdir=/mnt/gcs/runs/biomedlm-2.7b]
#                     [ENTRY [FLAGS...]]
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
    *) ARGS+=("$arg") ;;
  esac
done
if [ ${#ARGS[@]} -eq 0 ]; then
  ARGS=("$DEFAULT_ENTRY" "${DEFAULT_FLAGS[@]}" "--workdir=$WORKDIR")
fi
GCLOUD=(gcloud compute tpus tpu-vm)
LOC=(--zone="$ZONE")
[ -n "$PROJECT" ] && LOC+=(--project="$PROJECT")

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
