"""Build a Trainer from a Config and run it (``python3 -m megatron_guided.train config=... key=value``)."""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from megatron_guided.config import Config, ConfigError, VerifierConfig, load_config
from megatron_guided.data.dataset import build_prompt_dataset
from megatron_guided.logging import setup_logging
from megatron_guided.models.vision import VisionProcessor, is_vision_language, load_policy_model
from megatron_guided.reward.function import RewardManager
from megatron_guided.rollout.batcher import async_generator
from megatron_guided.rollout.engine import GenerationEngine
from megatron_guided.rollout.guided import ChatDelta, GuidedRollout
from megatron_guided.rollout.hf_engine import HFEngine, eos_token_ids
from megatron_guided.train.backend import TrainBackend
from megatron_guided.train.torch_backend import TorchBackend
from megatron_guided.verifier.base import Verifier
from megatron_guided.verifier.function import FunctionVerifier
from megatron_guided.verifier.http import HttpVerifier
from megatron_guided.verifier.model import ModelVerifier
from megatron_guided.train.trainer import Trainer, planned_steps

log = logging.getLogger("megatron_guided.train")


def build_trainer(cfg: Config) -> Trainer:
    torch.manual_seed(cfg.trainer.seed)
    if cfg.trainer.num_threads > 0:
        torch.set_num_threads(cfg.trainer.num_threads)
    model_cfg = cfg.worker.actor.model
    tokenizer = AutoTokenizer.from_pretrained(model_cfg.tokenizer_path or model_cfg.model_path,
                                              trust_remote_code=model_cfg.trust_remote_code)
    hf_config = AutoConfig.from_pretrained(model_cfg.model_path, trust_remote_code=model_cfg.trust_remote_code)
    megatron = cfg.worker.actor.strategy == "megatron"
    model, start_group = None, None
    if cfg.cluster.launcher == "ray":  # the engines and the ranks load their models where they run
        from megatron_guided.launch.ray_run import start_on_ray

        cfg, engine, start_group = start_on_ray(cfg, engine_factory=build_policy_engine)
    else:
        if not (megatron and cfg.worker.rollout.engine == "sglang"):  # someone in this process needs the HF model
            model = load_policy(cfg, hf_config)
        # megatron: the ranks train their own copy, so the in-process engine may take this one
        engine = build_policy_engine(cfg, model, tokenizer, copy_model=not megatron)
    processor = VisionProcessor.from_pretrained(model_cfg.tokenizer_path or model_cfg.model_path,
                                                tokenizer=tokenizer) if is_vision_language(hf_config) else None
    train_data = build_prompt_dataset(cfg.data.train_files, cfg.data, tokenizer, processor=processor)
    val_data = (build_prompt_dataset(cfg.data.val_files, cfg.data, tokenizer, processor=processor)
                if cfg.data.val_files else None)
    if val_data is not None and cfg.data.val_max_samples > 0:
        val_data = [val_data[i] for i in range(min(cfg.data.val_max_samples, len(val_data)))]
    try:
        total_steps = planned_steps(cfg, len(train_data))
        num_mini = cfg.data.rollout_batch_size // cfg.worker.actor.global_batch_size
        backend = build_backend(cfg, model, num_mini_batches=num_mini, start_group=start_group,
                                total_optimizer_steps=total_steps * num_mini * cfg.worker.actor.ppo_epochs)
        if megatron and not has_hf_weights(model_cfg.model_path):  # a converted Megatron folder: weights from the ranks
            engine.update_weights(backend.export_weights())
        reward = RewardManager(cfg.worker.reward.reward_function, reward_type=cfg.worker.reward.reward_type,
                               kwargs=cfg.worker.reward.reward_function_kwargs)
        guided = build_guided_rollout(cfg, engine, tokenizer) if cfg.worker.rollout.verifier.enable else None
    except BaseException:
        engine.close()  # no servers left behind when the rest of the setup fails
        raise
    return Trainer(cfg, tokenizer=tokenizer, backend=backend, engine=engine, train_data=train_data,
                   val_data=val_data, reward=reward, guided=guided)


def has_hf_weights(path: str) -> bool:
    return any(Path(path).glob("*.safetensors")) or not Path(path).is_dir()


def load_policy(cfg: Config, hf_config=None) -> torch.nn.Module:
    """The HF policy from model_path (`hf_config`: its config, when the caller has read it already); for
    a weight-less folder (a converted Megatron checkpoint: config + dist_ckpt/) the architecture only,
    to be filled from the Megatron ranks."""
    model_cfg = cfg.worker.actor.model
    kwargs = dict(dtype=getattr(torch, model_cfg.dtype), attn_implementation=model_cfg.attn_implementation,
                  trust_remote_code=model_cfg.trust_remote_code)
    if hf_config is None:
        hf_config = AutoConfig.from_pretrained(model_cfg.model_path, trust_remote_code=model_cfg.trust_remote_code)
    return load_policy_model(model_cfg.model_path, config=hf_config, weights=has_hf_weights(model_cfg.model_path),
                             **kwargs)


def build_backend(cfg: Config, model: torch.nn.Module | None, *, num_mini_batches: int, total_optimizer_steps: int,
                  start_group=None) -> TrainBackend:
    """worker.actor.strategy: torch (trains `model` here) | megatron (ranks load model_path themselves,
    started by `start_group` when given: see MegatronBackend)."""
    actor = cfg.worker.actor
    common = dict(actor=actor, algorithm=cfg.algorithm, temperature=cfg.worker.rollout.temperature,
                  num_mini_batches=num_mini_batches, total_optimizer_steps=total_optimizer_steps,
                  max_response_length=cfg.data.max_response_length)
    if actor.strategy == "megatron":
        from megatron_guided.train.megatron_backend import MegatronBackend

        return MegatronBackend(model_path=actor.model.model_path, seed=cfg.trainer.seed, start_group=start_group,
                               **common)
    return TorchBackend(model, **common)


def build_policy_engine(cfg: Config, model: torch.nn.Module | None = None, tokenizer=None, *,
                        copy_model: bool = False) -> GenerationEngine:
    """worker.rollout.engine: sglang (servers on the actor's model_path, weight-synced after every step) |
    hf (in this process, on `model` or a copy of it when the trainer trains `model` itself; loaded from
    worker.actor.model when None, e.g. inside a Ray actor)."""
    rollout, model_cfg = cfg.worker.rollout, cfg.worker.actor.model
    if rollout.engine == "sglang":
        from megatron_guided.rollout.sglang.engine import SGLangEngine

        return SGLangEngine.from_config(rollout.sglang, model_path=model_cfg.model_path,
                                        log_dir=cfg.output_dir / "sglang" / "policy",
                                        weight_sync_dir=cfg.output_dir / "weight_sync")
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model_cfg.tokenizer_path or model_cfg.model_path,
                                                  trust_remote_code=model_cfg.trust_remote_code)
    model = load_policy(cfg) if model is None else model
    return HFEngine((copy.deepcopy(model) if copy_model else model).eval(), eos_token_ids=eos_token_ids(model, tokenizer),
                    pad_token_id=tokenizer.pad_token_id, decode=tokenizer.decode,
                    max_batch_tokens=rollout.max_num_batched_tokens, seed=rollout.seed)


def build_verifier(cfg: VerifierConfig, *, log_dir: Path = Path("outputs/sglang/verifier")) -> Verifier:
    """function | model | http (use_http=true selects http, as in the original configs); a model
    verifier on engine=sglang writes its server logs under `log_dir`."""
    if cfg.use_http or cfg.type == "http":
        return HttpVerifier.from_config(cfg)
    if cfg.type == "model":
        return ModelVerifier.from_config(cfg, log_dir=log_dir)
    return FunctionVerifier.from_config(cfg)


def build_guided_rollout(cfg: Config, engine: GenerationEngine, tokenizer) -> GuidedRollout:
    verifier = build_verifier(cfg.worker.rollout.verifier, log_dir=cfg.output_dir / "sglang" / "verifier")
    return GuidedRollout(generator=async_generator(engine), verifier=verifier,
                         cfg=cfg.worker.rollout.verifier,
                         delta=ChatDelta(tokenizer=tokenizer, end_of_turn_id=tokenizer.eos_token_id),
                         decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                         max_response_length=cfg.data.max_response_length)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        sys.exit(f"config error: {exc}")
    build_trainer(cfg).fit()


