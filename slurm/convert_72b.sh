#!/usr/bin/env bash
#SBATCH --job-name=convert-72b
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#
# HF → Megatron dist_ckpt for the 72B layout of examples/qwen2_5_72b_guided_grpo.yaml (TP=8, PP=4), on
# one CPU node (the conversion streams one shard at a time), so training starts from the converted folder.
#   mkdir -p logs && MODEL_PATH=/models/Qwen2.5-72B-Instruct OUT_DIR=/models/Qwen2.5-72B-mcore sbatch slurm/convert_72b.sh
# Environment: MODEL_PATH (HF folder, required), OUT_DIR (required), TP [8], PP [4],
#   CONTAINER_IMAGE [none: host python3], REPO_DIR [the submit directory].
# Needs tools/convert_checkpoint.py (the conversion issue); this checkout refuses to start without it.
set -euo pipefail
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/ray_on_slurm.sh
source "${REPO_DIR}/slurm/ray_on_slurm.sh"
: "${MODEL_PATH:?set MODEL_PATH to the HF model folder}" "${OUT_DIR:?set OUT_DIR to the output folder}"
if [[ ! -f "${REPO_DIR}/tools/convert_checkpoint.py" ]]; then
  echo "convert: ${REPO_DIR}/tools/convert_checkpoint.py is not in this checkout" >&2
  exit 2
fi
on_head python3 tools/convert_checkpoint.py --from hf --to megatron --tp "${TP:-8}" --pp "${PP:-4}" \
  --input "${MODEL_PATH}" --output "${OUT_DIR}" --verify
