"""MegatronBackend on real megatron-core over gloo (2 local processes): for the same model, batch and
seed, one GRPO update at TP=1, TP=2 and PP=2 gives TorchBackend's loss, grad norm and updated
weights (fp32), and its logprobs equal the HF model's own forward."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_guided.config import ActorConfig, AlgorithmConfig, MegatronConfig
from megatron_guided.rollout.trajectory import Trajectory
from megatron_guided.train.batch import build_train_batch
from megatron_guided.train.megatron_backend import MegatronBackend
from megatron_guided.train.torch_backend import TorchBackend, token_logprobs

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

TEMPERATURE = 0.7
TOL = 1e-5  # fp32; measured max abs differences are ~1e-7


def trajectories(vocab: int, count: int = 6) -> list[Trajectory]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(count):
        prompt = torch.randint(1, vocab, (3 + i % 3,), generator=gen).tolist()
        traj = Trajectory(prompt_ids=prompt, group_id=i // 3, sample_seed=i)
        traj.append(torch.randint(1, vocab, (4 + i,), generator=gen).tolist(), [-1.0] * (4 + i), trainable=True)
        if i % 2:  # verifier context (starting with token 0, the tiny tokenizer's pad), then another policy turn
            traj.append([0, 6], None, trainable=False)
            traj.append([7, 8, 9], [-0.5] * 3, trainable=True)
        out.append(traj)
    return out


def make_batch(vocab: int):
    batch = build_train_batch(trajectories(vocab), pad_token_id=0)
    batch.advantages = torch.linspace(-1, 1, batch.size)[:, None] * batch.loss_mask
    return batch


def actor_config(**megatron) -> ActorConfig:
    actor = ActorConfig(strategy="megatron", max_token_len_per_micro_batch=40, micro_batch_size_per_device_for_update=2,
                        micro_batch_size_per_device_for_experience=2,
                        megatron=MegatronConfig(use_distributed_optimizer=False, **megatron))
    # Adam's first step moves each weight by ≈ lr·g/(|g| + eps): for gradients near eps, float rounding in g
    # (reduction order differs between the backends) is amplified to ~lr·1e-2 in the weight; lr=1e-4 keeps
    # that below the 1e-5 tolerance while the update itself (~lr per weight) stays 10× above it.
    actor.optim.lr = 1e-4
    actor.optim.weight_decay = 0.1
    return actor




UPDATE_KWARGS = dict(temperature=TEMPERATURE, num_mini_batches=1, total_optimizer_steps=4, max_response_length=16)


def torch_update(model, batch, **kwargs) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The reference: TorchBackend's metrics and updated weights for one step on `batch`."""
    backend = TorchBackend(copy.deepcopy(model), actor=actor_config(), algorithm=AlgorithmConfig(), **UPDATE_KWARGS)
    return backend.train_step(batch), dict(backend.export_weights())


def assert_same_update(metrics, weights, expected, expected_weights, names=("loss", "grad_norm", "entropy")) -> None:
    for name in names:
        assert metrics[name] == pytest.approx(expected[name], abs=TOL), name
    for name, tensor in weights.items():
        assert (tensor - expected_weights[name]).abs().max() < TOL, name


@pytest.mark.parametrize("layout, kl", [({}, False), ({"tp": 2}, False), ({"pp": 2}, True)],
                         ids=["tp1", "tp2", "pp2-kl"])
def test_update_matches_torch_backend(random_qwen2_dir, layout, kl):
    """With `kl` the reference model's logprobs (a frozen copy on the ranks) and the KL loss join in."""
    model = AutoModelForCausalLM.from_pretrained(random_qwen2_dir, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    batch = make_batch(vocab)
    algorithm = AlgorithmConfig(kl_coef=0.5 if kl else 0.0, use_kl_loss=kl, kl_penalty="k3")
    kwargs = dict(algorithm=algorithm, temperature=TEMPERATURE, num_mini_batches=1, total_optimizer_steps=4,
                  max_response_length=16)

    # the independent reference: HF's forward, then TorchBackend's update of a copy
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    hf_logp, _ = token_logprobs(logits, batch.input_ids, temperature=TEMPERATURE)
    torch_backend = TorchBackend(copy.deepcopy(model), actor=actor_config(), **kwargs)
    if kl:  # a reference that differs from the policy, so the KL term has a gradient
        with torch.no_grad():
            for p in torch_backend.ref_model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        batch.ref_logprobs = torch_backend.compute_logprobs(batch, reference=True)
    torch_metrics = torch_backend.train_step(batch)
    torch_weights = dict(torch_backend.export_weights())

    backend = MegatronBackend(model_path=str(random_qwen2_dir), actor=actor_config(**layout), **kwargs)
    try:
        logp = backend.compute_logprobs(batch)
        mask = batch.loss_mask.bool()
        assert (logp[mask] - hf_logp[mask]).abs().max() < TOL
        if kl:  # the ranks' frozen copy is the initial policy
            assert (backend.compute_logprobs(batch, reference=True)[mask] - hf_logp[mask]).abs().max() < TOL
        metrics = backend.train_step(batch)
        for name in ("loss", "kl_loss", "grad_norm", "entropy", "clipfrac", "lr"):
            assert metrics[name] == pytest.approx(torch_metrics[name], abs=TOL), name
        assert (torch_metrics["kl_loss"] > 1e-4) is kl
        weights = dict(backend.export_weights())
    finally:
        backend.close()
    assert weights.keys() == {k for k in torch_weights if k != "lm_head.weight"}
    for name, tensor in weights.items():
        assert (tensor - torch_weights[name]).abs().max() < TOL, name
    moved = max((torch_weights[n] - p).abs().max() for n, p in model.state_dict().items() if n in weights)
    assert moved > 5e-5  # the update did change the weights (the comparison is not vacuous)


@pytest.mark.parametrize("saved", [{"tp": 2}, {"pp": 2}, {}], ids=["tp2-to-tp1", "pp2-to-tp1", "tp1-to-tp1"])
def test_resume_at_another_layout_continues_exactly(random_qwen2_dir, tmp_path, saved):
    """Step 1 at `saved`, checkpoint, resume at TP=1: step 2's metrics and weights equal an uninterrupted
    run's (TorchBackend, shown equal to MegatronBackend above). Adam's moments and step count must come
    back exactly: its second step depends on both. (At an unchanged layout the RNG states load too.)"""
    model = AutoModelForCausalLM.from_pretrained(random_qwen2_dir, dtype=torch.float32).eval()
    first, second = make_batch(64), make_batch(64)
    second.advantages = -second.advantages
    kwargs = dict(algorithm=AlgorithmConfig(kl_coef=0.0), temperature=TEMPERATURE, num_mini_batches=1,
                  total_optimizer_steps=4, max_response_length=16)
    reference = TorchBackend(copy.deepcopy(model), actor=actor_config(), **kwargs)
    reference.train_step(first)
    expected = reference.train_step(second)
    expected_weights = dict(reference.export_weights())

    checkpointed_step(random_qwen2_dir, saved, first, tmp_path, **kwargs)
    assert (tmp_path / "huggingface" / "model.safetensors").is_file()
    metrics, weights = resumed_step(random_qwen2_dir, tmp_path, second, **kwargs)
    assert_same_update(metrics, weights, expected, expected_weights, names=("loss", "grad_norm", "clipfrac", "ppo_kl"))


def checkpointed_step(model_path, layout: dict, batch, checkpoint, **kwargs) -> None:
    """A MegatronBackend at `layout` trains one step on `batch` and saves `checkpoint`."""
    backend = MegatronBackend(model_path=str(model_path), actor=actor_config(**layout), **kwargs)
    try:
        backend.train_step(batch)
        backend.save_checkpoint(checkpoint)
    finally:
        backend.close()


def resumed_step(model_path, checkpoint, batch, **kwargs) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """A fresh TP=1 MegatronBackend loads `checkpoint`, trains one step on `batch`: its metrics and weights."""
    resumed = MegatronBackend(model_path=str(model_path), actor=actor_config(), **kwargs)
    try:
        resumed.load_checkpoint(checkpoint)
        metrics = resumed.train_step(batch)
        return metrics, dict(resumed.export_weights())
    finally:
        resumed.close()


def megatron_logprobs_and_weights(model_path, layout: dict, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MegatronBackend's logprobs of `batch` and its HF weight export, ranks started and stopped here."""
    backend = MegatronBackend(model_path=str(model_path), actor=actor_config(**layout),
                              algorithm=AlgorithmConfig(kl_coef=0.0), temperature=TEMPERATURE, num_mini_batches=1,
                              total_optimizer_steps=1, max_response_length=16)
    try:
        return backend.compute_logprobs(batch), dict(backend.export_weights())
    finally:
        backend.close()


def save_random(kind: str, out):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, initializer_range=0.2)
    if kind == "qwen3":  # q/k RMSNorm, head_dim 32 != hidden / heads
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=32, tie_word_embeddings=True, **common))
    else:  # untied embeddings, another rope base
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, rope_theta=5e5, **common))
    model.save_pretrained(out)
    return model.eval()


@pytest.mark.parametrize("kind, layout", [("qwen3", {"tp": 2}), ("llama", {"pp": 2})], ids=["qwen3-tp2", "llama-pp2"])
def test_logprobs_match_hf_for_each_family(tmp_path, kind, layout):
    model = save_random(kind, tmp_path)
    batch = make_batch(64)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    hf_logp, _ = token_logprobs(logits, batch.input_ids, temperature=TEMPERATURE)
    logp, weights = megatron_logprobs_and_weights(tmp_path, layout, batch)
    mask = batch.loss_mask.bool()
    assert (logp[mask] - hf_logp[mask]).abs().max() < TOL
    state = model.state_dict()
    assert weights.keys() == state.keys() - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    assert all(torch.equal(weights[n], state[n]) for n in weights)  # export is the exact inverse of the load


def test_interleaved_pipeline_matches_torch_backend(tiny_model_dir):
    """PP=2 with 2 virtual stages per rank (4 layers: one per chunk), four micro-batches of different
    shapes (padded to one for the interleaved schedule)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    batch = make_batch(model.config.vocab_size)
    expected, expected_weights = torch_update(model, batch)
    backend = MegatronBackend(model_path=str(tiny_model_dir), actor=actor_config(pp=2, vpp=2),
                              algorithm=AlgorithmConfig(), **UPDATE_KWARGS)
    try:
        metrics = backend.train_step(batch)
        weights = dict(backend.export_weights())
    finally:
        backend.close()
    assert_same_update(metrics, weights, expected, expected_weights)


def test_data_parallel_distributed_optimizer(random_qwen2_dir, tmp_path):
    """DP=2 with the distributed optimizer (ZeRO-1): the same update as one process; its checkpoint
    reshards over DP only, and resuming it at another TP is refused with the fix in the message."""
    from megatron_guided.megatron.launcher import WorkerGroupError

    model = AutoModelForCausalLM.from_pretrained(random_qwen2_dir, dtype=torch.float32).eval()
    batch = make_batch(64)
    kwargs = dict(algorithm=AlgorithmConfig(), **UPDATE_KWARGS)
    expected, expected_weights = torch_update(model, batch)
    actor = actor_config(dp=2)
    actor.megatron.use_distributed_optimizer = True
    backend = MegatronBackend(model_path=str(random_qwen2_dir), actor=actor, **kwargs)
    try:
        metrics = backend.train_step(batch)
        weights = dict(backend.export_weights())
        backend.save_checkpoint(tmp_path)
    finally:
        backend.close()
    assert_same_update(metrics, weights, expected, expected_weights, names=("loss", "grad_norm", "entropy", "clipfrac"))
    actor = actor_config(tp=2)
    actor.megatron.use_distributed_optimizer = True
    resumed = MegatronBackend(model_path=str(random_qwen2_dir), actor=actor, **kwargs)
    try:
        with pytest.raises(WorkerGroupError, match="reshards over DP only; resume at that tp/pp/vpp"):
            resumed.load_checkpoint(tmp_path)
    finally:
        resumed.close()
