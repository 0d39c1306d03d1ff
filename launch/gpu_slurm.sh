#!/usr/bin/env bash
# Submit a multi-node GPU job (launch/gpu_slurm.sbatch): one process per GPU, CUDA extra installed on
# every node, XLA GPU flags from launch/common.sh.
#
#   launch/gpu_slurm.sh [--dry_run] [--nodes=2] [--gpus_per_node=8] [--partition=P] [--time=72:00:00]
#                       [--account=A] [ENTRY [FLAGS...]]
#
# With no ENTRY: BioMedLM 2.7B pretraining on two 8-GPU nodes, workdir runs/biomedlm-2.7b (put the
# checkout on a filesystem all nodes share).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/common.sh
source launch/common.sh

NODES=2
GPUS=8
SBATCH_OPTS=()
ARGS=()
for arg in "$@"; do
  if [ ${#ARGS[@]} -gt 0 ]; then ARGS+=("$arg"); continue; fi  # after ENTRY: the job's own flags
  case "$arg" in
    --dry_run) DRY_RUN=1 ;;
    --nodes=*) NODES="${arg#--nodes=}" ;;
    --gpus_per_node=*) GPUS="${arg#--gpus_per_node=}" ;;
    --partition=*|--time=*|--account=*) SBATCH_OPTS+=("$arg") ;;
    *) ARGS+=("$arg") ;;
  esac
done
if [ ${#ARGS[@]} -eq 0 ]; then
  ARGS=("$DEFAULT_ENTRY" "${DEFAULT_FLAGS[@]}" --workdir=runs/biomedlm-2.7b)
fi
run mkdir -p logs
run sbatch --nodes="$NODES" --ntasks-per-node="$GPUS" --gpus-per-node="$GPUS" "${SBATCH_OPTS[@]}" \
  launch/gpu_slurm.sbatch "${ARGS[@]}"
