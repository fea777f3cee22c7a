"""One GRPO update on the same batch: MegatronBackend (TP=1, TP=2, PP=2 on gloo) vs TorchBackend, on CPU.

Measured in one invocation on one machine: each side trains the same random Qwen2 on the same padded
batch (built like a rollout batch: prompt + response, loss mask on the response), one warm-up update
then `--steps` timed updates; prints the median step time and the ratio Megatron ÷ Torch (below 1 is
faster). Thread budget: the whole machine per side (`--threads` for TorchBackend and a single
Megatron rank; split evenly between ranks otherwise).

    python bench/megatron_vs_torch.py [--steps 5] [--threads 2] [--layouts tp1 tp2 pp2] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install needed

from megatron_guided.config import ActorConfig, AlgorithmConfig, MegatronConfig
from megatron_guided.rollout.trajectory import Trajectory
from megatron_guided.train.batch import build_train_batch
from megatron_guided.train.megatron_backend import MegatronBackend
from megatron_guided.train.torch_backend import TorchBackend

LAYOUTS = {"tp1": {}, "tp2": {"tp": 2}, "pp2": {"pp": 2}, "dp2": {"dp": 2}}


def make_model(out: str) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=1024, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out)
    return model.eval()


def make_batch(rows: int, vocab: int):
    """`rows` samples: 40-token prompts, 40-100-token responses (GRPO-like lengths)."""
    gen = torch.Generator().manual_seed(0)
    trajectories = []
    for i in range(rows):
        traj = Trajectory(prompt_ids=torch.randint(1, vocab, (40,), generator=gen).tolist(), group_id=i // 8,
                          sample_seed=i)
        length = int(torch.randint(40, 101, (1,), generator=gen))
        traj.append(torch.randint(1, vocab, (length,), generator=gen).tolist(), [-1.0] * length, trainable=True)
        trajectories.append(traj)
    batch = build_train_batch(trajectories, pad_token_id=0)
    batch.advantages = torch.randn(rows, 1, generator=gen) * batch.loss_mask
    return batch


def timed_steps(backend, batch, steps: int) -> list[float]:
    backend.train_step(batch)  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        backend.train_step(batch)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layouts", nargs="+", default=["tp1", "tp2", "pp2"], choices=sorted(LAYOUTS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(tmp)
        batch = make_batch(args.rows, model.config.vocab_size)

        def actor(**layout) -> ActorConfig:
            cfg = ActorConfig(max_token_len_per_micro_batch=4096, micro_batch_size_per_device_for_update=64,
                              megatron=MegatronConfig(**layout))
            cfg.optim.lr = 1e-5
            return cfg

        kwargs = dict(algorithm=AlgorithmConfig(), temperature=1.0, num_mini_batches=1, total_optimizer_steps=100,
                      max_response_length=100)
        torch_backend = TorchBackend(copy.deepcopy(model), actor=actor(), **kwargs)
        results = {"torch": timed_steps(torch_backend, batch, args.steps)}
        for name in args.layouts:
            backend = MegatronBackend(model_path=tmp, actor=actor(**LAYOUTS[name]), **kwargs)
            try:
                results[f"megatron-{name}"] = timed_steps(backend, batch, args.steps)
            finally:
                backend.close()
        # torch again, last: if the machine got busier or quieter meanwhile, the two torch rows differ
        results["torch (again)"] = timed_steps(torch_backend, batch, args.steps)
    tokens = int(batch.attention_mask.sum())
    base = statistics.median(results["torch"])
    print(f"one GRPO update, {args.rows} rows, {tokens} tokens, model 4×256 (median of {args.steps} steps)")
    print(f"{'side':<16}{'step s':>9}{'tokens/s':>11}{'÷ torch':>9}")
    for name, times in results.items():
        median = statistics.median(times)
        print(f"{name:<16}{median:>9.3f}{tokens / median:>11.0f}{median / base:>9.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"tokens": tokens, "steps": results}, handle, indent=2)


if __name__ == "__main__":
    main()
