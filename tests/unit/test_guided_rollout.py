"""The guided loop on the toy task: dialogue structure at the token level, budgets, guidance
policies, verifier failures, and the loss mask (verifier tokens get no gradient).

The policy here is a scripted `GenerationEngine` (replays fixed texts, reports their logprobs), so
that each dialogue is known exactly; the verifier is the real step checker; the tokenizer and chat
template are the project's real tiny ones. The real-model end-to-end path is in tests/integration.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_guided.config import VerifierConfig
from megatron_guided.data.dataset import PromptSample
from megatron_guided.rollout.batcher import AsyncBatchGenerator
from megatron_guided.rollout.engine import Completion, FinishReason, SamplingParams
from megatron_guided.rollout.guided import ChatDelta, GuidedRollout, has_final_answer, hallucination_score
from megatron_guided.rollout.trajectory import TrajectoryStatus
from megatron_guided.train.batch import build_train_batch
from megatron_guided.train.torch_backend import token_logprobs
from megatron_guided.verifier.base import VerdictKind, VerifierReply
from megatron_guided.verifier.function import FunctionVerifier

PROBLEM = "Compute ((47+5)-3)+8."
RIGHT = "Step 1: 47+5=52\nStep 2: 52-3=49\nStep 3: 49+8=57\n<answer>\\boxed{57}</answer>"
WRONG = "Step 1: 47+5=52\nStep 2: 52-3=48\nStep 3: 48+8=56\n<answer>\\boxed{56}</answer>"


class ScriptedPolicy:
    """Replays texts per session in order (then repeats the last); logprob of token i is -0.01·(i+1)."""

    def __init__(self, tokenizer, scripts: dict[int, list[str]]):
        self.tokenizer, self.scripts, self.weight_version = tokenizer, scripts, 0
        self.calls: list[tuple[str, list[int]]] = []

    def generate(self, requests):
        out = []
        for req in requests:
            k = int(req.session_id.rsplit("-k", 1)[1])
            turn = sum(1 for sid, _ in self.calls if sid == req.session_id)
            self.calls.append((req.session_id, list(req.prompt_ids)))
            script = self.scripts[k]
            ids = self.tokenizer(script[min(turn, len(script) - 1)], add_special_tokens=False)["input_ids"]
            ids = ids[: req.sampling.max_new_tokens - 1] + [self.tokenizer.eos_token_id]
            reason = FinishReason.EOS
            if len(ids) > req.sampling.max_new_tokens:
                ids, reason = ids[: req.sampling.max_new_tokens], FinishReason.LENGTH
            out.append(Completion(token_ids=ids, logprobs=[-0.01 * (i + 1) for i in range(len(ids))],
                                  finish_reason=reason, cached_prompt_tokens=0, weight_version=0))
        return out

    def release_session(self, session_id):
        pass

    def flush_cache(self):
        pass

    def update_weights(self, named_tensors):
        pass


class BrokenVerifier:
    async def verify(self, request):
        return VerifierReply(kind=VerdictKind.FAILED, error="HTTP 503 after 3 attempts")

    async def aclose(self):
        pass


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def prompt_sample(tokenizer) -> PromptSample:
    messages = [{"role": "user", "content": PROBLEM}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return PromptSample(index=0, source="t:1", messages=messages, ground_truth="57",
                        prompt_ids=tokenizer(ids, add_special_tokens=False)["input_ids"])


def rollout(tokenizer, scripts, *, verifier=None, **cfg_overrides) -> tuple[GuidedRollout, ScriptedPolicy]:
    cfg = VerifierConfig(**({"enable": True, "max_turns": 4, "max_trajectory_tokens": 400} | cfg_overrides))
    policy = ScriptedPolicy(tokenizer, scripts)
    guided = GuidedRollout(
        generator=AsyncBatchGenerator(policy), verifier=verifier or FunctionVerifier.from_config(cfg), cfg=cfg,
        delta=ChatDelta(tokenizer=tokenizer, end_of_turn_id=tokenizer.eos_token_id),
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True), max_response_length=100)
    return guided, policy


def run(guided, tokenizer, n, **kwargs):
    sampling = SamplingParams(max_new_tokens=100, temperature=1.0)
    return asyncio.run(guided.run([prompt_sample(tokenizer)], n=n, sampling=sampling, base_seed=1, step=0,
                                  show_reference=True, **kwargs))


def test_correction_is_a_token_level_user_turn(tokenizer):
    guided, policy = rollout(tokenizer, {0: [WRONG, RIGHT]})
    (traj,) = run(guided, tokenizer, n=1)
    assert traj.guided and traj.status is TrajectoryStatus.COMPLETED
    assert traj.num_turns == 2 and traj.num_corrections == 1
    first, second = traj.policy_turn_spans()
    context = traj.response_ids[first[1] : second[0]]
    rendered = tokenizer.decode(context)
    assert rendered.startswith("\n<|im_start|>user\nCheck step 2") and rendered.endswith("<|im_start|>assistant\n")
    assert "[SCORE]" not in rendered and "49" not in rendered and "57" not in rendered  # no answer leaked
    assert traj.hallucination_flags == [1, 1]  # parsed from the correction and from the STOP reply
    # The whole sequence equals rendering the dialogue with the chat template: nothing re-tokenised.
    dialogue = [{"role": "user", "content": PROBLEM}, {"role": "assistant", "content": WRONG},
                {"role": "user", "content": rendered.split("user\n", 1)[1].split("<|im_end|>")[0]},
                {"role": "assistant", "content": RIGHT}]
    full = tokenizer.apply_chat_template(dialogue, tokenize=False).rstrip("\n")
    assert tokenizer.decode(traj.prompt_ids + traj.response_ids) == full
    # The second request re-sent exactly the trajectory so far (the engine can reuse its cache).
    assert policy.calls[1][1] == traj.prompt_ids + traj.response_ids[: second[0]]


def test_trained_tokens_are_the_sampled_policy_tokens_with_their_logprobs(tokenizer):
    guided, _ = rollout(tokenizer, {0: [WRONG, RIGHT]})
    (traj,) = run(guided, tokenizer, n=1)
    batch = build_train_batch([traj], pad_token_id=tokenizer.pad_token_id)
    trained = batch.input_ids[0, 1:][batch.loss_mask[0] == 1]
    expected = [tokenizer(WRONG, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
                tokenizer(RIGHT, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    assert trained.tolist() == expected[0] + expected[1]
    logprobs = batch.rollout_logprobs[0][batch.loss_mask[0] == 1]
    reference = [-0.01 * (i + 1) for i in range(len(expected[0]))] + [-0.01 * (i + 1) for i in range(len(expected[1]))]
    assert torch.allclose(logprobs, torch.tensor(reference))


def test_verifier_tokens_receive_no_gradient(tokenizer, tiny_model_dir):
    """d loss / d logits is zero at every position whose target is a verifier/template token."""
    guided, _ = rollout(tokenizer, {0: [WRONG, RIGHT]})
    (traj,) = run(guided, tokenizer, n=1)
    batch = build_train_batch([traj], pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    logits = model(input_ids=batch.input_ids).logits.detach().requires_grad_(True)
    logp, _ = token_logprobs(logits, batch.input_ids, temperature=1.0)
    loss = -(logp * batch.loss_mask).sum() / batch.loss_mask.sum()
    loss.backward()
    per_position = logits.grad[0, :-1].abs().sum(-1)
    context = batch.loss_mask[0] == 0
    assert per_position[context].max() == 0
    assert (per_position[~context] > 0).all()
    assert context.sum() > 20  # the prompt and the correction really are in the sequence


def test_right_first_time_stops_and_final_turn_scope(tokenizer):
    guided, _ = rollout(tokenizer, {0: [RIGHT], 1: [WRONG, RIGHT]}, train_scope="final_turn")
    right, corrected = run(guided, tokenizer, n=2)
    assert right.num_turns == 1 and right.num_corrections == 0 and right.status is TrajectoryStatus.COMPLETED
    assert len(corrected.policy_turn_spans()) == 1  # only the final turn stays trainable
    assert corrected.num_turns == 2


def test_budgets_end_the_dialogue(tokenizer):
    guided, _ = rollout(tokenizer, {0: [WRONG]})  # never fixes it
    (traj,) = run(guided, tokenizer, n=1)
    assert traj.num_turns == 4 and traj.status is TrajectoryStatus.COMPLETED  # max_turns, answer present
    guided, _ = rollout(tokenizer, {0: ["Step 1: 47+5=52"]}, max_trajectory_tokens=60)
    (traj,) = run(guided, tokenizer, n=1)
    assert traj.status is TrajectoryStatus.TRUNCATED and len(traj.response_ids) <= 60


def test_max_corrections_and_guided_fraction(tokenizer):
    guided, _ = rollout(tokenizer, {k: [WRONG, RIGHT] for k in range(4)}, guided_fraction=0.5, max_corrections=0)
    trajs = run(guided, tokenizer, n=4)
    assert [t.guided for t in trajs] == [False, False, True, True]
    assert all(t.num_turns == 1 and t.num_corrections == 0 for t in trajs)  # answer stands, no verifier


def test_group_failed_slots(tokenizer):
    guided, _ = rollout(tokenizer, {k: [WRONG, RIGHT] for k in range(4)}, guided_fraction=0.5)
    second = run(guided, tokenizer, n=4, slots=[2, 3], failed_groups=set())
    assert [t.extra["slot"] for t in second] == [2, 3] and not any(t.guided for t in second)
    guided, _ = rollout(tokenizer, {k: [WRONG, RIGHT] for k in range(4)}, guided_fraction=0.5)
    second = run(guided, tokenizer, n=4, slots=[2, 3], failed_groups={0})
    assert all(t.guided and t.num_turns == 2 for t in second)


@pytest.mark.parametrize("on_failure, status, turns", [
    ("continue_unguided", TrajectoryStatus.COMPLETED, 2), ("stop", TrajectoryStatus.ABORTED, 1)])
def test_verifier_failure_policy(tokenizer, on_failure, status, turns):
    guided, _ = rollout(tokenizer, {0: ["Step 1: 47+5=52", RIGHT]}, verifier=BrokenVerifier(), on_failure=on_failure)
    (traj,) = run(guided, tokenizer, n=1)
    assert traj.status is status and traj.num_turns == turns and traj.verifier_failures >= 1
    assert guided.stats.verifier_failures >= 1


def test_verifier_failure_can_abort(tokenizer):
    from megatron_guided.rollout.guided import VerifierUnavailableError

    guided, _ = rollout(tokenizer, {0: [WRONG]}, verifier=BrokenVerifier(), on_failure="fail")
    with pytest.raises(VerifierUnavailableError, match="503"):
        run(guided, tokenizer, n=1)


def test_helpers():
    assert has_final_answer("x < answer >\\boxed{3}</ answer>") and not has_final_answer("\\boxed{3}")
    traj = type("T", (), {"hallucination_flags": []})()
    assert hallucination_score(traj, default=0.5) == 0.5
    traj.hallucination_flags = [1, 0, 1, 1]
    assert hallucination_score(traj, default=0.5) == 0.75
    json.dumps({"ok": True})
