#!/usr/bin/env bash
# HF <-> Megatron-Core conversion of a large model (e.g. Qwen2.5-72B) as one Slurm job on one node.
#
# The converter is a single process that streams tensor by tensor (peak memory: about the largest
# tensor plus a layer, not the model), so one node and a few CPUs suffice; the time goes to disk I/O.
# With VERIFY=1 both models are loaded for a logits comparison: that needs the model's size in
# memory twice over (fp32) and VERIFY_TP x VERIFY_PP ranks, so ask for a GPU node for 70B+.
#
#   sbatch slurm/convert_72b.sh                                            # defaults below
#   DIRECTION=mcore-to-hf SRC=/ckpt/run1/global_step_500 DST=/models/qwen72b-rl sbatch slurm/convert_72b.sh
#   SRC=/models/Qwen2.5-72B DST=/models/qwen72b-mcore TP=8 PP=4 sbatch --time=04:00:00 slurm/convert_72b.sh
#
# Parameters (environment variables):
#   DIRECTION   hf-to-mcore | mcore-to-hf                     (default hf-to-mcore)
#   SRC, DST    source and target folders (DST must not exist unless OVERWRITE=1)
#   TP, PP      target layout of hf-to-mcore (vocab padding, divisibility checks)   (default 8, 1)
#   HF_CONFIG   mcore-to-hf: config folder/file when the checkpoint has none stored
#   SHARD_SIZE  mcore-to-hf: HF shard size                    (default 5GB)
#   DTYPE       bf16 | fp16 | fp32 to cast; empty keeps the source dtype
#   VERIFY      1 to compare logits afterwards; VERIFY_TP / VERIFY_PP its layout
#   PYTHON      interpreter with megatron-guided installed    (default python3)
#
#SBATCH --job-name=convert-ckpt
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=02:00:00
#SBATCH --output=convert-%j.log

set -euo pipefail

DIRECTION=${DIRECTION:-hf-to-mcore}
SRC=${SRC:-/models/Qwen2.5-72B-Instruct}
DST=${DST:-/models/Qwen2.5-72B-Instruct-mcore}
TP=${TP:-8}
PP=${PP:-1}
SHARD_SIZE=${SHARD_SIZE:-5GB}
PYTHON=${PYTHON:-python3}

args=("$DIRECTION" --out "$DST" --no-progress)
case "$DIRECTION" in
  hf-to-mcore) args+=(--hf "$SRC" --tp "$TP" --pp "$PP") ;;
  mcore-to-hf)
    args+=(--megatron "$SRC" --max-shard-size "$SHARD_SIZE")
    if [[ -n "${HF_CONFIG:-}" ]]; then args+=(--hf-config "$HF_CONFIG"); fi
    ;;
  *) echo "DIRECTION must be hf-to-mcore or mcore-to-hf, not '$DIRECTION'" >&2; exit 2 ;;
esac
if [[ -n "${DTYPE:-}" ]]; then args+=(--dtype "$DTYPE"); fi
if [[ "${OVERWRITE:-0}" == 1 ]]; then args+=(--overwrite); fi
if [[ "${VERIFY:-0}" == 1 ]]; then
  args+=(--verify)
  if [[ -n "${VERIFY_TP:-}" ]]; then args+=(--verify-tp "$VERIFY_TP"); fi
  if [[ -n "${VERIFY_PP:-}" ]]; then args+=(--verify-pp "$VERIFY_PP"); fi
fi

echo "$(date -Is) ${SLURM_JOB_ID:-local}: $PYTHON -m megatron_guided.convert ${args[*]}"
srun --ntasks=1 "$PYTHON" -m megatron_guided.convert "${args[@]}"
echo "$(date -Is) done: $DST"
