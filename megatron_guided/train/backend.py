"""The TrainBackend seam: what the trainer needs from whatever holds and updates the policy.

Implementations: :class:`~megatron_guided.train.torch_backend.TorchBackend` (a transformers model in
this process) and :class:`~megatron_guided.train.megatron_backend.MegatronBackend` (Megatron-Core ranks).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from torch import Tensor

from megatron_guided.train.batch import TrainBatch


class TrainBackend(Protocol):
    needs_ref: bool
    """Whether reference-policy logprobs (KL) are available and wanted."""

    @property
    def recompute_old_logprobs(self) -> bool:
        """Whether the behaviour policy differs from the one being updated (several epochs/mini-batches)."""

    def compute_logprobs(self, batch: TrainBatch, *, reference: bool = False) -> Tensor:
        """Per-token logprobs `[B, L-1]` (targets-aligned, see `train.batch`) at the rollout temperature."""

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """ppo_epochs × mini-batches optimizer steps; mean metrics (loss, grad_norm, lr, entropy, ...)."""

    def export_weights(self) -> Iterator[tuple[str, Tensor]]:
        """Full HF-named tensors, for the generation engine and HF export."""

    def save_checkpoint(self, folder: Path) -> None:
        """Write weights (`huggingface/`) and optimizer state into `folder` (the caller makes it atomic)."""

    def load_checkpoint(self, folder: Path) -> None:
        """Restore what `save_checkpoint` wrote."""

    def close(self) -> None:
        """Release workers and memory."""
