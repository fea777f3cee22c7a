"""`--verify`: the same prompts through the HF model (transformers) and the Megatron model (real
megatron-core ranks: local processes, gloo on CPU, NCCL on GPUs), logits compared in fp32.

The Megatron side loads the converted folder with `load_model_weights` (what `MegatronBackend`
does) at the layout asked for, which need not be the one it was written at. `LogitsWorker` can load
several models and layouts in turn in the same ranks (the parallel state is rebuilt per load), and
re-save what it loaded (a checkpoint written by these TP/PP ranks, as a training run writes one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from megatron_guided.megatron.layout import ParallelLayout
from megatron_guided.models.qwen2_5_vl import language_config


def prompts(vocab_size: int, *, count: int = 3, length: int = 12, seed: int = 0) -> Tensor:
    """A few fixed pseudo-random prompts (token ids) of equal length."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (count, length), generator=gen)


@torch.no_grad()
def hf_logits(hf_dir: str | Path, input_ids: Tensor) -> Tensor:
    from megatron_guided.models.vision import load_policy_model

    model = load_policy_model(hf_dir, dtype=torch.float32).eval()
    return model(input_ids=input_ids).logits.float()


class LogitsWorker:
    """One Megatron rank (built by `LocalWorkerGroup(worker_class=LogitsWorker)`)."""

    def __init__(self, spec=None):
        self.chunks: list[torch.nn.Module] = []

    def load(self, model_dir: str, layout: ParallelLayout, config_dir: str | None = None) -> None:
        """Build this rank's chunks at `layout` (fp32) for the config in `config_dir` (default
        `model_dir`) and load the weights of `model_dir/dist_ckpt`."""
        from megatron.core import parallel_state as ps
        from transformers import AutoConfig

        from megatron_guided.megatron import compat
        from megatron_guided.megatron.checkpoint import load_model_weights
        from megatron_guided.megatron.model import build_chunks, te_available, transformer_config

        ps.destroy_model_parallel()
        ps.initialize_model_parallel(layout.tp, layout.pp, layout.vpp)
        compat.seed_model_parallel_rng(0)
        self.hf_config = AutoConfig.from_pretrained(config_dir or model_dir)
        self.layout = layout
        config = transformer_config(self.hf_config, layout, params_dtype=torch.float32)
        self.chunks = build_chunks(self.hf_config, layout, config, use_te=te_available())
        if torch.cuda.is_available():
            self.chunks = [c.cuda() for c in self.chunks]
        load_model_weights(model_dir, self.chunks)

    @torch.no_grad()
    def logits(self, input_ids: Tensor) -> Tensor | None:
        """Full-vocabulary logits [B, S, vocab_size] (padding dropped) on the last stage's TP rank 0,
        None on the other ranks."""
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_guided.megatron.model import causal_mask, gather_tp

        device = next(self.chunks[0].parameters()).device
        ids = input_ids.to(device)
        length = ids.shape[1]
        for chunk in self.chunks:
            chunk.eval()

        positions = torch.arange(length, device=device)[None].expand_as(ids)
        if getattr(self.chunks[0].config, "mrope_section", None):  # m-RoPE: text positions on all 3 axes
            positions = positions[None].expand(3, -1, -1)

        def forward_step(data_iterator, model):
            next(data_iterator)
            output = model(input_ids=ids, position_ids=positions, attention_mask=causal_mask(length).to(device))
            return output, lambda out: (out.sum() * 0, {"logits": out})

        iterators = [iter([None]) for _ in self.chunks] if len(self.chunks) > 1 else iter([None])
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iterators, model=self.chunks, num_microbatches=1,
            seq_length=length, micro_batch_size=ids.shape[0], forward_only=True)
        if not ps.is_pipeline_last_stage():
            return None
        parts = gather_tp(outputs[0]["logits"].float(), ps.get_tensor_model_parallel_group())
        if ps.get_tensor_model_parallel_rank() != 0:
            return None
        return torch.cat(parts, dim=-1)[..., : language_config(self.hf_config).vocab_size].cpu()

    def save(self, path: str) -> None:
        """`dist_checkpointing.save` of the loaded model's sharded state dict at this layout (collective)."""
        from megatron.core import dist_checkpointing

        from megatron_guided.megatron.checkpoint import model_sharded_state_dict, sync_save_strategy

        if torch.distributed.get_rank() == 0:
            Path(path).mkdir(parents=True, exist_ok=True)
        torch.distributed.barrier()
        dist_checkpointing.save(model_sharded_state_dict(self.chunks), path, sharded_strategy=sync_save_strategy())


def start_ranks(world_size: int):
    from megatron_guided.megatron.launcher import LocalWorkerGroup

    return LocalWorkerGroup(None, world_size=world_size, worker_class=LogitsWorker)


def megatron_logits(group, model_dir: str | Path, layout: ParallelLayout, input_ids: Tensor, *,
                    config_dir: str | Path | None = None) -> Tensor:
    group.call("load", str(model_dir), layout, str(config_dir) if config_dir else None)
    return next(out for out in group.call("logits", input_ids) if out is not None)  # one per DP replica


@dataclass(frozen=True)
class VerifyResult:
    max_abs_diff: float
    per_prompt: list[float]
    tolerance: float
    layout: ParallelLayout

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def report(self) -> str:
        lay = self.layout
        return (f"verify (tp={lay.tp} pp={lay.pp}): max |logits_megatron - logits_hf| = {self.max_abs_diff:.3e} "
                f"(per prompt: {', '.join(f'{d:.2e}' for d in self.per_prompt)}); tolerance {self.tolerance:.1e}: "
                f"{'OK' if self.ok else 'FAILED'}")


def verify_logits(hf_dir: str | Path, megatron_dir: str | Path, layout: ParallelLayout, *,
                  tolerance: float) -> VerifyResult:
    """Both models on the same prompts (the Megatron one with the HF folder's config); the Megatron ranks
    (tp × pp processes) are started and stopped here."""
    from transformers import AutoConfig

    ids = prompts(language_config(AutoConfig.from_pretrained(str(hf_dir))).vocab_size)
    reference = hf_logits(hf_dir, ids)
    group = start_ranks(layout.tp * layout.pp)
    try:
        logits = megatron_logits(group, megatron_dir, layout, ids, config_dir=hf_dir)
    finally:
        group.close()
    diffs = (logits - reference).abs().amax(dim=(1, 2))
    return VerifyResult(max_abs_diff=float(diffs.max()), per_prompt=[float(d) for d in diffs], tolerance=tolerance,
                        layout=layout)
