"""TorchBackend: GRPO updates on a transformers causal LM in this process (the CPU default).

Micro-batches are cut by token budget (longest first, padding trimmed per micro-batch). Losses
are normalised over the whole mini-batch, never per micro-batch, so the gradient does not
depend on how the mini-batch was split.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from megatron_guided.config import ActorConfig, AlgorithmConfig, OptimConfig
from megatron_guided.models.vision import MRoPE, is_vision_language, vision_forward_kwargs
from megatron_guided.train.batch import TrainBatch, split_by_token_budget
from megatron_guided.train.objective import STAT_NAMES, PolicyObjective, decays, lr_factor, mini_batch_counts


def token_logprobs(logits: Tensor, input_ids: Tensor, *, temperature: float) -> tuple[Tensor, Tensor]:
    """Logprob and entropy of each next token under softmax(logits / temperature).

    logits [B, L, V], input_ids [B, L] → (logp [B, L-1], entropy [B, L-1]), where
    logp[:, t] = log softmax(logits[:, t] / T)[input_ids[:, t+1]].
    """
    scaled = logits[:, :-1].float() / (temperature if temperature > 0 else 1.0)
    logp_all = F.log_softmax(scaled, dim=-1)
    logp = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))


class TorchBackend:
    """Trains `model` with the configured policy loss; also holds the frozen reference model."""

    def __init__(self, model: torch.nn.Module, *, actor: ActorConfig, algorithm: AlgorithmConfig,
                 temperature: float, num_mini_batches: int, total_optimizer_steps: int,
                 max_response_length: int):
        self.model = model
        # transformers builds the input embedding with padding_idx=pad_token_id, which freezes that row's
        # lookup gradient. In a trajectory the pad token can be a real token (Qwen's pad is <|endoftext|>);
        # padded positions never reach a loss anyway (right padding, causal). Train it like any token, as
        # Megatron does: the two backends then give the same update.
        embeddings = model.get_input_embeddings()
        if getattr(embeddings, "padding_idx", None) is not None:
            embeddings.padding_idx = None
        self.actor, self.algorithm = actor, algorithm
        self.temperature = temperature
        self.num_mini_batches = num_mini_batches
        self.max_response_length = max_response_length
        self.objective = PolicyObjective(actor, algorithm, max_response_length=max_response_length)
        self.mrope = MRoPE(model) if is_vision_language(model.config) else None
        self.needs_ref = algorithm.kl_coef > 0
        self.ref_model = copy.deepcopy(model).eval().requires_grad_(False) if self.needs_ref else None
        if actor.model.enable_gradient_checkpointing:
            model.gradient_checkpointing_enable()
        params = list(model.named_parameters())
        groups = [{"params": [p for n, p in params if decays(n, p)], "weight_decay": actor.optim.weight_decay},
                  {"params": [p for n, p in params if not decays(n, p)], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=actor.optim.lr, betas=tuple(actor.optim.betas))
        self.scheduler = build_scheduler(self.optimizer, actor.optim, total_optimizer_steps)

    # -- forward passes -------------------------------------------------------------------
    @property
    def packed(self) -> bool:
        """Padding-free micro-batches: only with a varlen attention kernel. With eager/sdpa a packed
        row would attend over its whole length (a block-diagonal mask), costing more than padding.
        Vision-language models always use padded rows (their 3-D positions are computed per row)."""
        return self.actor.padding_free and self.actor.model.attn_implementation.startswith("flash_attention")

    def _forward(self, model: torch.nn.Module, mb: TrainBatch, *, packed: bool | None = None) -> tuple[Tensor, Tensor]:
        extra = {}
        if self.mrope is not None:  # m-RoPE positions over each whole row, the rows' images
            vision = mb.vision if mb.vision is not None else (None,) * mb.size
            extra = vision_forward_kwargs(self.mrope, mb.input_ids, mb.attention_mask, vision)
        elif self.packed if packed is None else packed:
            return self._forward_packed(model, mb)
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False, **extra).logits
        return token_logprobs(logits, mb.input_ids, temperature=self.temperature)

    def _forward_packed(self, model: torch.nn.Module, mb: TrainBatch) -> tuple[Tensor, Tensor]:
        """All rows concatenated into one; position ids restart at 0 per sequence, which transformers
        turns into varlen attention (flash-attention) or a block-diagonal mask (eager/sdpa)."""
        lens = mb.seq_lens.tolist()
        rows = [mb.input_ids[i, :n] for i, n in enumerate(lens)]
        input_ids = torch.cat(rows)[None]  # [1, sum(lens)]
        position_ids = torch.cat([torch.arange(n) for n in lens])[None]
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits[0]
        logp = torch.zeros(mb.loss_mask.shape, dtype=torch.float32)
        entropy = torch.zeros_like(logp)
        start = 0
        for i, n in enumerate(lens):  # logits of sequence i predict its own next tokens only
            lp, ent = token_logprobs(logits[None, start : start + n], rows[i][None], temperature=self.temperature)
            logp[i, : n - 1], entropy[i, : n - 1] = lp[0], ent[0]
            start += n
        return logp, entropy

    def _micro_batches(self, batch: TrainBatch, *, for_update: bool) -> list[list[int]]:
        max_rows = (self.actor.micro_batch_size_per_device_for_update if for_update
                    else self.actor.micro_batch_size_per_device_for_experience)
        return split_by_token_budget(batch.seq_lens.tolist(), max_tokens=self.actor.max_token_len_per_micro_batch,
                                     max_rows=max_rows)

    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch, *, reference: bool = False) -> Tensor:
        """Per-token logprobs `[B, L-1]` of the current (or the reference) policy."""
        model = self.ref_model if reference else self.model
        out = torch.zeros_like(batch.loss_mask)
        for rows in self._micro_batches(batch, for_update=False):
            mb = batch.select(rows)
            logp, _ = self._forward(model, mb)
            out[torch.as_tensor(rows), : logp.shape[1]] = logp
        return out

    @property
    def recompute_old_logprobs(self) -> bool:
        """With one epoch over one mini-batch the behaviour policy is the current one: the loss uses
        detached current logprobs and no extra forward runs."""
        return self.actor.ppo_epochs > 1 or self.num_mini_batches > 1

    # -- update ---------------------------------------------------------------------------
    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """ppo_epochs × mini-batches optimizer steps over `batch`; returns mean metrics."""
        self.model.train()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}

        def record(name: str, value: float) -> None:
            sums[name] = sums.get(name, 0.0) + value
            counts[name] = counts.get(name, 0) + 1

        rows = torch.arange(batch.size)
        for _ in range(self.actor.ppo_epochs):
            for mini_rows in torch.tensor_split(rows, self.num_mini_batches):
                if len(mini_rows) == 0:
                    continue
                for name, value in self._optimizer_step(batch.select(mini_rows, trim=False)).items():
                    record(name, value)
        self.model.eval()
        return {name: sums[name] / counts[name] for name in sums}

    def _optimizer_step(self, mini: TrainBatch) -> dict[str, float]:
        global_tokens, global_seqs = mini_batch_counts(mini)
        stats = dict.fromkeys(STAT_NAMES, 0.0)
        self.optimizer.zero_grad(set_to_none=True)
        for rows in self._micro_batches(mini, for_update=True):
            mb = mini.select(rows)
            logp, entropy = self._forward(self.model, mb)
            loss, mb_stats = self.objective(logp, entropy, mb, global_tokens=global_tokens, global_seqs=global_seqs)
            loss.backward()
            for name, value in mb_stats.items():
                stats[name] += value
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.actor.max_grad_norm)
        if torch.isfinite(grad_norm):
            self.optimizer.step()
        stats["grad_norm"] = float(grad_norm)
        stats["lr"] = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return stats

    # -- weights and state ----------------------------------------------------------------
    def export_weights(self) -> Iterator[tuple[str, Tensor]]:
        """HF-named tensors for the generation engine (tied weights appear once)."""
        yield from self.model.state_dict().items()

    def save_checkpoint(self, folder: Path) -> None:
        """`huggingface/` (the policy) and `optimizer.pt` (optimizer + scheduler) under `folder`."""
        self.model.save_pretrained(folder / "huggingface", safe_serialization=True)
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   folder / "optimizer.pt")

    def close(self) -> None:
        pass

    def load_checkpoint(self, folder: Path) -> None:
        weights = load_file(str(folder / "huggingface" / "model.safetensors"))
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise RuntimeError(f"checkpoint {folder} does not match the model: missing {missing}, "
                               f"unexpected {unexpected}")
        state = torch.load(folder / "optimizer.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
