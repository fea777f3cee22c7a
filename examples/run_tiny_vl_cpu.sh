#!/usr/bin/env bash
# The multimodal job on one CPU: build the tiny Qwen2.5-VL and the toy visual task locally, SFT warm
# start, then guided GRPO (the start number of each chained-arithmetic problem is only in the image).
#   bash examples/run_tiny_vl_cpu.sh [dotted.key=value ...]   (extra args go to the GRPO run)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f models/tiny-qwen2.5-vl/model.safetensors ] || python3 tools/make_tiny_model.py --arch qwen2_5_vl --out models/tiny-qwen2.5-vl
[ -f data/visual_arith/train.jsonl ] || \
  python3 tools/prepare_data.py --task visual_arith --out data/visual_arith --train 8000 --dev 200 --test 200 --seed 0
[ -f outputs/sft/tiny-qwen2.5-vl-sft/model.safetensors ] || python3 -m megatron_guided.sft config=examples/sft_tiny_vl_cpu.yaml
python3 -m megatron_guided.train config=examples/tiny_vl_cpu_guided.yaml "$@"
