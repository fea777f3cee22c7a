"""TorchBackend: logprobs match the HF model's own forward; the gradient does not depend on the
micro-batch split (global-batch normalisation); batches are built with exact target alignment."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from megatron_guided.config import ActorConfig, AlgorithmConfig
from megatron_guided.rollout.trajectory import Trajectory
from megatron_guided.train.batch import build_train_batch, split_by_token_budget
from megatron_guided.train.torch_backend import TorchBackend

PAD = 0


def tiny_model() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).eval()


def trajectories(count: int = 6) -> list[Trajectory]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(count):
        prompt = torch.randint(1, 40, (3 + i % 3,), generator=gen).tolist()
        traj = Trajectory(prompt_ids=prompt, group_id=i // 3, sample_seed=i)
        traj.append(torch.randint(1, 40, (4 + i,), generator=gen).tolist(), [-1.0] * (4 + i), trainable=True)
        if i % 2:  # a context span (e.g. verifier text) followed by another policy turn
            traj.append([5, 6], None, trainable=False)
            traj.append([7, 8, 9], [-0.5] * 3, trainable=True)
        out.append(traj)
    return out


def backend_for(model, *, max_tokens: int, max_rows: int, loss_avg_mode: str = "token",
                lr: float = 1e-3) -> TorchBackend:
    actor = ActorConfig(max_token_len_per_micro_batch=max_tokens, micro_batch_size_per_device_for_update=max_rows,
                        micro_batch_size_per_device_for_experience=max_rows, loss_avg_mode=loss_avg_mode)
    actor.optim.lr = lr
    return TorchBackend(model, actor=actor, algorithm=AlgorithmConfig(), temperature=0.7, num_mini_batches=1,
                        total_optimizer_steps=10, max_response_length=16)


def test_batch_alignment_masks_and_logprobs():
    trajs = trajectories()
    batch = build_train_batch(trajs, pad_token_id=PAD)
    for i, traj in enumerate(trajs):
        seq = traj.prompt_ids + traj.response_ids
        targets = batch.input_ids[i, 1:]
        trained = targets[batch.loss_mask[i] == 1].tolist()
        assert trained == traj.policy_token_ids  # the mask selects exactly the policy tokens
        assert batch.attention_mask[i].sum() == len(seq)


def test_logprobs_match_hf_forward_per_sequence():
    model = tiny_model()
    backend = backend_for(model, max_tokens=40, max_rows=2)
    trajs = trajectories()
    batch = build_train_batch(trajs, pad_token_id=PAD)
    ours = backend.compute_logprobs(batch)
    for i, traj in enumerate(trajs):  # reference: each sequence alone, no padding, naive log-softmax
        ids = torch.tensor([traj.prompt_ids + traj.response_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1] / 0.7
        ref = F.log_softmax(logits.double(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        assert torch.allclose(ours[i, : ref.shape[0]].double(), ref, atol=1e-5)


@pytest.mark.parametrize("mode", ["token", "seq", "seq-mean-token-sum-norm"])
def test_gradient_independent_of_micro_batch_split(mode):
    trajs = trajectories()
    grads = []
    for max_tokens, max_rows in [(10_000, 100), (40, 2), (20, 1)]:
        model = tiny_model()
        backend = backend_for(model, max_tokens=max_tokens, max_rows=max_rows, loss_avg_mode=mode, lr=0.0)
        batch = build_train_batch(trajs, pad_token_id=PAD)
        batch.advantages = torch.linspace(-1, 1, batch.size)[:, None] * batch.loss_mask
        batch.old_logprobs = backend.compute_logprobs(batch) - 0.05 * batch.loss_mask  # ratio != 1
        backend.train_step(batch)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().sum() > 0
    for other in grads[1:]:
        assert torch.allclose(grads[0], other, atol=1e-6, rtol=1e-4)


def test_on_policy_needs_no_old_logprob_forward_and_matches_recomputed():
    """One epoch, one mini-batch: detached current logprobs give the same update as recomputed ones."""
    trajs = trajectories()
    updated = []
    for recompute in (False, True):
        model = tiny_model()
        backend = backend_for(model, max_tokens=10_000, max_rows=100)
        assert not backend.recompute_old_logprobs
        batch = build_train_batch(trajs, pad_token_id=PAD)
        batch.advantages = torch.linspace(-1, 1, batch.size)[:, None] * batch.loss_mask
        if recompute:
            batch.old_logprobs = backend.compute_logprobs(batch)
        backend.train_step(batch)
        updated.append(copy.deepcopy(model.state_dict()))
    for name in updated[0]:
        assert torch.allclose(updated[0][name], updated[1][name], atol=1e-6), name


def test_token_budget_split():
    groups = split_by_token_budget([5, 9, 3, 9, 1], max_tokens=18, max_rows=3)
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3, 4]
    lengths = [5, 9, 3, 9, 1]
    for g in groups:
        assert len(g) <= 3 and len(g) * max(lengths[i] for i in g) <= 18


def test_packed_forward_equals_padded():
    """Padding-free packing (one row, restarting position ids) gives the padded path's logprobs and
    gradients; transformers builds a block-diagonal mask from the position ids."""
    batch = build_train_batch(trajectories(), pad_token_id=PAD)
    results = []
    for packed in (False, True):
        model = tiny_model()
        backend = backend_for(model, max_tokens=10_000, max_rows=100)
        logp, _ = backend._forward(model, batch, packed=packed)
        (logp * batch.loss_mask).sum().backward()
        results.append((logp.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (logp_pad, grad_pad), (logp_packed, grad_packed) = results
    mask = batch.loss_mask.bool()
    assert torch.allclose(logp_pad[mask], logp_packed[mask], atol=1e-5)
    assert torch.allclose(grad_pad, grad_packed, atol=1e-5)
