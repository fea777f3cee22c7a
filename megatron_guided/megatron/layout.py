"""How a model is cut across ranks (TP × PP(×VPP) × CP × DP), and the checks that refuse a cut the
model or the machine cannot take, naming the `worker.actor.megatron.*` key to change."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_guided.config import LOSS_AVG_MODES, ConfigError, MegatronConfig
from megatron_guided.models.qwen2_5_vl import language_config


@dataclass(frozen=True, kw_only=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    cp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    make_vocab_size_divisible_by: int = 128

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @classmethod
    def from_config(cls, mg: MegatronConfig) -> ParallelLayout:
        return cls(tp=mg.tp, pp=mg.pp, vpp=mg.vpp or None, cp=mg.cp, dp=mg.dp,
                   sequence_parallel=mg.sequence_parallel,
                   make_vocab_size_divisible_by=mg.make_vocab_size_divisible_by)


def check_layout(hf_config, mg: MegatronConfig, *, gpu: bool, te: bool, loss_avg_mode: str = "token") -> None:
    """Model-dependent and machine-dependent checks of worker.actor.megatron.*."""
    key = "worker.actor.megatron"
    if mg.cp > 1 and LOSS_AVG_MODES[loss_avg_mode] != "token-mean":
        raise ConfigError(f"{key}.cp={mg.cp} splits each sequence over ranks, so per-sequence means are not "
                          f"local: use worker.actor.loss_avg_mode=token (not {loss_avg_mode!r})")
    hf_config = language_config(hf_config)
    heads, groups = hf_config.num_attention_heads, hf_config.num_key_value_heads
    if heads % mg.tp or groups % mg.tp:
        raise ConfigError(f"{key}.tp={mg.tp} must divide num_attention_heads={heads} and "
                          f"num_key_value_heads={groups} of the model")
    stages = mg.pp * (mg.vpp or 1)
    if hf_config.num_hidden_layers % stages:
        raise ConfigError(f"{key}.pp × vpp = {stages} must divide num_hidden_layers={hf_config.num_hidden_layers}")
    gpu_only = {"sequence_parallel": mg.sequence_parallel, "cp": mg.cp > 1, "fp8": bool(mg.fp8)}
    for name, wanted in gpu_only.items():
        if wanted and not (gpu and te):
            raise ConfigError(f"{key}.{name}={getattr(mg, name)!r} needs GPUs with Transformer Engine "
                              f"({'no GPU' if not gpu else 'transformer_engine not importable'} here); "
                              "unset it for CPU/gloo runs")
    if mg.sequence_parallel and mg.tp < 2:
        raise ConfigError(f"{key}.sequence_parallel needs tp >= 2")
