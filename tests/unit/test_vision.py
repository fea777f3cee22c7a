"""Vision-language policies on the tiny local Qwen2.5-VL: the processor expands image tokens once,
the engine's sampling logprobs over multi-turn, image-bearing dialogues (session cache reused) equal
the HF model's own forward (which computes m-RoPE itself), and TorchBackend's training logprobs of a
guided trajectory equal its sampling logprobs. Tolerances: fp32 on CPU, 1e-4."""

from __future__ import annotations

import asyncio
import io

import pytest
import torch
from PIL import Image

from megatron_guided.config import DataConfig, VerifierConfig
from megatron_guided.data.dataset import DataError, build_prompt_dataset
from megatron_guided.models.vision import MRoPE, VisionProcessor, load_policy_model
from megatron_guided.rollout.batcher import AsyncBatchGenerator
from megatron_guided.rollout.engine import GenerationRequest, SamplingParams
from megatron_guided.rollout.guided import ChatDelta, GuidedRollout
from megatron_guided.rollout.hf_engine import HFEngine
from megatron_guided.train.batch import build_train_batch
from megatron_guided.verifier.function import FunctionVerifier

TOL = 1e-4
CHECKER = "examples/verifier_function/visual_arith_checker.py:verify"


@pytest.fixture(scope="module")
def processor(tiny_vl_dir):
    return VisionProcessor.from_pretrained(tiny_vl_dir)


@pytest.fixture(scope="module")
def model(tiny_vl_dir):
    torch.manual_seed(0)
    m = load_policy_model(tiny_vl_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():  # sharper than the default init, so that sampled tokens vary and logprobs differ
        for p in m.model.language_model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    return m


@pytest.fixture(scope="module")
def prompts(visual_data_dir, processor):
    return build_prompt_dataset(str(visual_data_dir / "test.jsonl"), DataConfig(max_prompt_length=256),
                                processor.tokenizer, processor=processor)


def hf_logprobs(model, ids: list[int], vision) -> torch.Tensor:
    """log_softmax of the HF model's own forward: no position ids given, so the model derives its m-RoPE
    positions itself from mm_token_type_ids and image_grid_thw. [L, V]"""
    x = torch.tensor([ids])
    mm = (x == model.config.image_token_id).int()
    with torch.no_grad():
        logits = model(input_ids=x, mm_token_type_ids=mm, pixel_values=vision.pixel_values,
                       image_grid_thw=vision.image_grid_thw, use_cache=False).logits[0]
    model.model.rope_deltas = None
    return torch.log_softmax(logits.float(), -1)


def test_processor_expands_each_image_once(processor, prompts, tiny_vl_dir):
    sample = prompts[0]
    (thw,) = sample.vision.image_grid_thw.tolist()
    assert thw == [1, 4, 4]  # a 32×32 image in 8-pixel patches
    assert sample.prompt_ids.count(processor.image_token_id) == 4  # 16 patches / (2×2 merge)
    text = processor.tokenizer.decode(sample.prompt_ids)
    assert text.count("<|vision_start|>") == 1 and "Let N be the number in the image." in text
    assert sample.vision.images[0].size == (32, 32)


def test_pixel_budget_resizes_before_the_image_processor(visual_data_dir, processor):
    cfg = DataConfig(max_prompt_length=256, min_pixels=64 * 64)
    sample = build_prompt_dataset(str(visual_data_dir / "test.jsonl"), cfg, processor.tokenizer, processor=processor)[0]
    assert sample.images[0].size == (64, 64)
    assert sample.vision.image_grid_thw.tolist() == [[1, 8, 8]]
    assert sample.prompt_ids.count(processor.image_token_id) == 16


def test_bytes_and_pil_images_and_unreadable_image(tmp_path, processor):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(buf, format="PNG")
    good = tmp_path / "rows.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"problem": "<image>What?", "answer": "1",
                                          "images": [{"bytes": buf.getvalue(), "path": None}]}]), good)
    (sample,) = build_prompt_dataset(str(good), DataConfig(max_prompt_length=256), processor.tokenizer,
                                     processor=processor)
    assert sample.vision.num_images == 1
    ids, vision = processor.encode_prompt(sample.messages, [Image.new("RGB", (48, 32))])
    assert ids.count(processor.image_token_id) == 6 and vision.image_grid_thw.tolist() == [[1, 4, 6]]
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"problem": "<image>x", "answer": "1", "images": ["nope.png"]}\n')
    with pytest.raises(DataError, match=r"missing\.jsonl:1: key 'images'.*nope\.png"):
        build_prompt_dataset(str(missing), DataConfig(), processor.tokenizer, processor=processor)


def test_engine_multi_turn_logprobs_equal_the_model_forward(model, processor, prompts):
    """Turn 2 reuses the session cache (the images are only in the cached prefix) and decodes with
    next_position + rope delta; every sampled logprob equals the full forward of the final sequence."""
    engine = HFEngine(model, tokenizer=processor.tokenizer)
    samples = list(prompts[:3])
    first = engine.generate([GenerationRequest(prompt_ids=s.prompt_ids, vision=s.vision, session_id=f"s{i}",
                                               sampling=SamplingParams(max_new_tokens=6 + 3 * i, seed=i))
                             for i, s in enumerate(samples)])
    user = processor.tokenizer("<|im_end|>\n<|im_start|>user\nCheck step 1.<|im_end|>\n<|im_start|>assistant\n",
                               add_special_tokens=False)["input_ids"]
    seqs = [s.prompt_ids + c.token_ids + user for s, c in zip(samples, first)]
    second = engine.generate([GenerationRequest(prompt_ids=q, vision=s.vision, session_id=f"s{i}",
                                                sampling=SamplingParams(max_new_tokens=8, seed=10 + i))
                              for i, (s, q) in enumerate(zip(samples, seqs))])
    assert all(c.cached_prompt_tokens >= len(s.prompt_ids) for s, c in zip(samples, second))
    worst = wrong = 0.0
    mrope = MRoPE(model)
    for s, q, c1, c2 in zip(samples, seqs, first, second):
        full = q + c2.token_ids
        ref = hf_logprobs(model, full, s.vision)
        for start, comp in ((len(s.prompt_ids), c1), (len(q), c2)):
            got = torch.tensor(comp.logprobs)
            want = ref[torch.arange(start - 1, start - 1 + len(comp.token_ids)), comp.token_ids]
            worst = max(worst, float((got - want).abs().max()))
        # the same forward with text-style positions (the original's multi-turn bug) is far off
        x = torch.tensor([full])
        with torch.no_grad():
            text_pos = model(input_ids=x, position_ids=torch.arange(len(full))[None], pixel_values=s.vision.pixel_values,
                             image_grid_thw=s.vision.image_grid_thw).logits[0].float().log_softmax(-1)
        wrong = max(wrong, float((text_pos[len(q) - 1:-1] - ref[len(q) - 1:-1]).abs().max()))
        assert mrope.positions(full, s.vision)[1] < 0  # 4 image tokens take 2 positions: δ = -2
    assert worst < TOL, worst
    assert wrong > 100 * TOL, wrong


def test_guided_trajectory_training_logprobs_equal_sampling_logprobs(model, processor, prompts):
    """A guided dialogue with the real visual step checker: several policy turns, verifier turns as
    context, the images in the context throughout. TorchBackend recomputes the policy tokens'
    logprobs from the trajectory (m-RoPE over the whole multi-turn sequence) = the sampled ones."""
    from megatron_guided.config import ActorConfig, AlgorithmConfig
    from megatron_guided.train.torch_backend import TorchBackend

    cfg = VerifierConfig(enable=True, type="function", function=CHECKER, max_turns=3, max_tokens_per_turn=10,
                         max_trajectory_tokens=80, guided_fraction=1.0, guide_when="always")
    tok = processor.tokenizer
    engine = HFEngine(model, tokenizer=tok)
    guided = GuidedRollout(generator=AsyncBatchGenerator(engine), verifier=FunctionVerifier.from_config(cfg),
                           cfg=cfg, delta=ChatDelta(tokenizer=tok, end_of_turn_id=tok.eos_token_id),
                           decode=lambda ids: tok.decode(ids, skip_special_tokens=True), max_response_length=80)
    trajs = asyncio.run(guided.run(list(prompts[:2]), n=2, sampling=SamplingParams(max_new_tokens=10, temperature=1.0),
                                   base_seed=3, step=0, show_reference=True))
    guided.close()
    assert all(t.vision is not None for t in trajs)
    assert max(t.num_turns for t in trajs) >= 2 and guided.stats.verifier_failures == 0
    batch = build_train_batch(trajs, pad_token_id=tok.pad_token_id)
    backend = TorchBackend(model, actor=ActorConfig(), algorithm=AlgorithmConfig(), temperature=1.0,
                           num_mini_batches=1, total_optimizer_steps=1, max_response_length=80)
    logp = backend.compute_logprobs(batch)
    mask = batch.loss_mask.bool()
    diff = (logp - batch.rollout_logprobs)[mask].abs().max()
    assert mask.sum() > 20 and diff < TOL, float(diff)


def test_multimodal_verifier_sees_the_images(model, processor, prompts):
    """verifier.multimodal: a model verifier's request holds the image tokens and the images; an http
    verifier sends them as image_url parts. Text-only verifiers see [IMAGE 1]."""
    from megatron_guided.verifier.base import Turn, VerifierRequest
    from megatron_guided.verifier.http import HttpVerifier
    from megatron_guided.verifier.model import ModelVerifier

    sample = prompts[0]
    request = VerifierRequest(problem="[IMAGE]Let N be the number in the image.", images=list(sample.images),
                              dialogue=[Turn(role="policy", content="Step 1: 47+4=51")])
    engine = HFEngine(model, tokenizer=processor.tokenizer)
    sampling = SamplingParams(max_new_tokens=4)
    seeing = ModelVerifier(engine, processor.tokenizer, processor=processor).engine_request(request, sampling)
    assert seeing.vision is not None and seeing.prompt_ids.count(processor.image_token_id) == 4
    blind = ModelVerifier(engine, processor.tokenizer).engine_request(request, sampling)
    assert blind.vision is None and processor.image_token_id not in blind.prompt_ids
    assert "[IMAGE 1]" in processor.tokenizer.decode(blind.prompt_ids)
    assert len(engine.generate([seeing])[0].token_ids) >= 1
    body = HttpVerifier("http://127.0.0.1:9", multimodal=True).request_body(request)
    parts = body["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text"]
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert "Student: Step 1: 47+4=51" in parts[2]["text"]


def test_engine_takes_saved_checkpoint_names(tiny_vl_dir, model, processor):
    """The Megatron export (and conversion) use saved-checkpoint names (model.layers.*, visual.*); the
    engine maps them onto transformers 5's module names, and every saved tensor has a target."""
    from safetensors.torch import load_file

    from megatron_guided.models.qwen2_5_vl import checkpoint_name

    saved = load_file(tiny_vl_dir / "model.safetensors")
    assert {checkpoint_name(n) for n in model.state_dict()} - {"lm_head.weight"} == set(saved)
    engine = HFEngine(load_policy_model(tiny_vl_dir, dtype=torch.float32).eval(), tokenizer=processor.tokenizer)
    engine.update_weights((n, t * 0.5) for n, t in saved.items())
    assert torch.equal(engine.model.model.visual.patch_embed.proj.weight, saved["visual.patch_embed.proj.weight"] * 0.5)
    assert engine.weight_version == 1


def test_image_placeholders_are_never_sampled(model, processor, prompts):
    """Even when the model puts most of its mass on <|image_pad|>, the engine samples other tokens
    (a generated image token would be read as an image position next turn); the reported logprob is
    still the full distribution's."""
    engine = HFEngine(model, tokenizer=processor.tokenizer)
    head = model.lm_head.weight
    saved = head[processor.image_token_id].clone()
    with torch.no_grad():
        head[processor.image_token_id] = head.abs().max() * 50 * torch.sign(model.model.language_model.norm.weight)
    try:
        (c,) = engine.generate([GenerationRequest(prompt_ids=prompts[0].prompt_ids, vision=prompts[0].vision,
                                                  sampling=SamplingParams(max_new_tokens=6, seed=0))])
        ref = hf_logprobs(model, prompts[0].prompt_ids + c.token_ids, prompts[0].vision)
    finally:
        with torch.no_grad():
            head[processor.image_token_id] = saved
    assert processor.image_token_id not in c.token_ids
    n = len(prompts[0].prompt_ids)
    want = ref[torch.arange(n - 1, n - 1 + len(c.token_ids)), c.token_ids]
    assert (torch.tensor(c.logprobs) - want).abs().max() < TOL
    assert float(ref[n - 1, processor.image_token_id].exp()) > 0.5  # the banned token really was the favourite
