#!/usr/bin/env bash
# GRPO (plain, open-loop) on geometry3k with Qwen2.5-VL-7B-Instruct: Megatron-Core TP=2 policy.
#   bash examples/qwen2_5_vl_7b_geo3k_grpo.sh [dotted.key=value ...]
# Needs data/geometry3k (saved locally, see examples/qwen2_5_vl_7b_geo3k.yaml) and the model folder.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m megatron_guided.train config=examples/qwen2_5_vl_7b_geo3k.yaml "$@"
