"""The RL loop: rollout → reward → advantages → update → weight sync → log → checkpoint → validate.

One method per phase, each timed under a stable name (``timing/gen``, ``timing/reward``, ...).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_guided.algo.advantages import OUTCOME_ADVANTAGE_ESTIMATORS, place_outcome_reward
from megatron_guided.algo.advantages import reinforce_plus_plus_advantages
from megatron_guided.algo.aggregation import masked_mean
from megatron_guided.algo.filtering import dynamic_sampling_keep_mask, overlong_reward_shaping
from megatron_guided.algo.kl import KL_ESTIMATORS, apply_kl_in_reward
from megatron_guided.checkpoint.manager import CheckpointManager, capture_rng_state, restore_rng_state
from megatron_guided.config import Config, save_resolved
from megatron_guided.data.dataset import PromptDataset
from megatron_guided.data.sampler import PromptSampler
from megatron_guided.logging import Tracker
from megatron_guided.models.vision import copy_image_processor
from megatron_guided.reward.function import RewardManager
from megatron_guided.rollout.engine import GenerationEngine, SamplingParams
from megatron_guided.rollout.guided import GuidedRollout, hallucination_score
from megatron_guided.rollout.plain import plain_rollout
from megatron_guided.rollout.trajectory import Trajectory
from megatron_guided.train.batch import TrainBatch, build_train_batch
from megatron_guided.train.backend import TrainBackend

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: Config, *, tokenizer, backend: TrainBackend, engine: GenerationEngine,
                 train_data: PromptDataset, val_data: PromptDataset | None, reward: RewardManager,
                 guided: GuidedRollout | None = None):
        self.cfg = cfg
        self.guided = guided
        self.tokenizer, self.backend, self.engine = tokenizer, backend, engine
        self.train_data, self.val_data, self.reward = train_data, val_data, reward
        self.sampler = PromptSampler(num_items=len(train_data), batch_size=cfg.data.rollout_batch_size,
                                     seed=cfg.data.seed, shuffle=cfg.data.shuffle)
        self.total_steps = planned_steps(cfg, len(train_data))
        self.step = 0
        self.checkpoints = CheckpointManager(cfg.checkpoint_dir, keep_last=cfg.trainer.save_limit)
        self.timings: dict[str, float] = {}
        rollout = cfg.worker.rollout
        self.sampling = SamplingParams(max_new_tokens=cfg.data.max_response_length, temperature=rollout.temperature,
                                       top_p=rollout.top_p, top_k=rollout.top_k, stop=tuple(rollout.stop))

    # -- phases ---------------------------------------------------------------------------
    @contextmanager
    def _timed(self, name: str):
        start = time.perf_counter()
        yield
        self.timings[f"timing/{name}"] = time.perf_counter() - start

    def generate(self, prompt_indices: Sequence[int]) -> list[Trajectory]:
        prompts = [self.train_data[i] for i in prompt_indices]
        n, seed = self.cfg.worker.rollout.n, self.cfg.worker.rollout.seed
        if self.guided is None:
            return plain_rollout(self.engine, prompts, n=n, sampling=self.sampling, base_seed=seed, step=self.step)
        show_reference = self.cfg.worker.rollout.verifier.show_reference != "never"
        return self.guided.rollout(prompts, n=n, sampling=self.sampling, base_seed=seed, step=self.step,
                                   show_reference=show_reference, score=self.score)

    def score(self, trajectories: list[Trajectory]) -> None:
        """Fill each trajectory's reward from the reward function (policy text only), minus
        correction_penalty per verifier correction."""
        todo = [t for t in trajectories if t.reward is None]
        if not todo:
            return
        verifier = self.cfg.worker.rollout.verifier
        inputs = []
        for t in todo:
            item = {
                "response": self.tokenizer.decode(t.policy_token_ids, skip_special_tokens=True),
                "final_response": self.tokenizer.decode(t.final_turn_token_ids, skip_special_tokens=True),
                "response_length": t.num_policy_tokens,
                "ground_truth": t.ground_truth,
                "num_turns": t.num_turns,
                "finish_reason": t.extra.get("finish_reason"),
                "guided": t.guided,
                "num_corrections": t.num_corrections,
            }
            if verifier.enable and verifier.enable_hallucination_score:
                item["verifier_hallucination_score"] = hallucination_score(
                    t, default=verifier.default_hallucination_score)
            inputs.append(item)
        for traj, out in zip(todo, self.reward(inputs)):
            penalty = verifier.correction_penalty * traj.num_corrections
            traj.reward = out["overall"] - penalty
            traj.reward_breakdown = out | ({"correction_penalty": penalty} if verifier.enable else {})

    def compute_advantages(self, trajectories: list[Trajectory], batch: TrainBatch) -> dict[str, float]:
        """Shape rewards (overlong, KL-in-reward), then fill batch.advantages with the estimator."""
        algo = self.cfg.algorithm
        rewards = torch.tensor([t.reward for t in trajectories], dtype=torch.float32)
        if algo.overlong_buffer_len > 0:
            lengths = torch.tensor([t.num_policy_tokens for t in trajectories], dtype=torch.float32)
            rewards = rewards + overlong_reward_shaping(
                lengths, max_response_length=self.cfg.data.max_response_length,
                overlong_buffer_len=algo.overlong_buffer_len, penalty_factor=algo.overlong_penalty_factor)
        group_ids = torch.tensor([t.group_id for t in trajectories])
        metrics = {}
        if algo.adv_estimator in OUTCOME_ADVANTAGE_ESTIMATORS:
            adv = OUTCOME_ADVANTAGE_ESTIMATORS[algo.adv_estimator](rewards, group_ids)
            batch.advantages = adv[:, None] * batch.loss_mask
        else:
            token_rewards = place_outcome_reward(rewards, batch.loss_mask)
            if algo.kl_coef > 0 and not algo.use_kl_loss:
                kl = KL_ESTIMATORS[algo.kl_penalty](batch.old_logprobs, batch.ref_logprobs)
                token_rewards = apply_kl_in_reward(token_rewards, kl, batch.loss_mask, kl_coef=algo.kl_coef)
                metrics["actor/reward_kl"] = float(masked_mean(kl, batch.loss_mask))
            batch.advantages = reinforce_plus_plus_advantages(token_rewards, batch.loss_mask, gamma=algo.gamma)
        return metrics

    def update(self, trajectories: list[Trajectory]) -> tuple[dict[str, float], int]:
        """Build the batch (after DAPO filtering), fill old/ref logprobs, advantages, and train."""
        metrics: dict[str, float] = {}
        if self.cfg.algorithm.online_filtering:
            keep = dynamic_sampling_keep_mask(torch.tensor([t.reward for t in trajectories]),
                                              torch.tensor([t.group_id for t in trajectories]))
            metrics["batch/kept_fraction"] = float(keep.float().mean())
            trajectories = [t for t, k in zip(trajectories, keep.tolist()) if k]
            if not trajectories:
                return metrics, 0
        batch = build_train_batch(trajectories, pad_token_id=self.tokenizer.pad_token_id)
        with self._timed("old"):
            if self.backend.recompute_old_logprobs or (self.cfg.algorithm.kl_coef > 0
                                                       and not self.cfg.algorithm.use_kl_loss):
                batch.old_logprobs = self.backend.compute_logprobs(batch)
        with self._timed("ref"):
            if self.backend.needs_ref:
                batch.ref_logprobs = self.backend.compute_logprobs(batch, reference=True)
        with self._timed("adv"):
            metrics.update(self.compute_advantages(trajectories, batch))
        with self._timed("update_actor"):
            metrics.update({f"actor/{k}": v for k, v in self.backend.train_step(batch).items()})
        return metrics, batch.size

    def sync_weights(self) -> None:
        self.engine.update_weights(self.backend.export_weights())

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> None:
        cfg = self.cfg
        output_dir = cfg.output_dir
        save_resolved(cfg, output_dir / "config.yaml")
        self.maybe_resume()
        tracker = Tracker(cfg, output_dir, start_step=self.step)
        started = time.perf_counter()
        try:
            if cfg.trainer.val_only or (cfg.trainer.val_before_train and self.step == 0):
                tracker.log(self.validate() | {"time/elapsed_s": time.perf_counter() - started}, step=self.step)
                if cfg.trainer.val_only:
                    return
            progress = tqdm(total=self.total_steps, initial=self.step, desc="GRPO", dynamic_ncols=True,
                            disable=None)
            while self.step < self.total_steps:
                metrics = self.train_one_step()
                progress.update(1)
                progress.set_postfix(reward=f"{metrics['reward/overall']:.3f}")
                last = self.step == self.total_steps
                if last or (cfg.trainer.val_freq > 0 and self.step % cfg.trainer.val_freq == 0):
                    if self.val_data is not None and (cfg.trainer.val_freq > 0 or last):
                        metrics.update(self.validate())
                metrics["time/elapsed_s"] = time.perf_counter() - started
                tracker.log(metrics, step=self.step)
                if last or (cfg.trainer.save_freq > 0 and self.step % cfg.trainer.save_freq == 0):
                    self.save_checkpoint()
            progress.close()
        finally:
            tracker.close()
            self.close()

    def close(self) -> None:
        """Close the guided rollout (verifier, event loop), the engine (SGLang servers stop) and the
        backend (Megatron ranks stop)."""
        try:
            if self.guided is not None:
                self.guided.close()
        finally:
            try:
                self.engine.close()
            finally:
                self.backend.close()

    def train_one_step(self) -> dict[str, float]:
        self.timings = {}
        start = time.perf_counter()
        with self._timed("gen"):
            trajectories = self.generate(self.sampler.next_batch())
        with self._timed("reward"):
            self.score(trajectories)
        update_metrics, num_trained = self.update(trajectories)
        with self._timed("sync"):
            self.sync_weights()
        self.step += 1
        metrics = rollout_metrics(trajectories) | update_metrics | self.timings | self.guided_metrics(trajectories)
        elapsed = time.perf_counter() - start
        tokens = sum(len(t.prompt_ids) + len(t.response_ids) for t in trajectories)
        metrics.update({"timing/step": elapsed, "perf/tokens_per_s": tokens / elapsed,
                        "batch/num_trained": num_trained, "train/epoch": self.sampler.epoch})
        return metrics

    def guided_metrics(self, trajectories: Sequence[Trajectory]) -> dict[str, float]:
        return {} if self.guided is None else self.guided.collect_metrics(trajectories)

    def validate(self) -> dict[str, float]:
        """Greedy (val_override_config) accuracy on the validation set, plus sampled accuracy at the
        rollout temperature when trainer.val_sampled_n > 0."""
        if self.val_data is None:
            return {}
        metrics = {}
        override = self.cfg.worker.rollout.val_override_config
        runs = {"val": (override.temperature, override.top_p, override.n)}
        if self.cfg.trainer.val_sampled_n > 0:
            rollout = self.cfg.worker.rollout
            runs["val_sampled"] = (rollout.temperature, rollout.top_p, self.cfg.trainer.val_sampled_n)
        if self.guided is not None:  # the policy with its verifier, greedy
            runs["val_guided"] = (override.temperature, override.top_p, override.n)
        for prefix, (temperature, top_p, n) in runs.items():
            with self._timed(prefix):
                trajectories = self.validation_rollout(guided=prefix == "val_guided", temperature=temperature,
                                                       top_p=top_p, n=n)
            if prefix == "val_guided":
                metrics |= {f"{prefix}/{k.split('/', 1)[1]}": v for k, v in self.guided_metrics(trajectories).items()
                            if k.startswith(("guided/turns", "guided/corrections"))}
            metrics[f"timing/{prefix}"] = self.timings[f"timing/{prefix}"]
            metrics |= {f"{prefix}/{k}": v for k, v in mean_breakdown(trajectories).items()}
            metrics[f"{prefix}/response_length"] = sum(t.num_policy_tokens for t in trajectories) / len(trajectories)
        return metrics

    def validation_rollout(self, *, guided: bool, temperature: float, top_p: float, n: int) -> list[Trajectory]:
        """Scored rollouts on the validation set: the policy alone, or with its verifier on every sample
        (the reference answer shown only with show_reference=always)."""
        sampling = dataclasses.replace(self.sampling, temperature=temperature, top_p=top_p)
        prompts, seed = list(self.val_data), self.cfg.worker.rollout.seed + 7919
        if guided:
            show = self.cfg.worker.rollout.verifier.show_reference == "always"
            with self.guided.fully_guided():
                trajectories = self.guided.rollout(prompts, n=n, sampling=sampling, base_seed=seed, step=0,
                                                   show_reference=show, score=self.score, guide_when="always")
        else:
            trajectories = plain_rollout(self.engine, prompts, n=n, sampling=sampling, base_seed=seed, step=0)
        self.score(trajectories)
        return trajectories

    # -- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        state = {"step": self.step, "sampler": self.sampler.state_dict(), "rng": capture_rng_state()}

        def write(folder: Path) -> None:
            self.backend.save_checkpoint(folder)
            self.tokenizer.save_pretrained(folder / "huggingface")
            copy_image_processor(self.cfg.worker.actor.model.model_path, folder / "huggingface")

        path = self.checkpoints.save(self.step, write=write, trainer_state=state)
        log.info("saved checkpoint %s", path)
        return path

    def maybe_resume(self) -> None:
        t = self.cfg.trainer
        path = Path(t.load_checkpoint_path) if t.load_checkpoint_path else (
            self.checkpoints.latest() if t.find_last_checkpoint else None)
        if path is None:
            return
        state = CheckpointManager.load_trainer_state(path)
        self.backend.load_checkpoint(path)
        self.sampler.load_state_dict(state["sampler"])
        restore_rng_state(state["rng"])
        self.step = state["step"]
        self.sync_weights()
        log.info("resumed from %s at step %d", path, self.step)


def planned_steps(cfg: Config, num_prompts: int) -> int:
    """Training steps of the run: total_epochs over the prompts, capped by trainer.max_steps."""
    steps = cfg.trainer.total_epochs * (num_prompts // cfg.data.rollout_batch_size)
    return min(steps, cfg.trainer.max_steps) if cfg.trainer.max_steps else steps


def mean_breakdown(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    keys = trajectories[0].reward_breakdown.keys()
    return {k: sum(t.reward_breakdown[k] for t in trajectories) / len(trajectories) for k in keys}


def rollout_metrics(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    lengths = [t.num_policy_tokens for t in trajectories]
    metrics = {f"reward/{k}": v for k, v in mean_breakdown(trajectories).items()}
    metrics |= {
        "response_length/mean": sum(lengths) / len(lengths),
        "response_length/max": max(lengths),
        "response_length/clip_ratio": sum(t.status.is_truncated() for t in trajectories) / len(trajectories),
    }
    return metrics
