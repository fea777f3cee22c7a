"""Epoch-wise shuffled prompt order with an exact, checkpointable position."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(kw_only=True)
class PromptSampler:
    """Yields batches of dataset indices; epoch e uses the permutation seeded by (seed, e).
    A batch never spans two epochs: the tail of an epoch smaller than a batch is dropped."""

    num_items: int
    batch_size: int
    seed: int
    shuffle: bool = True
    epoch: int = 0
    position: int = 0

    def __post_init__(self) -> None:
        if self.num_items < self.batch_size:
            raise ValueError(f"{self.num_items} prompts cannot fill one batch of data.rollout_batch_size={self.batch_size}")

    @property
    def batches_per_epoch(self) -> int:
        return self.num_items // self.batch_size

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_items))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_items, generator=generator).tolist()

    def next_batch(self) -> list[int]:
        if self.position + self.batch_size > self.num_items:
            self.epoch, self.position = self.epoch + 1, 0
        batch = self._order(self.epoch)[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
