#!/usr/bin/env bash
#SBATCH --job-name=guided-grpo-72b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
#
# Guided-GRPO on Qwen2.5-72B-Instruct (examples/qwen2_5_72b_guided_grpo.yaml): Ray on the allocation
# (head on the first node, workers on the others), training driven from the head, Ray torn down at exit.
# Submit from the repository root (logs/ must exist):
#   mkdir -p logs && sbatch slurm/train_72b.sh
#   CONFIG=examples/qwen2_5_32b_guided_grpo.yaml sbatch --nodes=3 slurm/train_72b.sh
# Environment (defaults in brackets):
#   CONFIG          training config                  [examples/qwen2_5_72b_guided_grpo.yaml]
#   MODEL_PATH      policy HF/Megatron folder        [from CONFIG]
#   VERIFIER_PATH   verifier model folder            [from CONFIG]
#   DATA_DIR        folder with train.jsonl/test.jsonl [from CONFIG]
#   CKPT_DIR        checkpoints                      [checkpoints/<project>/<experiment>]
#   CONTAINER_IMAGE image for every step (pyxis), e.g. the Dockerfile's  [none: host python3]
#   TRAIN_ARGS      extra dotted overrides, space-separated
#   REPO_DIR        this checkout (shared filesystem)  [the submit directory]
#   and those of slurm/ray_on_slurm.sh (RAY_PORT, RAY_NUM_CPUS, ...).
set -euo pipefail
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/ray_on_slurm.sh
source "${REPO_DIR}/slurm/ray_on_slurm.sh"
train_on_ray examples/qwen2_5_72b_guided_grpo.yaml
