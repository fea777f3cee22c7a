"""Per-GPU memory of a run: the Megatron trainer ranks and the generation engines, from the config.

Notation: P parameters on the most loaded rank, b bytes per element of worker.actor.model.dtype,
h hidden, q = heads·head_dim, k = 2·kv_heads·head_dim (K and V), f ffn, a heads, V padded vocabulary,
t/p/c/d = tp/pp/cp/dp, T tokens of one micro-batch on one rank (token budget / c), s sequence length.

Trainer, resident (the Megatron optimizer as `megatron/worker.py` builds it):
    weights      P·b
    grads        P·4                        (DDP grad buffer, grad_reduce_in_fp32=True)
    optimizer    P·(4·[b≠4] + 8) / (d·c)    (fp32 main copy when training in 16 bit, Adam m and v;
                                             sharded over DP×CP by the distributed optimizer, else /1)
    reference    P·b                        (frozen copy, only with a KL term)
Trainer, activations saved for backward per layer and token (no dropout: Qwen2 has none), with the
Transformer Engine spec of GPUs (fused norms, flash attention on un-repeated K/V, fused SwiGLU):
    none         b·[4h/σ + (2q + k + 3f)/t]
                 4h: inputs of both norms and of both input projections; 2q + k: Q, K, V and the attention
                 output; 3f: SwiGLU's gate and up outputs and its product; σ = t with sequence parallel, else 1
    with the local spec of CPU ranks (measured on one, tests/launch/test_memory_plan.py): unfused norms
    keep their input, the normalised input and the linear's input (6h), K and V are repeated to every
    query head (4q), SwiGLU keeps five f-wide tensors (5f), and eager attention its softmax (a·s/t):
                 b·[6h/σ + (4q + 5f + a·s)/t]
    selective    the same without the softmax term (core attention is recomputed)
    full         b·h/σ (each layer's input) + one layer's `none` activations while it is recomputed
  × layers on the rank, × in-flight micro-batches on the first stage: min(p, M) for 1F1B, times
  (1 + (p-1)/(p·vpp)) interleaved; the last stage adds the logits: T·V/t·(b + 8) (the logits, and the
  fp32 log-softmax and its gradient of the vocab-parallel log-probs).

Engines (SGLang, weights in bf16): weights = params·2 / tp_e; KV cache per token and GPU =
2·layers·max(1, kv_heads / tp_e)·head_dim·2 (KV heads are replicated when tp_e > kv_heads). A separate engine
gets memory_fraction of its GPU; colocated engines get what the trainer's resident state leaves (the
trainer's activations and the engines' memory take turns: the engines release theirs for the update).

The weights/grads/optimizer terms equal Megatron-LM's `compute_weight_and_optimizer_memory` (18 bytes
per parameter, 6 + 12/d with the distributed optimizer, in bf16) on the same parameter count; the
activation terms follow Korthikanti et al. 2022 (arXiv:2205.05198, Table 2), re-derived for GQA, SwiGLU
and no dropout, and are checked against the tensors a CPU rank actually saves (tests/launch).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from megatron_guided.config import ClusterConfig, Config, ConfigError, EnginePlacementConfig
from megatron_guided.megatron.model import padded_vocab_size

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ENGINE_BYTES = 2  # SGLang serves bf16

KNOWN_MODELS: dict[str, dict] = {
    # config.json fields of public checkpoints, for planning clusters without the weights at hand
    "Qwen2.5-7B-Instruct": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                                num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                                tie_word_embeddings=False, model_type="qwen2"),
    "Qwen2.5-32B-Instruct": dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40,
                                 num_key_value_heads=8, intermediate_size=27648, vocab_size=152064,
                                 tie_word_embeddings=False, model_type="qwen2"),
    "Qwen2.5-72B-Instruct": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                                 num_key_value_heads=8, intermediate_size=29568, vocab_size=152064,
                                 tie_word_embeddings=False, model_type="qwen2"),
}
for _size in ("7B", "32B", "72B"):
    KNOWN_MODELS[f"Qwen2.5-{_size}"] = KNOWN_MODELS[f"Qwen2.5-{_size}-Instruct"]


@dataclass(frozen=True, kw_only=True)
class Arch:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def from_hf(cls, c: dict) -> Arch:
        return cls(hidden=c["hidden_size"], layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
                   kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                   head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
                   ffn=c["intermediate_size"], vocab=c["vocab_size"], tied=c.get("tie_word_embeddings", False),
                   qkv_bias=c.get("model_type") == "qwen2")

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def k(self) -> int:
        return 2 * self.kv_heads * self.head_dim

    def layer_params(self) -> tuple[int, int]:
        """(TP-sharded, replicated) parameters of one layer."""
        h = self.hidden
        attention = h * (self.q + self.k) + (self.q + self.k) * self.qkv_bias + self.q * h
        return attention + 3 * h * self.ffn, 2 * h

    def total_params(self) -> int:
        sharded, replicated = self.layer_params()
        return self.layers * (sharded + replicated) + self.hidden + self.vocab * self.hidden * (1 if self.tied else 2)


def load_arch(path: str, key: str) -> Arch:
    """`path`/config.json, or a known public model named like the path's last part."""
    config = Path(path) / "config.json"
    if config.is_file():
        return Arch.from_hf(json.loads(config.read_text()))
    name = Path(path).name
    if name in KNOWN_MODELS:
        return Arch.from_hf(KNOWN_MODELS[name])
    raise ConfigError(f"{key}={path!r}: no config.json there and not a known model ({sorted(KNOWN_MODELS)}); "
                      "point it at a folder holding the model's config.json")


@dataclass(frozen=True, kw_only=True)
class TrainerMemory:
    params: int
    """Parameters on the most loaded rank."""
    weights: float
    grads: float
    optimizer: float
    reference: float
    activations: float
    """Peak activations of the most loaded stage, at the configured recompute."""
    activations_by_recompute: dict[str, float]

    @property
    def resident(self) -> float:
        return self.weights + self.grads + self.optimizer + self.reference

    @property
    def peak(self) -> float:
        return self.resident + self.activations


def activation_bytes_per_token_layer(arch: Arch, *, tp: int, sequence_parallel: bool, seq_len: int,
                                     dtype_bytes: int, recompute: str, fused: bool) -> float:
    """Bytes one layer keeps for backward per token of a micro-batch (formulas in the module docstring);
    `fused`: the Transformer Engine spec (GPUs), else the local spec (CPU)."""
    sigma = tp if sequence_parallel else 1
    if fused:
        none = dtype_bytes * (4 * arch.hidden / sigma + (2 * arch.q + arch.k + 3 * arch.ffn) / tp)
        scores = 0.0
    else:
        none = dtype_bytes * (6 * arch.hidden / sigma + (4 * arch.q + 5 * arch.ffn) / tp)
        scores = dtype_bytes * arch.heads * seq_len / tp
    if recompute == "selective":
        return none
    if recompute == "full":
        return dtype_bytes * arch.hidden / sigma
    return none + scores


def trainer_memory(cfg: Config, arch: Arch, *, fused: bool) -> TrainerMemory:
    actor, mg = cfg.worker.actor, cfg.worker.actor.megatron
    b = DTYPE_BYTES[actor.model.dtype]
    tp, pp, cp, dp = mg.tp, mg.pp, mg.cp, mg.dp
    vocab = padded_vocab_size(arch.vocab, divisible_by=mg.make_vocab_size_divisible_by, tp=tp)
    sharded, replicated = arch.layer_params()
    layers = arch.layers // pp
    on_layers = layers * (sharded // tp + replicated)
    embedding = vocab * arch.hidden // tp
    output = 0 if arch.tied and pp == 1 else embedding  # tied, pp > 1: the last stage holds its own copy
    last = on_layers + arch.hidden + output  # + the final norm
    params = on_layers + embedding + arch.hidden + output if pp == 1 else max(on_layers + embedding, last)
    optimizer_per_param = (4 * (b != 4) + 8) / ((dp * cp) if mg.use_distributed_optimizer else 1)

    seq_len = cfg.data.max_prompt_length + max(cfg.data.max_response_length,
                                               cfg.worker.rollout.verifier.max_trajectory_tokens
                                               if cfg.worker.rollout.verifier.enable else 0)
    tokens = (mg.max_tokens_per_micro_batch or actor.max_token_len_per_micro_batch) / cp
    samples = actor.global_batch_size * cfg.worker.rollout.n  # one optimizer step's rows, padded to seq_len
    micro_batches = math.ceil(samples * seq_len / dp / (tokens * cp))
    in_flight = min(pp, micro_batches) if not mg.vpp else pp * (1 + (pp - 1) / (pp * mg.vpp))
    by_recompute = {}
    for mode in ("", "selective", "full"):
        per_layer = activation_bytes_per_token_layer(arch, tp=tp, sequence_parallel=mg.sequence_parallel,
                                                     seq_len=min(seq_len, tokens), dtype_bytes=b, recompute=mode,
                                                     fused=fused)
        stage = tokens * layers * per_layer
        if mode == "full":  # one layer's activations live again while it is recomputed
            stage += tokens * activation_bytes_per_token_layer(
                arch, tp=tp, sequence_parallel=mg.sequence_parallel, seq_len=min(seq_len, tokens),
                dtype_bytes=b, recompute="", fused=fused)
        logits = tokens * vocab / tp * (b + 8)
        by_recompute[mode or "none"] = max(stage * in_flight, stage + logits) if pp > 1 else stage + logits
    return TrainerMemory(params=params, weights=params * b, grads=params * 4.0,
                         optimizer=params * optimizer_per_param,
                         reference=params * b if cfg.algorithm.kl_coef > 0 else 0.0,
                         activations=by_recompute[mg.recompute or "none"], activations_by_recompute=by_recompute)


@dataclass(frozen=True, kw_only=True)
class EngineMemory:
    kind: str
    placement: str
    engines: int
    tp: int
    weights: float
    kv_per_token: float
    kv_cache: float
    """Bytes left for the KV cache on each GPU of an engine."""
    min_tokens: int
    """KV tokens one full-length sequence needs."""

    @property
    def kv_tokens(self) -> int:
        return max(0, int(self.kv_cache / self.kv_per_token))


def engine_weights_and_kv(arch: Arch, tp: int) -> tuple[float, float]:
    """(weight bytes, KV-cache bytes per token) on each GPU of an engine of `tp` GPUs."""
    return (arch.total_params() * ENGINE_BYTES / tp,
            2 * arch.layers * max(1, arch.kv_heads // tp) * arch.head_dim * ENGINE_BYTES)


@dataclass(frozen=True, kw_only=True)
class Plan:
    arch: Arch
    trainer: TrainerMemory
    engines: list[EngineMemory]
    gpu_bytes: float
    usable_bytes: float
    problems: list[str]


def plan_memory(cfg: Config) -> Plan:
    cl: ClusterConfig = cfg.cluster
    gpu = cl.gpu_memory_gb * GIB
    usable = gpu * cl.usable_memory_fraction
    arch = load_arch(cfg.worker.actor.model.model_path, "worker.actor.model.model_path")
    trainer = trainer_memory(cfg, arch, fused=cl.gpus_per_node > 0)
    problems = []
    if trainer.peak > usable:
        problems.append(
            f"trainer: {trainer.peak / GIB:.1f} GiB per GPU > {usable / GIB:.1f} GiB usable "
            f"(cluster.gpu_memory_gb × usable_memory_fraction); raise worker.actor.megatron.tp/pp/dp, set "
            f"worker.actor.megatron.recompute=full or lower the micro-batch token budget")
    seq_len = cfg.data.max_prompt_length + max(cfg.data.max_response_length,
                                               cfg.worker.rollout.verifier.max_trajectory_tokens)
    kinds = [("policy_engine", arch)]
    verifier = cfg.worker.rollout.verifier
    if verifier.enable and verifier.type == "model" and not verifier.use_http:
        kinds.append(("verifier_engine", load_arch(verifier.model_path, "worker.rollout.verifier.model_path")))
    colocated = [(k, a) for k, a in kinds if getattr(cl, k).placement == "colocate"]
    colocated_weights = sum(engine_weights_and_kv(a, getattr(cl, k).gpus_per_engine)[0] for k, a in colocated)
    engines = []
    for kind, engine_arch in kinds:
        placement: EnginePlacementConfig = getattr(cl, kind)
        tp = placement.gpus_per_engine
        weights, kv_per_token = engine_weights_and_kv(engine_arch, tp)
        if placement.placement == "colocate":
            count = max(1, cl.gpus_per_node * (cl.nodes - sum(getattr(cl, k).nodes for k, _ in kinds)) // tp)
            kv_cache = (usable - trainer.resident - colocated_weights) / len(colocated)
        else:
            count = placement.nodes * cl.gpus_per_node // tp
            kv_cache = placement.memory_fraction * gpu - weights
        engine = EngineMemory(kind=kind, placement=placement.placement, engines=count, tp=tp, weights=weights,
                              kv_per_token=kv_per_token, kv_cache=kv_cache, min_tokens=seq_len)
        if engine.kv_tokens < seq_len:
            problems.append(
                f"{kind}: {engine.kv_tokens} KV-cache tokens per engine < one sequence of {seq_len} "
                f"({weights / GIB:.1f} GiB of weights per GPU); raise cluster.{kind}.gpus_per_engine"
                + (" or place it separately (cluster.{kind}.placement=separate)".format(kind=kind)
                   if placement.placement == "colocate" else ""))
        engines.append(engine)
    return Plan(arch=arch, trainer=trainer, engines=engines, gpu_bytes=gpu, usable_bytes=usable, problems=problems)


def format_plan(cfg: Config, plan: Plan) -> str:
    cl, mg, t = cfg.cluster, cfg.worker.actor.megatron, plan.trainer
    g = lambda x: f"{x / GIB:7.2f} GiB"  # noqa: E731
    lines = [
        f"model {cfg.worker.actor.model.model_path}: {plan.arch.total_params() / 1e9:.2f} B parameters, "
        f"{cfg.worker.actor.model.dtype}",
        f"cluster: {cl.nodes} node(s) × {cl.gpus_per_node} GPU(s) of {cl.gpu_memory_gb:g} GiB "
        f"({g(plan.usable_bytes).strip()} usable)",
        f"trainer: tp={mg.tp} pp={mg.pp} cp={mg.cp} dp={mg.dp} vpp={mg.vpp or '-'}, "
        f"recompute={mg.recompute or 'none'}, distributed optimizer={mg.use_distributed_optimizer}, "
        f"{t.params / 1e9:.3f} B parameters on the most loaded rank",
        f"  weights            {g(t.weights)}",
        f"  grads (fp32)       {g(t.grads)}",
        f"  optimizer          {g(t.optimizer)}",
    ]
    if t.reference:
        lines.append(f"  reference (KL)     {g(t.reference)}")
    for mode, value in t.activations_by_recompute.items():
        mark = " <" if mode == (mg.recompute or "none") else ""
        lines.append(f"  activations {mode:<9}{g(value)}{mark}")
    lines.append(f"  peak per GPU       {g(t.peak)}")
    for e in plan.engines:
        lines += [f"{e.kind}: {e.engines} engine(s) × tp={e.tp}, {e.placement}",
                  f"  weights            {g(e.weights)}",
                  f"  KV cache           {g(e.kv_cache)}  = {e.kv_tokens} tokens "
                  f"({e.kv_tokens // e.min_tokens} sequences of {e.min_tokens})"]
    lines.append("FITS" if not plan.problems else "DOES NOT FIT:\n  " + "\n  ".join(plan.problems))
    return "\n".join(lines)
