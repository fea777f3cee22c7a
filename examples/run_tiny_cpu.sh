#!/usr/bin/env bash
# The main job on one CPU: build the tiny model and data locally, SFT warm start, then plain GRPO.
#   bash examples/run_tiny_cpu.sh [dotted.key=value ...]   (extra args go to the GRPO run)
# Re-running resumes: existing model/data/SFT outputs are reused, GRPO continues from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f models/tiny-qwen2/model.safetensors ] || python3 tools/make_tiny_model.py --out models/tiny-qwen2
[ -f data/arith_easy/train.jsonl ] || \
  python3 tools/prepare_data.py --task arith --difficulty easy --out data/arith_easy --train 20000 --dev 200 --test 500 --seed 0
[ -f outputs/sft/tiny-qwen2-sft/model.safetensors ] || python3 -m megatron_guided.sft config=examples/sft_tiny_cpu.yaml
python3 -m megatron_guided.train config=examples/tiny_cpu.yaml "$@"
