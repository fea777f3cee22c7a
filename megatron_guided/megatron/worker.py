"""One Megatron-Core rank of the policy: its model chunks, DDP, optimizer and the GRPO update.

Every rank of the world (TP × PP × CP × DP) runs one `MegatronWorker` and receives the *same* calls
with the same whole batch; each takes its data-parallel share of the rows, cuts it into micro-batches
by token budget, and runs Megatron's forward/backward schedule (1F1B, interleaved with VPP). Results
(log-probs, metrics, weights) come back from the ranks that hold them; the driver side
(:mod:`megatron_guided.train.megatron_backend`) knows which.

Loss scaling. Megatron's schedule divides each micro-batch loss by the number of micro-batches M and
DDP averages gradients over the DP ranks. The objective is already normalised over the whole
mini-batch (`PolicyObjective`), so the loss handed to the schedule is `loss · M · DP`: the resulting
gradient is Σ over all micro-batches on all ranks of ∇loss, exactly TorchBackend's.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from megatron_guided.config import ActorConfig, AlgorithmConfig
from megatron_guided.megatron import compat
from megatron_guided.megatron.checkpoint import (is_megatron_model_dir, load_model_weights, load_training_state,
                                                 save_training_state)
from megatron_guided.megatron.layout import ParallelLayout, check_layout
from megatron_guided.megatron.packing import (context_parallel_index, pack_rows, position_aligned, round_up,
                                              unpack)
from megatron_guided.megatron.model import (build_chunks, causal_mask, iter_hf_weights, load_hf_weights,
                                            te_available, transformer_config)
from megatron_guided.megatron.vision import vision_decoder_input
from megatron_guided.megatron.vocab_parallel import vocab_parallel_logprobs
from megatron_guided.models.qwen2_5_vl import language_config
from megatron_guided.models.vision import MRoPE, is_vision_language
from megatron_guided.train.batch import TrainBatch, split_by_token_budget
from megatron_guided.train.objective import STAT_NAMES, PolicyObjective, lr_factor, mini_batch_counts

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class WorkerSpec:
    """Everything a rank needs to build its share of the policy (picklable)."""

    model_path: str
    actor: ActorConfig
    algorithm: AlgorithmConfig
    temperature: float
    num_mini_batches: int
    total_optimizer_steps: int
    max_response_length: int
    seed: int = 1


def pad_micro_batch(mb: TrainBatch, *, rows: int, length: int) -> TrainBatch:
    """`mb` grown to `rows` × `length`: extra rows repeat row 0 and extra columns are padding, all with
    loss mask 0, so they change no loss and no gradient."""
    extra_rows, extra_cols = rows - mb.size, length - mb.input_ids.shape[1]
    fields = {}
    for f in dataclasses.fields(mb):
        value = getattr(mb, f.name)
        if value is None:
            fields[f.name] = None
            continue
        if f.name == "vision":
            fields[f.name] = value + value[:1] * extra_rows
            continue
        value = torch.cat([value, value[:1].expand(extra_rows, -1)]) if extra_rows else value
        fields[f.name] = torch.nn.functional.pad(value, (0, extra_cols)) if extra_cols else value
    padded = TrainBatch(**fields)
    padded.loss_mask[mb.size:] = 0
    return padded


class MegatronWorker:
    """Call only after `torch.distributed` is initialised (one process per rank)."""

    def __init__(self, spec: WorkerSpec):
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from transformers import AutoConfig

        self.spec, actor, mg = spec, spec.actor, spec.actor.megatron
        self.layout = ParallelLayout.from_config(mg)
        self.hf_config = AutoConfig.from_pretrained(spec.model_path)
        self.gpu, self.use_te = torch.cuda.is_available(), te_available()
        check_layout(self.hf_config, mg, gpu=self.gpu, te=self.use_te, loss_avg_mode=actor.loss_avg_mode)
        if torch.distributed.get_world_size() != self.layout.world_size:
            raise RuntimeError(f"world size {torch.distributed.get_world_size()} != tp·pp·cp·dp = {self.layout.world_size}")
        ps.initialize_model_parallel(self.layout.tp, self.layout.pp, self.layout.vpp,
                                     context_parallel_size=self.layout.cp)
        if self.gpu:
            tensor_parallel.model_parallel_cuda_manual_seed(spec.seed)
        else:
            compat.seed_model_parallel_rng(spec.seed)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.gpu else torch.device("cpu")
        dtype = getattr(torch, actor.model.dtype)
        self.config = transformer_config(self.hf_config, self.layout, fp8=mg.fp8 or None, fp8_recipe=mg.fp8_recipe,
                                         recompute=mg.recompute or None, params_dtype=dtype)
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        chunks = self._load_chunks()
        self.ref_chunks = None
        if spec.algorithm.kl_coef > 0:  # frozen copy: no grads, no optimizer state
            self.ref_chunks = [c.eval().requires_grad_(False) for c in self._load_chunks()]
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=mg.use_distributed_optimizer)
        self.model = [DistributedDataParallel(config=self.config, ddp_config=ddp_config, module=c) for c in chunks]
        optim = actor.optim
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=optim.lr, min_lr=optim.lr * optim.min_lr_ratio,
                            weight_decay=optim.weight_decay, adam_beta1=optim.betas[0], adam_beta2=optim.betas[1],
                            clip_grad=actor.max_grad_norm, use_distributed_optimizer=mg.use_distributed_optimizer,
                            bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, params_dtype=dtype),
            self.model)
        self.config.grad_scale_func = self.optimizer.scale_loss
        self.config.finalize_model_grads_func = finalize_model_grads
        self.objective = PolicyObjective(actor, spec.algorithm, max_response_length=spec.max_response_length)
        self.optimizer_steps = 0
        self.vocab_per_rank = chunks[-1].vocab_size // self.layout.tp
        self.vocab_size = language_config(self.hf_config).vocab_size
        self.input_layout = self._input_layout()
        self.mrope = MRoPE.from_config(self.hf_config) if is_vision_language(self.hf_config) else None
        if self.mrope is not None and self.input_layout != "padded":
            raise NotImplementedError(f"vision-language policies run with padded micro-batches only (input layout "
                                      f"{self.input_layout!r}: unset worker.actor.padding_free and megatron.cp)")
        # FP8 GEMMs want token counts in multiples of 16; sequence parallelism splits tokens over TP
        self.pad_multiple = math.lcm(16 if mg.fp8 else 1, self.layout.tp if mg.sequence_parallel else 1)

    def _input_layout(self) -> str:
        """thd: packed sequences (TE attention takes cu_seqlens); cp: context-parallel shares of padded rows;
        padded: the local attention (CPU), or VPP (one micro-batch shape)."""
        if self.layout.cp > 1:
            return "cp"
        if self.use_te and self.spec.actor.padding_free and not self.layout.vpp:
            return "thd"
        return "padded"

    def _load_chunks(self) -> list[torch.nn.Module]:
        chunks = build_chunks(self.hf_config, self.layout, self.config, use_te=self.use_te)
        if self.gpu:
            chunks = [c.cuda() for c in chunks]
        if is_megatron_model_dir(self.spec.model_path):
            load_model_weights(self.spec.model_path, chunks)
        else:
            load_hf_weights(chunks, self.spec.model_path, self.hf_config, self.layout, tp_rank=self.tp_rank,
                            use_te=self.use_te)
        return chunks

    # -- who holds what --------------------------------------------------------------------
    def role(self) -> dict[str, int | bool]:
        from megatron.core import parallel_state as ps

        return {"tp": self.tp_rank, "pp": ps.get_pipeline_model_parallel_rank(),
                "dp": ps.get_data_parallel_rank(), "last_stage": ps.is_pipeline_last_stage()}

    def _dp_rows(self, batch: TrainBatch) -> list[int]:
        """This DP rank's rows: lengths sorted, dealt round-robin so ranks get similar token counts."""
        from megatron.core import parallel_state as ps

        order = sorted(range(batch.size), key=lambda i: -int(batch.seq_lens[i]))
        return order[ps.get_data_parallel_rank()::ps.get_data_parallel_world_size()]

    def _micro_batches(self, batch: TrainBatch, rows: list[int], *, for_update: bool) -> list[list[int]]:
        actor = self.spec.actor
        budget = actor.megatron.max_tokens_per_micro_batch or actor.max_token_len_per_micro_batch
        max_rows = (actor.micro_batch_size_per_device_for_update if for_update
                    else actor.micro_batch_size_per_device_for_experience)
        lengths = [int(batch.seq_lens[r]) for r in rows]
        groups = [[rows[i] for i in group] for group in split_by_token_budget(lengths, max_tokens=budget,
                                                                               max_rows=max_rows)]
        return self._fit_interleaved_schedule(groups)

    def _fit_interleaved_schedule(self, groups: list[list[int]]) -> list[list[int]]:
        """The interleaved (VPP) schedule runs micro-batches in groups of pp: it needs their number to be
        a multiple of pp. Split the largest micro-batches until it is; where single rows are left, repeat
        one as a masked-out filler (`_select` zeroes its loss mask; its logprobs are dropped)."""
        pp = self.layout.pp
        if not self.layout.vpp or len(groups) % pp == 0:
            return groups
        groups = sorted(groups, key=len, reverse=True)
        while len(groups) % pp and len(groups[0]) > 1:
            largest = groups.pop(0)
            groups += [largest[: len(largest) // 2], largest[len(largest) // 2:]]
            groups.sort(key=len, reverse=True)
        while len(groups) % pp:
            groups.append([-1 - groups[-1][0]])  # filler: row r encoded as -1 - r
        return groups

    @staticmethod
    def _select(batch: TrainBatch, group: list[int]) -> TrainBatch:
        if group[0] >= 0:
            return batch.select(group)
        filler = batch.select([-1 - group[0]])
        filler.loss_mask = torch.zeros_like(filler.loss_mask)
        return filler

    # -- the schedule ----------------------------------------------------------------------
    def _vocab_logprobs(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        from megatron.core import parallel_state as ps

        return vocab_parallel_logprobs(logits, targets.to(logits.device), temperature=self.spec.temperature,
                                       vocab_start=self.tp_rank * self.vocab_per_rank,
                                       vocab_size=self.vocab_size,
                                       group=ps.get_tensor_model_parallel_group())

    def _model_inputs(self, mb: TrainBatch) -> tuple[dict[str, Any], Any]:
        """The GPTModel inputs of one micro-batch in this run's input layout, and a function mapping the
        last stage's logits to (logp, entropy, the TrainBatch they align with):

        - padded: `[B, L]` rows with an explicit causal mask (CPU / local attention);
        - thd: rows packed into one THD sequence with `cu_seqlens` (TE attention, no padding computed);
        - cp: the load-balanced context-parallel share of each padded row (TE attention); logp and the
          returned batch are this rank's positions only, position-aligned (see packing.py)."""
        ids = mb.input_ids.to(self.device)
        if self.input_layout == "thd":
            packed = pack_rows(mb.input_ids, mb.seq_lens, multiple=self.pad_multiple)
            inputs = {"input_ids": packed.input_ids.to(self.device), "position_ids": packed.position_ids.to(self.device),
                      "attention_mask": None, "packed_seq_params": packed.packed_seq_params(self.device)}

            def outputs(logits: Tensor):
                logp, entropy = self._vocab_logprobs(logits[0], packed.targets[0])
                shape = tuple(mb.loss_mask.shape)
                return unpack(logp, packed, shape), unpack(entropy, packed, shape), mb
            return inputs, outputs
        if self.input_layout == "cp":
            from megatron.core import parallel_state as ps

            length = round_up(ids.shape[1], 2 * self.layout.cp * self.pad_multiple)
            keep = context_parallel_index(length, rank=ps.get_context_parallel_rank(), size=self.layout.cp)
            padded = torch.nn.functional.pad(mb.input_ids, (0, length - ids.shape[1]))
            inputs = {"input_ids": padded[:, keep].to(self.device), "position_ids": keep[None].expand(mb.size, -1).to(self.device),
                      "attention_mask": None}
            local = TrainBatch(**{f.name: None if getattr(mb, f.name) is None else
                                  (position_aligned(getattr(mb, f.name), length)[:, keep]).to(self.device)
                                  for f in dataclasses.fields(mb)})
            targets = position_aligned(mb.input_ids[:, 1:], length)[:, keep]

            def outputs(logits: Tensor):
                logp, entropy = self._vocab_logprobs(logits, targets)
                return logp, entropy, local
            return inputs, outputs
        length = ids.shape[1]
        inputs = {"input_ids": ids, "position_ids": torch.arange(length, device=self.device)[None].expand_as(ids),
                  "attention_mask": causal_mask(length).to(self.device)}

        def outputs(logits: Tensor):
            logp, entropy = self._vocab_logprobs(logits[:, :-1], mb.input_ids[:, 1:])
            return logp, entropy, mb.to(logits.device)
        return inputs, outputs

    def _vision_inputs(self, chunk: torch.nn.Module, mb: TrainBatch) -> dict[str, Tensor]:
        """m-RoPE positions [3, B, L] over each whole row (every stage), and on the stage holding the
        vision tower the decoder input with the image tokens' vision embeddings."""
        vision = mb.vision if mb.vision is not None else (None,) * mb.size
        ids = mb.input_ids.to(self.device)
        out = {"position_ids": self.mrope.batch_positions(mb.input_ids, mb.seq_lens.tolist(), vision).to(self.device)}
        if hasattr(chunk, "vision_model"):
            out["decoder_input"] = vision_decoder_input(chunk, ids, vision, image_token_id=self.mrope.image_token_id)
        return out

    def _run_schedule(self, chunks: list[torch.nn.Module], micro: list[TrainBatch], loss_fn, *,
                      forward_only: bool) -> list[Any]:
        """`loss_fn(logp, entropy, aligned_batch)` runs on the last stage for each micro-batch."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            inputs, outputs = self._model_inputs(mb)
            if self.mrope is not None:
                inputs |= self._vision_inputs(getattr(model, "module", model), mb)
            return model(**inputs), lambda logits: loss_fn(*outputs(logits))

        if self.layout.vpp:  # the interleaved schedule needs one tensor shape for all micro-batches
            rows, length = max(mb.size for mb in micro), max(mb.input_ids.shape[1] for mb in micro)
            micro = [pad_micro_batch(mb, rows=rows, length=length) for mb in micro]
        iterators = [iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro)
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iterators, model=chunks, num_microbatches=len(micro),
            seq_length=max(mb.input_ids.shape[1] for mb in micro), micro_batch_size=max(mb.size for mb in micro),
            forward_only=forward_only)

    # -- the TrainBackend calls ------------------------------------------------------------
    def _gather_context_parallel(self, local: Tensor, length: int) -> Tensor:
        """[B, length / cp] shares of every CP rank → [B, length] in sequence order."""
        from megatron.core import parallel_state as ps

        shares = [torch.empty_like(local) for _ in range(self.layout.cp)]
        torch.distributed.all_gather(shares, local.contiguous(), group=ps.get_context_parallel_group())
        full = local.new_zeros(local.shape[0], length)
        for rank, share in enumerate(shares):
            full[:, context_parallel_index(length, rank=rank, size=self.layout.cp)] = share
        return full

    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch, reference: bool = False) -> dict[str, Tensor] | None:
        """{rows, logp} for this DP rank's rows, on the last stage's TP rank 0; None elsewhere."""
        chunks = self.ref_chunks if reference else self.model
        for chunk in chunks:
            chunk.eval()
        groups = self._micro_batches(batch, self._dp_rows(batch), for_update=False)
        micro = [self._select(batch, g) for g in groups]

        def loss_fn(logp: Tensor, entropy: Tensor, aligned: TrainBatch):
            if self.input_layout == "cp":  # every CP rank holds a share of the positions: gather them
                logp = self._gather_context_parallel(logp, aligned.input_ids.shape[1] * self.layout.cp)
            return logp.sum() * 0, {"logp": logp[:, : aligned.loss_mask.shape[1]].cpu()}

        outputs = self._run_schedule(chunks, micro, loss_fn, forward_only=True)
        if not outputs or self.tp_rank != 0:
            return None
        out = torch.zeros(batch.size, batch.loss_mask.shape[1])
        groups, outputs = zip(*[(g, o) for g, o in zip(groups, outputs) if g[0] >= 0])  # drop fillers
        for rows, result in zip(groups, outputs):
            logp = result["logp"][: len(rows)]  # (VPP pads micro-batches with masked rows)
            out[torch.as_tensor(rows), : logp.shape[1]] = logp
        rows = [r for g in groups for r in g]
        return {"rows": torch.as_tensor(rows), "logp": out[torch.as_tensor(rows)]}

    def train_step(self, batch: TrainBatch) -> dict[str, float] | None:
        """ppo_epochs × mini-batches optimizer steps; mean metrics on the last stage's TP rank 0
        of DP rank 0 (None elsewhere)."""
        from megatron.core import parallel_state as ps

        for chunk in self.model:
            chunk.train()
        history: list[dict[str, float]] = []
        rows = torch.arange(batch.size)
        for _ in range(self.spec.actor.ppo_epochs):
            for mini_rows in torch.tensor_split(rows, self.spec.num_mini_batches):
                if len(mini_rows):
                    history.append(self._optimizer_step(batch.select(mini_rows, trim=False)))
        for chunk in self.model:
            chunk.eval()
        if not (ps.is_pipeline_last_stage() and self.tp_rank == 0 and ps.get_data_parallel_rank() == 0):
            return None
        return {name: sum(h[name] for h in history) / len(history) for name in history[0]}

    def _set_lr(self) -> float:
        """The schedule of `lr_factor` (shared with TorchBackend), with Megatron's per-group
        lr_mult / wd_mult (no weight decay on biases and norms)."""
        optim = self.spec.actor.optim
        lr = optim.lr * lr_factor(self.optimizer_steps, optim, self.spec.total_optimizer_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = optim.weight_decay * group.get("wd_mult", 1.0)
        return lr

    def _optimizer_step(self, mini: TrainBatch) -> dict[str, float]:
        from megatron.core import parallel_state as ps

        global_tokens, global_seqs = mini_batch_counts(mini)
        groups = self._micro_batches(mini, self._dp_rows(mini), for_update=True)
        micro = [self._select(mini, g) for g in groups]
        scale = len(micro) * ps.get_data_parallel_world_size()
        stats = dict.fromkeys(STAT_NAMES, 0.0)

        def loss_fn(logp: Tensor, entropy: Tensor, aligned: TrainBatch):
            loss, mb_stats = self.objective(logp, entropy.detach(), aligned, global_tokens=global_tokens,
                                            global_seqs=global_seqs)
            for name, value in mb_stats.items():
                stats[name] += value
            return loss * scale, {}

        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        lr = self._set_lr()
        self._run_schedule(self.model, micro, loss_fn, forward_only=False)
        _, grad_norm, _ = self.optimizer.step()
        self.optimizer_steps += 1
        if ps.is_pipeline_last_stage() and ps.get_data_parallel_world_size(with_context_parallel=True) > 1:
            summed = torch.tensor([stats[n] for n in STAT_NAMES], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(summed, group=ps.get_data_parallel_group(with_context_parallel=True))
            stats = dict(zip(STAT_NAMES, summed.tolist()))
        return {**stats, "grad_norm": float(grad_norm if grad_norm is not None else float("nan")), "lr": lr}

    def export_weights(self) -> Iterator[dict[str, Tensor]]:
        """Buckets of full HF-named tensors on the first stage's TP rank 0 (collective)."""
        chunks = [c.module for c in self.model]
        for bucket in iter_hf_weights(chunks, self.hf_config, self.layout, use_te=self.use_te):
            yield {name: t.cpu() for name, t in bucket.items()}

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, path: str) -> None:
        save_training_state(Path(path), [c.module for c in self.model], self.optimizer,
                            {"optimizer_steps": self.optimizer_steps}, layout=self.layout,
                            distributed_optimizer=self.spec.actor.megatron.use_distributed_optimizer)

    def load_checkpoint(self, path: str) -> None:
        extra = load_training_state(Path(path), [c.module for c in self.model], self.optimizer,
                                    layout=self.layout, distributed_optimizer=self.spec.actor.megatron.use_distributed_optimizer)
        self.optimizer_steps = int(extra["optimizer_steps"])
