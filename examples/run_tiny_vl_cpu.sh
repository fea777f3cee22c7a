#!/usr/bin/env bash
# The multimodal job on one CPU: build the tiny Qwen2.5-VL and the toy visual task locally, SFT warm
# start, then guided GRPO (the start number of each chained-arithmetic problem is only in the image).
#   bash examples/run_tiny_vl_cpu.sh [dotted.key=value ...]   (extra args go to the GRPO run)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f models/tiny-qwen2.5-vl/model.safetensors ] || python3 tools/make_tiny_model.py --arch qwen2_5_vl --out models/tiny-qwen2.5-vl
[ -f data/visual_arith/train.jsonl ] || \
  python3 tools/prepare_data.py --task visual_arith --out data/visual_arith --train 8000 --dev 200 --test 200 --seed 0
# SFT in two stages (see examples/sft_tiny_vl_cpu.yaml): 500 steps, then a second decay from the result.
[ -f outputs/sft/tiny-qwen2.5-vl-sft-500/model.safetensors ] || \
  python3 -m megatron_guided.sft config=examples/sft_tiny_vl_cpu.yaml sft.output_dir=outputs/sft/tiny-qwen2.5-vl-sft-500
[ -f outputs/sft/tiny-qwen2.5-vl-sft/model.safetensors ] || \
  python3 -m megatron_guided.sft config=examples/sft_tiny_vl_cpu.yaml sft.model_path=outputs/sft/tiny-qwen2.5-vl-sft-500 \
    sft.steps=400 sft.lr=1.5e-3 sft.warmup_steps=1 sft.decay_steps=300 sft.eval_every=100
python3 -m megatron_guided.train config=examples/tiny_vl_cpu_guided.yaml "$@"
