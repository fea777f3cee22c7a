"""Vision-language policies on SGLang: a real SGLang 0.5.23 server (CPU engine) serving a tiny local
Qwen2.5-VL, against the in-process engine (through /generate and, for a multimodal HttpVerifier, the
OpenAI-style /v1/chat/completions), and two guided GRPO steps on the toy visual task with the SGLang
policy (weight-synced) and a multimodal SGLang verifier.

The tiny model is built with patch size 14: SGLang serves Qwen2.5-VL only with the released patch shape
(see ``SGLANG_QWEN2_5_VL_PATCH_DIM``). Needs the SGLang venv (SGLANG_PYTHON, see the README)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText

from megatron_guided.config import load_config
from megatron_guided.models.vision import VisionProcessor
from megatron_guided.rollout.engine import GenerationRequest, SamplingParams
from megatron_guided.rollout.hf_engine import HFEngine
from megatron_guided.rollout.sglang.engine import SGLangEngine
from megatron_guided.train.main import build_trainer
from tests.conftest import cpu_sglang_config
from tests.integration.test_sglang_grpo import pids_serving, sglang_overrides, wait_gone
from tools import make_tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.sglang]

LOGPROB_TOL = 1e-4  # fp32 on both sides; measured ~1e-6


@pytest.fixture(scope="module")
def vl14_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny-qwen2.5-vl-p14"
    make_tiny_model.main(["--arch", "qwen2_5_vl", "--patch-size", "14", "--corpus-size", "200", "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def served(vl14_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sglang-vl")
    engine = SGLangEngine.from_config(cpu_sglang_config(), model_path=str(vl14_dir), log_dir=tmp / "logs",
                                      weight_sync_dir=tmp / "weight_sync")
    yield engine
    engine.close()


def disc(colour, size) -> Image.Image:
    image = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(image).ellipse([4, 4, size[0] - 4, size[1] - 4], fill=colour)
    return image


def test_images_reach_the_server_expanded_once_and_match_the_in_process_engine(served, vl14_dir):
    """Two images of different grids, two turns of one session: SGLang's greedy tokens and log-probs
    equal the in-process engine's (both expand each image once and place m-RoPE positions the same
    way), the second turn's prefix (images included) comes from the radix cache, and the images
    change the result (they are not dropped)."""
    processor = VisionProcessor.from_pretrained(vl14_dir)
    reference = HFEngine(AutoModelForImageTextToText.from_pretrained(vl14_dir, dtype=torch.float32),
                         tokenizer=processor.tokenizer)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "3+4=?"},
                                             {"type": "image"}]}]
    ids, vision = processor.encode_prompt(messages, [disc((255, 0, 0), (56, 84)), disc((0, 0, 255), (84, 56))])
    assert vision.tokens_per_image(processor.merge_size) == [6, 6]
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)

    turn1 = GenerationRequest(prompt_ids=ids, sampling=greedy, vision=vision, session_id="s")
    ours, theirs = served.generate([turn1])[0], reference.generate([turn1])[0]
    assert ours.token_ids == theirs.token_ids
    gap1 = max(abs(a - b) for a, b in zip(ours.logprobs, theirs.logprobs, strict=True))

    correction = processor.tokenizer("\nCheck 3+4 again.\n", add_special_tokens=False)["input_ids"]
    ids2 = ids + ours.token_ids + correction
    turn2 = GenerationRequest(prompt_ids=ids2, sampling=greedy, vision=vision, session_id="s")
    ours2, theirs2 = served.generate([turn2])[0], reference.generate([turn2])[0]
    assert ours2.token_ids == theirs2.token_ids
    gap2 = max(abs(a - b) for a, b in zip(ours2.logprobs, theirs2.logprobs, strict=True))
    print(f"max |logprob(sglang) - logprob(hf)|: turn 1 {gap1:.2e}, turn 2 {gap2:.2e}; "
          f"turn 2 cached {ours2.cached_prompt_tokens}/{len(ids2)} prompt tokens")
    assert max(gap1, gap2) < LOGPROB_TOL
    assert ours2.cached_prompt_tokens >= len(ids)  # the images' prefix was not recomputed

    _, other = processor.encode_prompt(messages, [disc((0, 255, 0), (56, 84)), disc((255, 255, 0), (84, 56))])
    swapped = served.generate([GenerationRequest(prompt_ids=ids, sampling=greedy, vision=other)])[0]
    assert max(abs(a - b) for a, b in zip(swapped.logprobs, ours.logprobs)) > 1e-3


def test_a_request_whose_images_are_not_expanded_once_is_refused(served, vl14_dir):
    processor = VisionProcessor.from_pretrained(vl14_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "1+1=?"}]}]
    ids, vision = processor.encode_prompt(messages, [disc((255, 0, 0), (56, 56))])
    pad = processor.image_token_id
    doubled = [t for t in ids for _ in range(2 if t == pad else 1)]
    with pytest.raises(ValueError, match=r"image-token runs of lengths \[8\]; the request's images need \[4\]"):
        served.generate([GenerationRequest(prompt_ids=doubled, sampling=SamplingParams(max_new_tokens=2), vision=vision)])


def test_http_verifier_sends_images_to_sglangs_openai_endpoint(served, vl14_dir):
    """A multimodal HttpVerifier against SGLang's own ``/v1/chat/completions`` (images as ``image_url``
    data URLs, SGLang applies the model's chat template): its greedy reply is the in-process multimodal
    ModelVerifier's, and its body, sent with ``logprobs``, is scored on exactly the ModelVerifier's prompt
    (same token count, images expanded once) with the same pixels (same log-probs); other images move them."""
    import asyncio

    import httpx

    from megatron_guided.verifier.base import Turn, VerifierRequest
    from megatron_guided.verifier.http import HttpVerifier
    from megatron_guided.verifier.model import ModelVerifier

    processor = VisionProcessor.from_pretrained(vl14_dir)
    system = "Check the step against the image."
    request = VerifierRequest(problem="Add 3 to the number in the image.", images=[disc((255, 0, 0), (56, 84))],
                              dialogue=[Turn(role="policy", content="Step 1: 7 + 3 = 10.")], sample_id="s0")
    engine = HFEngine(AutoModelForImageTextToText.from_pretrained(vl14_dir, dtype=torch.float32),
                      tokenizer=processor.tokenizer)
    local = ModelVerifier(engine, processor.tokenizer, system_prompt=system, temperature=0.0, max_tokens=12,
                          processor=processor)
    remote = HttpVerifier(served.servers[0].url + "/v1", model=str(vl14_dir), system_prompt=system,
                          temperature=0.0, max_tokens=12, multimodal=True, timeout=60.0)

    async def ask(verifier):
        try:
            return await verifier.verify(request)
        finally:
            await verifier.aclose()

    assert asyncio.run(ask(remote)).raw_text == asyncio.run(ask(local)).raw_text

    def scored(req: VerifierRequest) -> tuple[int, list[float]]:
        body = remote.request_body(req) | {"logprobs": True}
        answer = httpx.post(served.servers[0].url + "/v1/chat/completions", json=body, timeout=60.0).json()
        return answer["usage"]["prompt_tokens"], [t["logprob"] for t in answer["choices"][0]["logprobs"]["content"]]

    prompt_tokens, logprobs = scored(request)
    expected = local.engine_request(request, SamplingParams(max_new_tokens=12, temperature=0.0))
    assert prompt_tokens == len(expected.prompt_ids)
    reference = engine.generate([expected])[0].logprobs
    assert max(abs(a - b) for a, b in zip(logprobs, reference, strict=True)) < LOGPROB_TOL
    _, moved = scored(VerifierRequest(problem=request.problem, dialogue=request.dialogue, sample_id="s1",
                                      images=[disc((0, 200, 0), (56, 84))]))
    assert max(abs(a - b) for a, b in zip(moved, logprobs)) > 1e-3


def test_weight_update_reaches_the_vision_tower_and_the_language_model(served, vl14_dir):
    """The trainer's export (transformers 5 module names) loads into SGLang's Qwen2.5-VL: after
    perturbing every weight, SGLang's log-probs match the in-process engine on the perturbed model."""
    processor = VisionProcessor.from_pretrained(vl14_dir)
    model = AutoModelForImageTextToText.from_pretrained(vl14_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    served.update_weights(model.named_parameters())
    reference = HFEngine(model, tokenizer=processor.tokenizer)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "2+5=?"}]}]
    ids, vision = processor.encode_prompt(messages, [disc((0, 128, 255), (84, 84))])
    request = GenerationRequest(prompt_ids=ids, sampling=SamplingParams(max_new_tokens=8, temperature=0.0),
                                vision=vision)
    ours, theirs = served.generate([request])[0], reference.generate([request])[0]
    assert ours.weight_version == 1 and ours.token_ids == theirs.token_ids
    assert max(abs(a - b) for a, b in zip(ours.logprobs, theirs.logprobs, strict=True)) < LOGPROB_TOL


def test_guided_grpo_on_images_with_sglang_policy_and_multimodal_verifier(vl14_dir, visual_data_dir, tmp_path):
    """Two steps of the tiny visual guided run with SGLang serving the policy (weight-synced after step 1)
    and a multimodal model verifier: the trainer's log-probs of the image-bearing multi-turn trajectories
    equal SGLang's sampling log-probs on both steps, and no server is left behind."""
    before = pids_serving(vl14_dir)
    cfg = load_config([
        "config=examples/tiny_vl_cpu_guided.yaml",
        f"data.train_files={visual_data_dir / 'train.jsonl'}", f"data.val_files={visual_data_dir / 'test.jsonl'}",
        "data.max_response_length=24", "data.rollout_batch_size=2", "worker.actor.global_batch_size=2",
        f"worker.actor.model.model_path={vl14_dir}", "worker.rollout.n=4",
        "worker.rollout.engine=sglang", "worker.rollout.sglang.device=cpu", "worker.rollout.sglang.dtype=float32",
        "worker.rollout.sglang.mem_fraction_static=0.05", "worker.rollout.sglang.extra_args=[--max-total-tokens,65536]",
        "worker.rollout.verifier.type=model", "worker.rollout.verifier.engine=sglang",
        "worker.rollout.verifier.multimodal=true", f"worker.rollout.verifier.model_path={vl14_dir}",
        "worker.rollout.verifier.sglang.device=cpu", "worker.rollout.verifier.sglang.dtype=float32",
        "worker.rollout.verifier.sglang.mem_fraction_static=0.05",
        "worker.rollout.verifier.sglang.extra_args=[--max-total-tokens,65536]",
        "worker.rollout.verifier.prompt_template=examples/verifier_prompt_tiny.txt",
        "worker.rollout.verifier.max_tokens=16", "worker.rollout.verifier.guided_fraction=1.0",
        "worker.rollout.verifier.guide_when=always", "worker.rollout.verifier.max_tokens_per_turn=16",
        "trainer.max_steps=2", "trainer.val_freq=-1", "trainer.val_before_train=false", "trainer.num_threads=1",
        f"trainer.output_dir={tmp_path / 'out'}", f"trainer.save_checkpoint_path={tmp_path / 'ckpt'}",
        "trainer.save_freq=-1", "trainer.logger=[file]",
        *sglang_overrides("worker.rollout.sglang"), *sglang_overrides("worker.rollout.verifier.sglang")])
    trainer = build_trainer(cfg)
    trainer.fit()

    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        print({k: m[k] for k in ("verifier/calls", "guided/turns_mean", "engine/prefix_reuse",
                                 "actor/rollout_logprob_abs_diff")})
        assert m["verifier/calls"] > 0 and m["guided/turns_mean"] > 1.0
        assert abs(m["actor/rollout_logprob_abs_diff"]) < 1e-3  # rollout log-probs are the trainer's
    assert not wait_gone(pids_serving(vl14_dir) - before), "SGLang processes left after the run"
