"""ModelVerifier: prompt rendering through the chat template, micro-batched generation, parsing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from megatron_guided.config import VerifierConfig
from megatron_guided.data.toy_arith import make_dataset
from megatron_guided.models.tiny import build_tiny_qwen2, build_tokenizer, save_tiny
from megatron_guided.rollout.engine import Completion, FinishReason, GenerationRequest, SamplingParams
from megatron_guided.verifier.base import Turn, VerdictKind, Verifier, VerifierRequest, parse_verifier_text
from megatron_guided.verifier.model import ModelVerifier

PROBLEM = "Compute ((47+5)-3)+8."


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer([row["solution"] + row["problem"] for row in make_dataset(20, seed=0)])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer) -> Path:
    model = build_tiny_qwen2(tokenizer, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                             intermediate_size=64, max_position_embeddings=4096)
    with torch.no_grad():  # the default 0.02 init makes greedy decoding repeat one token forever
        torch.manual_seed(0)
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.2)
    return Path(save_tiny(model, tokenizer, tmp_path_factory.mktemp("verifier") / "tiny-verifier"))


def _request(reference: str | None = "57") -> VerifierRequest:
    return VerifierRequest(problem=PROBLEM, reference_answer=reference, dialogue=[
        Turn(role="policy", content="Step 1: 47+5=52"),
        Turn(role="verifier", content="Continue with the next step."),
        Turn(role="policy", content="Step 2: 52-3=48"),
    ])


class ScriptedEngine:
    """Answers every request with a fixed text; records the prompts and batch sizes it saw."""

    weight_version = 0

    def __init__(self, tokenizer, reply: str):
        self.reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        self.prompts: list[list[int]] = []
        self.seeds: list[int | None] = []
        self.calls: list[int] = []

    def generate(self, requests):
        self.calls.append(len(requests))
        self.prompts += [r.prompt_ids for r in requests]
        self.seeds += [r.sampling.seed for r in requests]
        return [Completion(token_ids=list(self.reply_ids), logprobs=[0.0] * len(self.reply_ids),
                           finish_reason=FinishReason.EOS) for _ in requests]

    def release_session(self, session_id): ...
    def flush_cache(self): ...
    def update_weights(self, named_tensors): ...


def test_prompt_holds_problem_reference_and_both_roles(tokenizer):
    verifier = ModelVerifier(ScriptedEngine(tokenizer, "x"), tokenizer)
    text = verifier.render_prompt(_request())
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert PROBLEM in text and "### Reference answer\n57" in text
    assert "Student: Step 1: 47+5=52" in text and "You: Continue with the next step." in text
    assert "Student: Step 2: 52-3=48" in text and "###STOP###" in text  # stop token filled into the system prompt
    assert "Reference answer" not in verifier.render_prompt(_request(reference=None))
    assert tokenizer.decode(verifier.prompt_ids(_request())) == text


def test_scripted_reply_is_parsed_and_concurrent_calls_are_batched(tokenizer):
    engine = ScriptedEngine(tokenizer, "Check step 2 again.\n[SCORE] hallucination_detect=0")
    verifier = ModelVerifier(engine, tokenizer, temperature=0.7, seed=100)
    assert isinstance(verifier, Verifier)

    async def main():
        replies = await asyncio.gather(*(verifier.verify(_request()) for _ in range(8)))
        await verifier.aclose()
        return replies

    replies = asyncio.run(main())
    assert engine.calls == [8] and engine.seeds == list(range(100, 108))
    assert tokenizer.decode(engine.prompts[0]) == verifier.render_prompt(_request())
    for reply in replies:
        assert reply.kind is VerdictKind.GUIDE and reply.guidance == "Check step 2 again."
        assert reply.hallucination_flags == [0] and "<|im_end|>" not in reply.raw_text

    stop = ModelVerifier(ScriptedEngine(tokenizer, "###STOP###\n[SCORE] hallucination_detect=1"), tokenizer)
    reply = asyncio.run(stop.verify(_request()))
    assert reply.kind is VerdictKind.STOP and reply.hallucination_flags == [1]


def test_engine_errors_become_failed_replies(tokenizer):
    class Broken(ScriptedEngine):
        def generate(self, requests):
            raise RuntimeError("CUDA out of memory")

    reply = asyncio.run(ModelVerifier(Broken(tokenizer, "x"), tokenizer).verify(_request()))
    assert reply.kind is VerdictKind.FAILED and "out of memory" in reply.error


def test_end_to_end_with_a_tiny_random_model(tiny_dir: Path, tmp_path: Path):
    prompt_file = tmp_path / "verifier_prompt.txt"
    prompt_file.write_text("Check the student. Reply {stop_token} when done.")
    cfg = VerifierConfig(enable=True, type="model", model_path=str(tiny_dir), prompt_template=str(prompt_file),
                         temperature=0.0, max_tokens=12)
    verifier = ModelVerifier.from_config(cfg, device="cpu")
    assert verifier.system_prompt == "Check the student. Reply ###STOP### when done."

    async def main():
        replies = await asyncio.gather(*(verifier.verify(_request()) for _ in range(3)))
        await verifier.aclose()
        return replies

    replies = asyncio.run(main())
    assert verifier.generator.num_engine_calls == 1
    # what a direct engine call on the rendered prompt gives, decoded and parsed
    direct = verifier.engine.generate([GenerationRequest(prompt_ids=verifier.prompt_ids(_request()),
                                                         sampling=SamplingParams(max_new_tokens=12, temperature=0.0))])
    text = verifier.tokenizer.decode(direct[0].token_ids, skip_special_tokens=True)
    expected = parse_verifier_text(text)
    assert expected.kind is VerdictKind.GUIDE  # a non-degenerate random model writes some text
    for reply in replies:
        assert reply.raw_text == text and reply.latency_s > 0
        assert (reply.kind, reply.guidance, reply.hallucination_flags) == \
            (expected.kind, expected.guidance, expected.hallucination_flags)
