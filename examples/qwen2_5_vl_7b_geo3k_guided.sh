#!/usr/bin/env bash
# Guided-GRPO on geometry3k with Qwen2.5-VL-7B-Instruct: an OpenAI-style verifier endpoint that sees
# the images (verifier.multimodal=true; it must serve a vision-language model) corrects the policy
# step by step. Set VERIFIER_URL (e.g. http://host:8000/v1) and, if needed, VERIFIER_API_KEY.
#   VERIFIER_URL=http://verifier:8000/v1 bash examples/qwen2_5_vl_7b_geo3k_guided.sh [dotted.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
: "${VERIFIER_URL:?set VERIFIER_URL to the verifier's OpenAI-style base URL}"
python3 -m megatron_guided.train config=examples/qwen2_5_vl_7b_geo3k.yaml \
  trainer.experiment_name=qwen2_5_vl_7b_geo3k_guided \
  worker.rollout.n=8 \
  worker.rollout.verifier.enable=true \
  worker.rollout.verifier.type=http \
  worker.rollout.verifier.base_url="$VERIFIER_URL" \
  worker.rollout.verifier.multimodal=true \
  worker.rollout.verifier.max_turns=10 \
  worker.rollout.verifier.temperature=0.0 \
  worker.rollout.verifier.show_reference=train \
  worker.reward.reward_function=examples/reward_function/guided_math.py:compute_score \
  "$@"
