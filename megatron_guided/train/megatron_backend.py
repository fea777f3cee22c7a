"""MegatronBackend: the TrainBackend that drives Megatron-Core ranks (`worker.actor.strategy=megatron`).

The trainer process holds no model weights of its own here: every call is sent to the ranks of a
worker group (local processes, or Ray actors when scaled out), which run
:class:`megatron_guided.megatron.worker.MegatronWorker`. This class only merges their answers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from megatron_guided.config import ActorConfig, AlgorithmConfig
from megatron_guided.megatron.launcher import LocalWorkerGroup, WorkerGroup
from megatron_guided.megatron.layout import ParallelLayout
from megatron_guided.megatron.worker import WorkerSpec
from megatron_guided.train.batch import TrainBatch


class MegatronBackend:
    def __init__(self, *, model_path: str, actor: ActorConfig, algorithm: AlgorithmConfig, temperature: float,
                 num_mini_batches: int, total_optimizer_steps: int, max_response_length: int, seed: int = 1,
                 start_group: Callable[[WorkerSpec], WorkerGroup] | None = None):
        """`start_group(spec)` starts the ranks (`launch.ray_workers.RayWorkerGroup` under Ray); by default
        they are local processes (`LocalWorkerGroup`)."""
        self.actor, self.model_path = actor, model_path
        self.num_mini_batches = num_mini_batches
        self.needs_ref = algorithm.kl_coef > 0
        spec = WorkerSpec(model_path=model_path, actor=actor, algorithm=algorithm, temperature=temperature,
                          num_mini_batches=num_mini_batches, total_optimizer_steps=total_optimizer_steps,
                          max_response_length=max_response_length, seed=seed)
        if start_group is None:
            self.group = LocalWorkerGroup(spec, world_size=ParallelLayout.from_config(actor.megatron).world_size)
        else:
            self.group = start_group(spec)

    @property
    def recompute_old_logprobs(self) -> bool:
        """As TorchBackend: one epoch over one mini-batch needs no separate old-logprob forward."""
        return self.actor.ppo_epochs > 1 or self.num_mini_batches > 1

    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch, *, reference: bool = False) -> Tensor:
        """Per-token logprobs `[B, L-1]`, assembled from the data-parallel shards."""
        out = torch.zeros_like(batch.loss_mask)
        for part in self.group.call("compute_logprobs", batch, reference):
            if part is not None:
                out[part["rows"]] = part["logp"]
        return out

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        (metrics,) = [m for m in self.group.call("train_step", batch) if m is not None]
        return metrics

    def export_weights(self) -> Iterator[tuple[str, Tensor]]:
        """Full HF-named tensors, bucket by bucket, gathered across TP and PP by the ranks."""
        for bucket in self.group.call_stream("export_weights"):
            yield from bucket.items()

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, path: Path) -> None:
        """`dist_ckpt/` (model + optimizer, any-TP/PP resumable) and `huggingface/` (the policy)."""
        path = Path(path)
        self.group.call("save_checkpoint", str(path))
        hf_dir = path / "huggingface"
        hf_dir.mkdir(parents=True, exist_ok=True)
        save_file({name: t.contiguous() for name, t in self.export_weights()}, str(hf_dir / "model.safetensors"),
                  metadata={"format": "pt"})
        config = json.loads((Path(self.model_path) / "config.json").read_text())
        (hf_dir / "config.json").write_text(json.dumps(config, indent=2))

    def load_checkpoint(self, path: Path) -> None:
        self.group.call("load_checkpoint", str(path))

    def close(self) -> None:
        self.group.close()
