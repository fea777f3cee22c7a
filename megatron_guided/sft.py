"""Supervised warm start: teach the policy the answer format before RL.

    python3 -m megatron_guided.sft config=examples/sft_tiny_cpu.yaml sft.steps=300

Trains on ``prompt → target`` pairs (the data's ``data.prompt_key`` rendered with the chat template,
then ``target_key`` + EOS), loss on target tokens only, with a warmup-stable-decay learning rate.
Writes an HF folder (model + tokenizer, + image processor for vision-language models) to
``sft.output_dir``, atomically. Vision-language models get each row's images and m-RoPE positions
(:func:`~megatron_guided.models.vision.vision_forward_kwargs`).
"""

from __future__ import annotations

import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoTokenizer

from megatron_guided.checkpoint.manager import TMP_PREFIX, publish_dir
from megatron_guided.config import ConfigError, DataConfig, load_config, save_resolved
from megatron_guided.data.dataset import build_prompt_dataset
from megatron_guided.logging import setup_logging
from megatron_guided.models.vision import (
    MRoPE,
    VisionProcessor,
    is_vision_language,
    load_policy_model,
    vision_forward_kwargs,
)

log = logging.getLogger("megatron_guided.sft")


@dataclass(kw_only=True)
class SFTOptions:
    model_path: str = "models/tiny-qwen2"
    output_dir: str = "outputs/sft/tiny-qwen2-sft"
    target_key: str = "solution"
    """Row field holding the target completion."""
    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 20
    decay_steps: int = 60
    """Linear decay to 0 over the last this-many steps (warmup-stable-decay)."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 1
    num_threads: int = 0
    eval_every: int = 100
    """Greedy accuracy on data.val_files every this-many steps (and at the end); 0 = never."""
    eval_samples: int = 200
    target_accuracy: float = 0.0
    """Stop as soon as the greedy eval accuracy reaches this (0 = run all steps). Gives RL a starting
    point of known skill whatever the seed: the tiny model's accuracy jumps sharply during the decay."""


@dataclass(kw_only=True)
class SFTConfig:
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTOptions = field(default_factory=SFTOptions)


def validate_sft(cfg: SFTConfig) -> None:
    if cfg.sft.steps <= 0 or cfg.sft.batch_size <= 0:
        raise ConfigError("sft.steps and sft.batch_size must be > 0")
    if cfg.sft.target_accuracy > 0 and not cfg.data.val_files:
        raise ConfigError("sft.target_accuracy needs data.val_files to evaluate on")
    if cfg.sft.warmup_steps + cfg.sft.decay_steps > cfg.sft.steps:
        raise ConfigError(f"sft.warmup_steps + sft.decay_steps must be <= sft.steps={cfg.sft.steps}")


def wsd_factor(step: int, *, total: int, warmup: int, decay: int) -> float:
    """Warmup-stable-decay: linear 0→1 over `warmup`, 1, then linear 1→0 over the last `decay` steps."""
    if step < warmup:
        return (step + 1) / warmup
    if step >= total - decay:
        return max(0.0, (total - step) / max(1, decay))
    return 1.0


def make_examples(dataset, target_key: str, tokenizer) -> list[tuple[list[int], list[int]]]:
    examples = []
    for sample in dataset:
        if target_key not in sample.extra:
            raise ConfigError(f"sft.target_key={target_key!r}: row {sample.source} has no such field")
        target = tokenizer(sample.extra[target_key], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append((list(sample.prompt_ids), target))
    return examples


def collate(examples, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, L], attention mask [B, L], target mask [B, L-1] (1 on target tokens)."""
    length = max(len(p) + len(t) for p, t in examples)
    ids = torch.full((len(examples), length), pad_id)
    attn = torch.zeros((len(examples), length), dtype=torch.long)
    target_mask = torch.zeros((len(examples), length - 1))
    for i, (prompt, target) in enumerate(examples):
        seq = prompt + target
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        target_mask[i, len(prompt) - 1 : len(seq) - 1] = 1
    return ids, attn, target_mask


@torch.no_grad()
def greedy_accuracy(model, tokenizer, dataset, *, samples: int) -> float:
    """Share of the first `samples` rows whose greedy answer contains ``\\boxed{<ground truth>}``."""
    from megatron_guided.rollout.engine import SamplingParams
    from megatron_guided.rollout.hf_engine import HFEngine
    from megatron_guided.rollout.plain import plain_rollout

    engine = HFEngine(model, eos_token_ids={tokenizer.eos_token_id}, pad_token_id=tokenizer.pad_token_id,
                      decode=tokenizer.decode)
    prompts = [dataset[i] for i in range(min(samples, len(dataset)))]
    trajs = plain_rollout(engine, prompts, n=1, sampling=SamplingParams(max_new_tokens=96, temperature=0.0),
                          base_seed=0, step=0)
    correct = 0
    for traj in trajs:
        text = tokenizer.decode(traj.policy_token_ids, skip_special_tokens=True)
        correct += f"\\boxed{{{traj.ground_truth}}}" in text
    return correct / len(trajs)


def train_sft(cfg: SFTConfig) -> Path:
    opts = cfg.sft
    torch.manual_seed(opts.seed)
    if opts.num_threads > 0:
        torch.set_num_threads(opts.num_threads)
    tokenizer = AutoTokenizer.from_pretrained(opts.model_path)
    model = load_policy_model(opts.model_path, dtype=torch.float32, attn_implementation="eager")
    vl = is_vision_language(model.config)
    processor = VisionProcessor.from_pretrained(opts.model_path, tokenizer=tokenizer) if vl else None
    mrope = MRoPE(model) if vl else None
    train_data = build_prompt_dataset(cfg.data.train_files, cfg.data, tokenizer, processor=processor)
    train = make_examples(train_data, opts.target_key, tokenizer)
    val = (build_prompt_dataset(cfg.data.val_files, cfg.data, tokenizer, processor=processor)
           if cfg.data.val_files else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: wsd_factor(s, total=opts.steps, warmup=opts.warmup_steps, decay=opts.decay_steps))
    generator = torch.Generator().manual_seed(opts.seed)
    order: list[int] = []
    model.train()
    progress = tqdm(range(opts.steps), desc="SFT", dynamic_ncols=True, disable=None)
    for step in progress:
        if len(order) < opts.batch_size:
            order += torch.randperm(len(train), generator=generator).tolist()
        rows, order = order[: opts.batch_size], order[opts.batch_size :]
        ids, attn, target_mask = collate([train[i] for i in rows], tokenizer.pad_token_id)
        extra = vision_forward_kwargs(mrope, ids, attn, [train_data[i].vision for i in rows]) if vl else {}
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False, **extra).logits[:, :-1]
        nll = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (nll * target_mask).sum() / target_mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opts.max_grad_norm)
        optimizer.step()
        scheduler.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
        if val is not None and opts.eval_every > 0 and ((step + 1) % opts.eval_every == 0 or step + 1 == opts.steps):
            model.eval()
            acc = greedy_accuracy(model, tokenizer, val, samples=opts.eval_samples)
            model.train()
            log.info("sft step %d: loss=%.4f lr=%.2e greedy_accuracy=%.3f", step + 1, loss.item(),
                     scheduler.get_last_lr()[0], acc)
            if 0 < opts.target_accuracy <= acc:
                log.info("reached sft.target_accuracy=%.2f at step %d", opts.target_accuracy, step + 1)
                break
    model.eval()
    return save_hf_atomically(model, tokenizer, Path(opts.output_dir),
                              image_processor=processor.image_processor if vl else None)


def save_hf_atomically(model, tokenizer, out: Path, *, image_processor=None) -> Path:
    tmp = out.with_name(f"{TMP_PREFIX}{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if image_processor is not None:
        image_processor.save_pretrained(tmp)
    publish_dir(tmp, out)
    return out


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv, schema=SFTConfig, check=validate_sft)
    except ConfigError as exc:
        sys.exit(f"config error: {exc}")
    save_resolved(cfg, Path(cfg.sft.output_dir).with_name(Path(cfg.sft.output_dir).name + ".config.yaml"))
    path = train_sft(cfg)
    log.info("saved SFT model to %s", path)


if __name__ == "__main__":
    main()
