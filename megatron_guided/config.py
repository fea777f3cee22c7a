"""One typed config tree for a run.

Merged in this order (later wins): the dataclass defaults below, the YAML file given as
``config=path.yaml``, then dotted CLI overrides::

    python3 -m megatron_guided.train config=examples/tiny_cpu.yaml worker.rollout.n=4

Key names follow the original Guided-GRPO / EasyR1 configs (``data.*``, ``worker.actor.*``,
``worker.rollout.*``, ``worker.reward.*``, ``algorithm.*``, ``trainer.*``). Unknown keys, wrong
types and violated cross-field constraints fail at start with a :class:`ConfigError` that names
the dotted key and the fix. :func:`validate` never mutates the config.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config value is unknown, mistyped or inconsistent; the message names the key and the fix."""


@dataclass(kw_only=True)
class DataConfig:
    train_files: str = "data/arith_easy/train.jsonl"
    """jsonl/json/parquet file, a folder of them, or a local `datasets` directory (`path@split`)."""
    val_files: str = ""
    """Same forms as train_files; empty disables validation."""
    prompt_key: str = "problem"
    answer_key: str = "answer"
    image_key: str = "images"
    image_dir: str | None = None
    """Folder that relative image paths are resolved against."""
    min_pixels: int | None = None
    """Images with fewer pixels are scaled up (aspect kept) before the image processor; None = never.
    The original's geometry3k configs use 262144."""
    max_pixels: int | None = None
    """Images with more pixels are scaled down (aspect kept); None = never. The original uses 4194304."""
    max_prompt_length: int = 512
    """Prompts longer than this (in tokens, after the chat template) are dropped and counted."""
    max_response_length: int = 512
    """Most tokens the policy may generate for one sample."""
    rollout_batch_size: int = 32
    """Prompts per training step (each is sampled worker.rollout.n times)."""
    val_batch_size: int = -1
    """Prompts per validation generation batch; -1 = all at once."""
    val_max_samples: int = -1
    """Cap on validation prompts; -1 = all."""
    system_prompt: str | None = None
    format_prompt: str | None = None
    """Path to a Jinja template that receives `content` (the problem text) and returns the prompt."""
    shuffle: bool = True
    seed: int = 1
    skip_bad_rows: bool = False
    """true: malformed rows are skipped and counted; false: the first one raises, naming file and row."""


@dataclass(kw_only=True)
class ModelConfig:
    model_path: str = "models/tiny-qwen2"
    """Local HF folder, or a hub repo id (resolved with huggingface-hub where a network exists)."""
    tokenizer_path: str | None = None
    trust_remote_code: bool = False
    dtype: str = "float32"
    """float32 | bfloat16 | float16."""
    attn_implementation: str = "eager"
    """eager | sdpa | flash_attention_2 (packed, padding-free micro-batches need flash_attention_2)."""
    enable_gradient_checkpointing: bool = False


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    lr_warmup_steps: int = 0
    lr_scheduler_type: str = "constant"
    """constant | linear | cosine (decay after warmup to min_lr_ratio·lr at the last step)."""
    min_lr_ratio: float = 0.0


@dataclass(kw_only=True)
class MegatronConfig:
    """worker.actor.megatron.*: how Megatron-Core cuts and runs the policy (strategy=megatron).

    The world is tp × pp × cp × dp ranks; on CPU they are local processes on gloo, on GPUs one
    rank per GPU on NCCL."""

    tp: int = 1
    """Tensor-parallel size (attention heads and KV heads must divide by it)."""
    pp: int = 1
    """Pipeline-parallel size (layers must divide by pp × vpp)."""
    vpp: int = 0
    """Virtual pipeline stages per rank (interleaved schedule); 0 = off. Needs pp > 1."""
    cp: int = 1
    """Context-parallel size for long sequences (GPU + Transformer Engine only)."""
    dp: int = 1
    """Data-parallel replicas."""
    sequence_parallel: bool = False
    """Shard activations along the sequence in TP regions (GPU + Transformer Engine only)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state across data-parallel ranks (ZeRO-1). Its checkpoints reshard over DP only;
    set false to resume at a different TP/PP."""
    recompute: str = ""
    """"" (off) | selective (core attention) | full (whole layers): activation recomputation."""
    fp8: str = ""
    """"" (off) | hybrid | e4m3: FP8 GEMMs through Transformer Engine (Hopper GPUs)."""
    fp8_recipe: str = "delayed"
    """delayed | tensorwise (current scaling)."""
    max_tokens_per_micro_batch: int = 0
    """Token budget of one micro-batch per rank; 0 = worker.actor.max_token_len_per_micro_batch."""
    make_vocab_size_divisible_by: int = 128
    """The vocabulary is padded to a multiple of this × tp (padded logits are masked out)."""


@dataclass(kw_only=True)
class ActorConfig:
    strategy: str = "torch"
    """torch (a transformers model in this process) | megatron (Megatron-Core ranks, worker.actor.megatron)."""
    global_batch_size: int = 16
    """Prompts per optimizer step (mini-batch); its samples are global_batch_size × rollout.n."""
    micro_batch_size_per_device_for_update: int = 64
    """Most sequences in one forward/backward micro-batch."""
    micro_batch_size_per_device_for_experience: int = 128
    """Most sequences in one log-prob forward micro-batch."""
    max_token_len_per_micro_batch: int = 16384
    """Token budget of one micro-batch (prompt + response tokens, padded length × rows)."""
    ppo_epochs: int = 1
    max_grad_norm: float = 1.0
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.3
    clip_ratio_dual: float = 3.0
    """Dual-clip constant c for negative advantages; <= 1 disables dual clip."""
    loss_type: str = "default"
    """default (PPO clip) | gspo | cispo."""
    loss_avg_mode: str = "token"
    """token (= token-mean) | seq (= seq-mean-token-mean) | seq-mean-token-sum | seq-mean-token-sum-norm."""
    padding_free: bool = True
    """Pack micro-batches without padding when the attention implementation supports it."""
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    megatron: MegatronConfig = field(default_factory=MegatronConfig)


@dataclass(kw_only=True)
class ValOverrideConfig:
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1


@dataclass(kw_only=True)
class SGLangConfig:
    """worker.rollout.sglang.* and worker.rollout.verifier.sglang.*: the SGLang servers of one engine.

    Flags of SGLang's own that we do not interpret go through ``extra_args`` unchanged."""

    urls: list[str] = field(default_factory=list)
    """Attach to these running servers (``http://host:port``) instead of launching; empty = launch."""
    num_replicas: int = 1
    """Servers to launch, each with the whole model; requests are load-balanced, a sample sticks to one."""
    tp_size: int = 1
    """Tensor-parallel size of each server (--tp-size)."""
    mem_fraction_static: float = 0.8
    """Share of device memory for weights + KV cache (--mem-fraction-static)."""
    dtype: str = "auto"
    """--dtype: auto | float32 | bfloat16 | float16 (float32 on CPU to match the trainer's logprobs)."""
    device: str = "cuda"
    """cuda | cpu. cpu sets SGLANG_USE_CPU_ENGINE=1 and torch_native attention; memory release is refused."""
    host: str = "127.0.0.1"
    """Address launched servers bind to."""
    port: int = 0
    """First port of launched servers (replica i uses port + i); 0 = free ports."""
    python: str = ""
    """Interpreter that has sglang installed (e.g. .venv-sglang/bin/python); "" = this one."""
    pythonpath: list[str] = field(default_factory=list)
    """Folders put first on the servers' PYTHONPATH (on CPU: tests/sglang_stubs, see its README)."""
    extra_args: list[str] = field(default_factory=list)
    """Passed to `python -m sglang.launch_server` as given, e.g. ["--max-total-tokens", "65536"]."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment of launched servers, e.g. {OMP_NUM_THREADS: "1"} (never logged)."""
    startup_timeout_s: float = 600.0
    """Seconds to wait for a launched server's /health."""
    request_timeout_s: float = 600.0
    """Seconds per HTTP request (a whole generation)."""
    max_retries: int = 3
    """Retries after the first attempt on connection errors, timeouts, 5xx and malformed JSON."""
    retry_interval_s: float = 0.5
    """Base of the exponential backoff between retries (seconds)."""
    weight_sync: str = "disk"
    """disk (safetensors in weight_sync_dir, CPU or disaggregated) | tensor (colocated GPUs) |
    distributed (an NCCL group between trainer and servers)."""
    weight_sync_dir: str = ""
    """Folder shared by trainer and servers for weight_sync=disk; default <output_dir>/weight_sync."""
    bucket_mb: int = 512
    """Most MiB of tensors per safetensors shard / update request."""
    pause_mode: str = "in_place"
    """How generation is paused around a weight update: abort | retract | in_place."""
    master_address: str = "127.0.0.1"
    """weight_sync=distributed: address of the trainer's rank 0 in the update group."""
    master_port: int = 0
    """weight_sync=distributed: port of that rendezvous; 0 = a free one."""


@dataclass(kw_only=True)
class VerifierConfig:
    """worker.rollout.verifier.*: the verifier in the loop (Guided-GRPO)."""

    enable: bool = False
    type: str = "function"
    """function (a Python callable) | model (a local model through a generation engine) | http
    (an OpenAI-style endpoint). use_http=true selects http, as in the original configs."""
    use_http: bool = False
    function: str = "examples/verifier_function/arith_step_checker.py:verify"
    """`path/to/file.py:function_name` for type=function."""
    model_path: str = ""
    tokenizer_path: str | None = None
    trust_remote_code: bool = False
    engine: str = "hf"
    """type=model: hf (in-process) | sglang (its own servers, worker.rollout.verifier.sglang; never weight-synced)."""
    sglang: SGLangConfig = field(default_factory=SGLangConfig)
    base_url: str = ""
    """http: requests go to POST {base_url}/chat/completions."""
    model: str = "verifier"
    api_key: str = ""
    """Prefer api_key_env / api_key_file; a key given here is never logged or dumped."""
    api_key_env: str = "VERIFIER_API_KEY"
    api_key_file: str | None = None
    http_timeout: float = 120.0
    """Seconds per request."""
    http_max_retries: int = 3
    """Retries after the first attempt on timeouts, connection errors, 429 and 5xx (never other 4xx)."""
    http_retry_interval: float = 1.0
    """Base of the exponential backoff (seconds), with jitter; Retry-After wins when sent."""
    http_retry_max_interval: float = 30.0
    http_concurrency: int = 16
    on_failure: str = "continue_unguided"
    """After retries: continue_unguided (the sample goes on without guidance) | stop (end the
    sample's dialogue) | fail (abort the run). Always counted in metrics."""
    prompt_template: str | None = None
    """Path to a file with the verifier's system prompt; default: the built-in one."""
    show_reference: str = "train"
    """Give the verifier the reference answer: train | always | never."""
    enable_hallucination_score: bool = True
    default_hallucination_score: float = 0.5
    """verifier_hallucination_score of a sample whose verifier never sent a [SCORE] flag."""
    temperature: float = 0.2
    top_p: float = 0.95
    top_k: int = -1
    max_tokens: int = 256
    """Most tokens of one verifier reply."""
    max_turns: int = 10
    """Most policy turns per sample."""
    max_tokens_per_turn: int = 0
    """Most tokens of one policy turn; 0 = data.max_response_length."""
    max_trajectory_tokens: int = 0
    """Most tokens of a whole dialogue after the prompt; 0 = data.max_response_length."""
    stop_token: str = "###STOP###"
    multimodal: bool = False
    """true: a model or http verifier sees the problem's images (its model must be vision-language);
    false: they appear as [IMAGE k] placeholders (the original's text-only verifier)."""
    train_scope: str = "full"
    """full (every policy turn trained) | final_turn (the original's: only the last turn)."""
    guided_fraction: float = 1.0
    """Share of each group's samples that get the verifier; the rest run open-loop."""
    guide_when: str = "always"
    """always | group_failed (verify only groups whose open-loop samples all failed)."""
    correction_penalty: float = 0.0
    """Reward subtracted per correction the sample received."""
    max_corrections: int = -1
    """Most corrections per sample; -1 = up to max_turns."""


@dataclass(kw_only=True)
class RolloutConfig:
    engine: str = "hf"
    """hf (in-process transformers engine with KV-cache reuse) | sglang (servers, worker.rollout.sglang)."""
    sglang: SGLangConfig = field(default_factory=SGLangConfig)
    n: int = 8
    """Samples per prompt (the group size of group-relative estimators)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int = 1
    """Base seed; every sample of every step gets its own seed derived from it."""
    stop: list[str] = field(default_factory=list)
    max_num_batched_tokens: int = 8192
    """Token budget of the running generation batch (sum over its sequences of prompt + max new tokens);
    must hold one sequence: data.max_prompt_length + data.max_response_length."""
    val_override_config: ValOverrideConfig = field(default_factory=ValOverrideConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)


@dataclass(kw_only=True)
class RewardConfig:
    reward_type: str = "batch"
    """batch (fn(list[dict]) -> list[dict]) | sequential (fn(dict) -> dict)."""
    reward_function: str = "examples/reward_function/math.py:compute_score"
    """`path/to/file.py:function_name`."""
    reward_function_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class WorkerConfig:
    actor: ActorConfig = field(default_factory=ActorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)


@dataclass(kw_only=True)
class AlgorithmConfig:
    adv_estimator: str = "grpo"
    """grpo | dr_grpo | rloo | reinforce_plus_plus."""
    gamma: float = 1.0
    """Discount of reinforce_plus_plus returns."""
    use_kl_loss: bool = False
    """true: kl_coef·KL(π‖π_ref) is added to the loss; false with kl_coef > 0: subtracted from the reward."""
    kl_penalty: str = "low_var_kl"
    """k1 (kl) | k2 (mse) | k3 (low_var_kl)."""
    kl_coef: float = 0.0
    online_filtering: bool = False
    """DAPO dynamic sampling: drop groups whose rewards are all equal (zero advantage everywhere)."""
    overlong_buffer_len: int = 0
    """DAPO overlong shaping: linear penalty over the last this-many tokens of max_response_length; 0 = off."""
    overlong_penalty_factor: float = 1.0


@dataclass(kw_only=True)
class TrainerConfig:
    total_epochs: int = 15
    max_steps: int | None = None
    """Stop after this many steps (overrides total_epochs when smaller)."""
    project_name: str = "megatron_guided"
    experiment_name: str = "tiny_cpu"
    logger: list[str] = field(default_factory=lambda: ["console", "file", "tensorboard"])
    """Any of console | file (metrics.jsonl) | tensorboard | wandb."""
    wandb_mode: str = "offline"
    """offline | online (needs WANDB_API_KEY in the environment)."""
    output_dir: str | None = None
    """Where logs and the resolved config go; default outputs/<project>/<experiment>."""
    val_freq: int = -1
    """Validate every this-many steps (and after the last); -1 = never during training."""
    val_before_train: bool = True
    val_sampled_n: int = 0
    """Also validate at the rollout temperature with this many samples per prompt; 0 = greedy only."""
    val_only: bool = False
    save_freq: int = -1
    """Checkpoint every this-many steps (and after the last); -1 = only after the last step."""
    save_limit: int = 2
    """keep_last: how many checkpoints to keep; -1 = all."""
    save_checkpoint_path: str | None = None
    """Default checkpoints/<project>/<experiment>."""
    load_checkpoint_path: str | None = None
    find_last_checkpoint: bool = True
    """Resume from the newest checkpoint under save_checkpoint_path when one exists."""
    seed: int = 1
    num_threads: int = 0
    """torch intra-op threads on CPU; 0 = torch's default."""


@dataclass(kw_only=True)
class EnginePlacementConfig:
    """cluster.policy_engine.* / cluster.verifier_engine.*: where one kind of generation engine runs."""

    placement: str = "colocate"
    """colocate (on the trainer's GPUs, time-shared: the engine releases its memory during the update) |
    separate (on `nodes` nodes of its own)."""
    nodes: int = 0
    """separate: how many whole nodes the engines get (0 with colocate)."""
    gpus_per_engine: int = 1
    """GPUs of one engine, its tensor-parallel size (SGLang tp); engines = their GPUs / gpus_per_engine."""
    cpus_per_engine: int = 1
    """Ray CPUs reserved for each engine actor."""
    memory_fraction: float = 0.85
    """separate: share of each GPU the engine takes for weights + KV cache (SGLang mem_fraction_static);
    colocated engines get what the trainer's resident state leaves."""


@dataclass(kw_only=True)
class ClusterConfig:
    """cluster.*: where the ranks and engines run (megatron_guided.launch) and what the memory planner
    (tools/plan_memory.py) plans for. The default is this machine, no Ray."""

    launcher: str = "local"
    """local (Megatron ranks as local processes, engines in this process) | ray (ranks and engines as Ray
    actors in placement groups: the HF policy engine, or one SGLang server per policy_engine /
    verifier_engine slot)."""
    ray_address: str = ""
    """launcher=ray: "" starts a private Ray instance on this machine; "auto" or host:port joins a running
    cluster (what slurm/*.sh start)."""
    nodes: int = 1
    """Nodes of the allocation (trainer nodes + the engines' own nodes)."""
    gpus_per_node: int = 0
    """0 = CPU: every rank is a process with cpus_per_rank Ray CPUs, gloo between them."""
    gpu_memory_gb: float = 80.0
    """Memory of one GPU (GiB), for the planner."""
    usable_memory_fraction: float = 0.92
    """Share of each GPU the planner may fill (the rest: CUDA context, NCCL buffers, fragmentation)."""
    cpus_per_rank: int = 1
    """Ray CPUs (and torch threads on CPU) of each Megatron rank."""
    start_timeout: float = 600.0
    """Seconds for placement groups and ranks to come up before the run fails."""
    policy_engine: EnginePlacementConfig = field(default_factory=EnginePlacementConfig)
    verifier_engine: EnginePlacementConfig = field(default_factory=EnginePlacementConfig)
    """Used by model verifiers (worker.rollout.verifier.type=model) on GPUs."""


@dataclass(kw_only=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @property
    def output_dir(self) -> Path:
        t = self.trainer
        return Path(t.output_dir or f"outputs/{t.project_name}/{t.experiment_name}")

    @property
    def checkpoint_dir(self) -> Path:
        t = self.trainer
        return Path(t.save_checkpoint_path or f"checkpoints/{t.project_name}/{t.experiment_name}")

    def sglang_engines(self) -> dict[str, tuple[str, SGLangConfig]]:
        """The run's SGLang engines by placement kind (a `cluster.*` key): policy_engine → ("worker.rollout.sglang",
        its config), and verifier_engine likewise when a model verifier is served by SGLang."""
        rollout, verifier = self.worker.rollout, self.worker.rollout.verifier
        engines = {}
        if rollout.engine == "sglang":
            engines["policy_engine"] = ("worker.rollout.sglang", rollout.sglang)
        if verifier.enable and verifier.type == "model" and not verifier.use_http and verifier.engine == "sglang":
            engines["verifier_engine"] = ("worker.rollout.verifier.sglang", verifier.sglang)
        return engines


ADV_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_plus_plus")
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")
LOSS_TYPES = ("default", "gspo", "cispo")
LOSS_AVG_MODES = {
    "token": "token-mean",
    "token-mean": "token-mean",
    "seq": "seq-mean-token-mean",
    "seq-mean-token-mean": "seq-mean-token-mean",
    "seq-mean-token-sum": "seq-mean-token-sum",
    "seq-mean-token-sum-norm": "seq-mean-token-sum-norm",
}
KL_PENALTIES = ("k1", "kl", "k2", "mse", "k3", "low_var_kl")
LOGGERS = ("console", "file", "tensorboard", "wandb")


def _check_choice(key: str, value: Any, allowed: Any) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {sorted(allowed)}")


def _validate_megatron(mg: MegatronConfig) -> None:
    """Static checks of worker.actor.megatron; the model-dependent ones (heads, layers) and the
    GPU-only options are checked against the model and the machine when the backend starts."""
    for key in ("tp", "pp", "cp", "dp"):
        if getattr(mg, key) < 1:
            raise ConfigError(f"worker.actor.megatron.{key}={getattr(mg, key)} must be >= 1")
    if mg.vpp < 0 or (mg.vpp > 1 and mg.pp < 2):
        raise ConfigError(f"worker.actor.megatron.vpp={mg.vpp} needs pp >= 2 (virtual stages interleave a pipeline)")
    _check_choice("worker.actor.megatron.recompute", mg.recompute, ("", "selective", "full"))
    _check_choice("worker.actor.megatron.fp8", mg.fp8, ("", "hybrid", "e4m3"))
    _check_choice("worker.actor.megatron.fp8_recipe", mg.fp8_recipe, ("delayed", "tensorwise"))
    if mg.make_vocab_size_divisible_by < 1:
        raise ConfigError("worker.actor.megatron.make_vocab_size_divisible_by must be >= 1")


def _validate_sglang(key: str, sg: SGLangConfig) -> None:
    _check_choice(f"{key}.device", sg.device, ("cuda", "cpu"))
    _check_choice(f"{key}.weight_sync", sg.weight_sync, ("disk", "tensor", "distributed"))
    _check_choice(f"{key}.pause_mode", sg.pause_mode, ("abort", "retract", "in_place"))
    for name in ("num_replicas", "tp_size", "bucket_mb"):
        if getattr(sg, name) < 1:
            raise ConfigError(f"{key}.{name}={getattr(sg, name)} must be >= 1")
    if not 0.0 < sg.mem_fraction_static <= 1.0:
        raise ConfigError(f"{key}.mem_fraction_static={sg.mem_fraction_static} must be in (0, 1]")
    for name in ("startup_timeout_s", "request_timeout_s"):
        if getattr(sg, name) <= 0:
            raise ConfigError(f"{key}.{name}={getattr(sg, name)} must be > 0")
    if sg.max_retries < 0 or sg.retry_interval_s < 0:
        raise ConfigError(f"{key}.max_retries and {key}.retry_interval_s must be >= 0")
    for url in sg.urls:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{key}.urls: {url!r} must look like http://host:port")
    if sg.device == "cpu" and sg.weight_sync != "disk":
        raise ConfigError(f"{key}.weight_sync={sg.weight_sync} needs GPUs; set {key}.weight_sync=disk on device=cpu")
    if not 0 <= sg.port <= 65535 or not 0 <= sg.master_port <= 65535:
        raise ConfigError(f"{key}.port and {key}.master_port must be in [0, 65535]")


def _validate_cluster(cluster: ClusterConfig, mg: MegatronConfig, *, megatron: bool) -> None:
    """Static checks of cluster.*: the trainer's ranks fill its nodes' GPUs exactly and a TP group never
    spans nodes (its all-reduces need NVLink)."""
    _check_choice("cluster.launcher", cluster.launcher, ("local", "ray"))
    for key in ("nodes", "cpus_per_rank"):
        if getattr(cluster, key) < 1:
            raise ConfigError(f"cluster.{key}={getattr(cluster, key)} must be >= 1")
    if cluster.gpus_per_node < 0:
        raise ConfigError(f"cluster.gpus_per_node={cluster.gpus_per_node} must be >= 0 (0 = CPU)")
    if not 0 < cluster.usable_memory_fraction <= 1:
        raise ConfigError(f"cluster.usable_memory_fraction={cluster.usable_memory_fraction} must be in (0, 1]")
    engine_nodes = 0
    for name in ("policy_engine", "verifier_engine"):
        engine, key = getattr(cluster, name), f"cluster.{name}"
        _check_choice(f"{key}.placement", engine.placement, ("colocate", "separate"))
        if (engine.placement == "separate") != (engine.nodes > 0):
            raise ConfigError(f"{key}.nodes={engine.nodes}: separate engines need nodes >= 1, colocated ones 0")
        if engine.gpus_per_engine < 1 or engine.cpus_per_engine < 1:
            raise ConfigError(f"{key}.gpus_per_engine and cpus_per_engine must be >= 1")
        if cluster.gpus_per_node and cluster.gpus_per_node % engine.gpus_per_engine:
            raise ConfigError(f"{key}.gpus_per_engine={engine.gpus_per_engine} must divide "
                              f"cluster.gpus_per_node={cluster.gpus_per_node} (an engine stays on one node)")
        if not 0 < engine.memory_fraction <= 1:
            raise ConfigError(f"{key}.memory_fraction={engine.memory_fraction} must be in (0, 1]")
        engine_nodes += engine.nodes
    if engine_nodes >= cluster.nodes:
        raise ConfigError(f"cluster.nodes={cluster.nodes} leaves no node for the trainer after the engines' "
                          f"own {engine_nodes}; raise cluster.nodes or colocate an engine")
    if cluster.gpus_per_node and megatron:
        world, gpus = mg.tp * mg.pp * mg.cp * mg.dp, (cluster.nodes - engine_nodes) * cluster.gpus_per_node
        if world != gpus:
            raise ConfigError(f"worker.actor.megatron tp·pp·cp·dp = {world} ranks must fill the trainer's "
                              f"{cluster.nodes - engine_nodes} node(s) × cluster.gpus_per_node="
                              f"{cluster.gpus_per_node} = {gpus} GPUs; change dp (or tp/pp/cp) or the node counts")
        if cluster.gpus_per_node % mg.tp:
            raise ConfigError(f"worker.actor.megatron.tp={mg.tp} must divide cluster.gpus_per_node="
                              f"{cluster.gpus_per_node} (a TP group stays on one node)")
    if cluster.launcher == "ray" and not megatron:
        raise ConfigError("cluster.launcher=ray places Megatron ranks: set worker.actor.strategy=megatron "
                          "(the torch strategy trains in this process)")


def _validate_ray_sglang(cfg: Config) -> None:
    """cluster.launcher=ray starts one SGLang server per engine slot of the plan, on the slot's GPUs."""
    if cfg.cluster.launcher != "ray":
        return
    for kind, (key, sg) in cfg.sglang_engines().items():
        gpus = getattr(cfg.cluster, kind).gpus_per_engine
        if sg.tp_size != gpus:
            raise ConfigError(f"{key}.tp_size={sg.tp_size} must equal cluster.{kind}.gpus_per_engine={gpus}: with "
                              f"cluster.launcher=ray each engine slot runs one server over the slot's GPUs")
        if sg.urls:
            raise ConfigError(f"{key}.urls attaches to running servers, but cluster.launcher=ray starts them in "
                              f"the cluster.{kind} slots; leave {key}.urls empty")
        if sg.num_replicas != 1:
            raise ConfigError(f"{key}.num_replicas={sg.num_replicas}: with cluster.launcher=ray the servers are "
                              f"the cluster.{kind} slots (one each); leave num_replicas=1")


def validate(cfg: Config) -> None:
    """Cross-field checks; raises ConfigError naming the dotted key and the fix."""
    data, actor, rollout = cfg.data, cfg.worker.actor, cfg.worker.rollout
    algo, trainer = cfg.algorithm, cfg.trainer
    _check_choice("algorithm.adv_estimator", algo.adv_estimator, ADV_ESTIMATORS)
    _check_choice("algorithm.kl_penalty", algo.kl_penalty, KL_PENALTIES)
    _check_choice("worker.actor.loss_type", actor.loss_type, LOSS_TYPES)
    _check_choice("worker.actor.loss_avg_mode", actor.loss_avg_mode, LOSS_AVG_MODES)
    _check_choice("worker.actor.strategy", actor.strategy, ("torch", "megatron"))
    _validate_megatron(actor.megatron)
    _validate_cluster(cfg.cluster, actor.megatron, megatron=actor.strategy == "megatron")
    _check_choice("worker.actor.model.dtype", actor.model.dtype, ("float32", "bfloat16", "float16"))
    _check_choice("worker.actor.optim.lr_scheduler_type", actor.optim.lr_scheduler_type,
                  ("constant", "linear", "cosine"))
    _check_choice("worker.rollout.engine", rollout.engine, ("hf", "sglang"))
    _check_choice("worker.rollout.verifier.engine", rollout.verifier.engine, ("hf", "sglang"))
    _validate_sglang("worker.rollout.sglang", rollout.sglang)
    _validate_sglang("worker.rollout.verifier.sglang", rollout.verifier.sglang)
    _validate_ray_sglang(cfg)
    _check_choice("worker.reward.reward_type", cfg.worker.reward.reward_type, ("batch", "sequential"))
    _check_choice("trainer.wandb_mode", trainer.wandb_mode, ("offline", "online"))
    for name in trainer.logger:
        _check_choice("trainer.logger", name, LOGGERS)

    verifier = rollout.verifier
    _check_choice("worker.rollout.verifier.type", verifier.type, ("function", "model", "http"))
    _check_choice("worker.rollout.verifier.on_failure", verifier.on_failure, ("continue_unguided", "stop", "fail"))
    _check_choice("worker.rollout.verifier.show_reference", verifier.show_reference, ("train", "always", "never"))
    _check_choice("worker.rollout.verifier.train_scope", verifier.train_scope, ("full", "final_turn"))
    _check_choice("worker.rollout.verifier.guide_when", verifier.guide_when, ("always", "group_failed"))
    if not 0.0 <= verifier.guided_fraction <= 1.0:
        raise ConfigError(f"worker.rollout.verifier.guided_fraction={verifier.guided_fraction} must be in [0, 1]")
    if verifier.max_turns < 1:
        raise ConfigError(f"worker.rollout.verifier.max_turns={verifier.max_turns} must be >= 1")
    if verifier.enable and (verifier.type == "http" or verifier.use_http) and not verifier.base_url:
        raise ConfigError("worker.rollout.verifier.base_url is required for the http verifier "
                          "(requests go to POST {base_url}/chat/completions)")
    if verifier.enable and verifier.multimodal and verifier.type == "function" and not verifier.use_http:
        raise ConfigError("worker.rollout.verifier.multimodal=true needs verifier.type=model or http "
                          "(a function verifier already receives request.images)")
    if verifier.enable and verifier.type == "model" and not verifier.use_http and not verifier.model_path:
        raise ConfigError("worker.rollout.verifier.model_path is required for verifier.type=model")
    if algo.adv_estimator in GROUP_ESTIMATORS and rollout.n < 2:
        raise ConfigError(
            f"worker.rollout.n={rollout.n}: the group estimator algorithm.adv_estimator="
            f"{algo.adv_estimator} needs n >= 2 samples per prompt; set worker.rollout.n=2 or more, "
            "or use algorithm.adv_estimator=reinforce_plus_plus")
    budget = data.max_prompt_length + data.max_response_length
    if rollout.verifier.enable and rollout.verifier.max_trajectory_tokens > data.max_response_length:
        budget = data.max_prompt_length + rollout.verifier.max_trajectory_tokens
    if rollout.max_num_batched_tokens < budget:
        raise ConfigError(
            f"worker.rollout.max_num_batched_tokens={rollout.max_num_batched_tokens} must be >= "
            f"data.max_prompt_length + data.max_response_length = {budget}; raise it to {budget} "
            "or shorten the lengths")
    if actor.max_token_len_per_micro_batch < budget:
        raise ConfigError(
            f"worker.actor.max_token_len_per_micro_batch={actor.max_token_len_per_micro_batch} must "
            f"hold one full sequence (data.max_prompt_length + data.max_response_length = {budget})")
    if data.rollout_batch_size % actor.global_batch_size:
        raise ConfigError(
            f"data.rollout_batch_size={data.rollout_batch_size} must be a multiple of "
            f"worker.actor.global_batch_size={actor.global_batch_size} (prompts per optimizer step)")
    if actor.global_batch_size > data.rollout_batch_size:
        raise ConfigError("worker.actor.global_batch_size must be <= data.rollout_batch_size")
    positives = {
        "data.max_prompt_length": data.max_prompt_length,
        "data.max_response_length": data.max_response_length,
        "data.rollout_batch_size": data.rollout_batch_size,
        "worker.actor.global_batch_size": actor.global_batch_size,
        "worker.actor.micro_batch_size_per_device_for_update": actor.micro_batch_size_per_device_for_update,
        "worker.actor.micro_batch_size_per_device_for_experience":
            actor.micro_batch_size_per_device_for_experience,
        "worker.actor.ppo_epochs": actor.ppo_epochs,
        "worker.rollout.n": rollout.n,
        "trainer.total_epochs": trainer.total_epochs,
    }
    for key, value in positives.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be > 0")
    if not 0.0 <= rollout.temperature:
        raise ConfigError(f"worker.rollout.temperature={rollout.temperature} must be >= 0")
    if not 0.0 < rollout.top_p <= 1.0:
        raise ConfigError(f"worker.rollout.top_p={rollout.top_p} must be in (0, 1]")
    if actor.clip_ratio_low < 0 or actor.clip_ratio_high < 0:
        raise ConfigError("worker.actor.clip_ratio_low/high must be >= 0")
    if actor.optim.lr <= 0:
        raise ConfigError(f"worker.actor.optim.lr={actor.optim.lr} must be > 0")
    if ":" not in cfg.worker.reward.reward_function:
        raise ConfigError(
            f"worker.reward.reward_function={cfg.worker.reward.reward_function!r} must look like "
            "path/to/file.py:function_name")
    if algo.overlong_buffer_len >= data.max_response_length:
        raise ConfigError(
            f"algorithm.overlong_buffer_len={algo.overlong_buffer_len} must be < "
            f"data.max_response_length={data.max_response_length}")
    if algo.kl_coef > 0 and not algo.use_kl_loss and algo.adv_estimator != "reinforce_plus_plus":
        raise ConfigError(
            f"algorithm.kl_coef={algo.kl_coef} with algorithm.use_kl_loss=false puts the KL into the reward, "
            "which needs a token-level estimator: set algorithm.use_kl_loss=true or "
            "algorithm.adv_estimator=reinforce_plus_plus")
    if trainer.max_steps is not None and trainer.max_steps <= 0:
        raise ConfigError(f"trainer.max_steps={trainer.max_steps} must be > 0 or null")


def _omegaconf_error(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    first_line = str(exc).splitlines()[0]
    return ConfigError(f"{source}: {key}: {first_line}")


def load_config(argv: list[str] | None = None, *, schema: type = Config, check=None):
    """Build a validated config of type `schema` (default :class:`Config`, checked by :func:`validate`)
    from ``config=file.yaml`` plus ``dotted.key=value`` arguments."""
    argv = list(argv or [])
    check = validate if check is None and schema is Config else check
    schema = OmegaConf.structured(schema())
    yaml_path = None
    overrides = []
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r}: expected key=value (e.g. worker.rollout.n=4)")
        if arg.startswith("config="):
            yaml_path = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    merged = schema
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config={yaml_path}: no such file")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except OmegaConfBaseException as exc:
            raise _omegaconf_error(exc, str(path)) from None
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc, "command line" if yaml_path is None else f"{yaml_path} + command line") from None
    if check is not None:
        check(cfg)
    return cfg


SECRET_KEY_PATTERN = re.compile(r"(api_key|secret|password|access_token|auth_token|hf_token)$", re.IGNORECASE)
REDACTED = "***redacted***"


def to_dict(cfg: Config, *, redact: bool = True) -> dict[str, Any]:
    """The config as plain data; with redact=True every secret-looking key's value is replaced."""
    data = dataclasses.asdict(cfg)
    if redact:
        data = _redact(data)
    return data


def _redact(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: (REDACTED if SECRET_KEY_PATTERN.search(str(k)) and v else _redact(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_redact(v) for v in node]
    return node


def save_resolved(cfg: Config, path: Path) -> None:
    """Write the resolved config (secrets redacted) as YAML."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))
