"""The native /generate wire format against responses recorded from a real SGLang 0.5.23 server."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image
from transformers import AutoConfig

from megatron_guided.models.vision import VisionInputs
from megatron_guided.rollout.engine import FinishReason, GenerationRequest, SamplingParams
from megatron_guided.rollout.sglang.engine import image_tokens_of
from megatron_guided.rollout.sglang.protocol import (
    ImageTokens,
    SGLangProtocolError,
    SGLangRequestAborted,
    generate_payload,
    parse_completion,
    parse_weight_version,
)
from tests.servers.sglang_stub import fixture


def test_payload_sends_token_ids_and_sampling_exactly():
    request = GenerationRequest(prompt_ids=[5, 6, 7, 8], sampling=SamplingParams(
        max_new_tokens=4, temperature=0.7, top_p=0.9, top_k=20, stop=("###",), seed=11))
    assert generate_payload(request, vocab_size=264) == {
        "input_ids": [5, 6, 7, 8], "return_logprob": True,
        "sampling_params": {"max_new_tokens": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 20,
                            "stop": ["###"], "no_stop_trim": True, "sampling_seed": 11}}


def test_payload_matches_the_recorded_request_shape():
    """The recorded input_ids request (no seed, no stop, top_k off) is what we send, plus top_p."""
    recorded = fixture("generate_input_ids_logprobs")["request"]["body"]
    request = GenerationRequest(prompt_ids=recorded["input_ids"], sampling=SamplingParams(max_new_tokens=4))
    payload = generate_payload(request)
    assert payload["input_ids"] == recorded["input_ids"] and payload["return_logprob"] is True
    assert payload["sampling_params"] == recorded["sampling_params"] | {"top_p": 1.0}


def test_payload_rejects_ids_outside_the_vocabulary():
    """SGLang 0.5.23 crashes on such an id, so it must never be sent."""
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 264\): \[264, -1\]"):
        generate_payload(GenerationRequest(prompt_ids=[5, 264, -1], sampling=SamplingParams(max_new_tokens=1)),
                         vocab_size=264)
    with pytest.raises(ValueError, match="prompt_ids must not be empty"):
        generate_payload(GenerationRequest(prompt_ids=[], sampling=SamplingParams(max_new_tokens=1)))


def test_parse_recorded_logprob_response():
    response = fixture("generate_input_ids_logprobs")["response"]
    completion = parse_completion(response, prompt_len=4)
    assert completion.token_ids == [76, 655, 295, 151]
    assert completion.logprobs == [-6.967753887176514, -6.450821876525879, -6.907485008239746, -6.733741283416748]
    assert completion.finish_reason is FinishReason.LENGTH
    assert completion.cached_prompt_tokens == 0 and completion.weight_version == 0


def test_parse_recorded_batch_reports_radix_cache_hits():
    first, second = fixture("generate_batch")["response"]
    assert parse_completion(first, prompt_len=3).cached_prompt_tokens == 2
    assert parse_completion(second, prompt_len=2).cached_prompt_tokens == 0


@pytest.mark.parametrize(("finish", "expected"), [
    ({"type": "stop", "matched": 2}, FinishReason.EOS),
    ({"type": "stop", "matched": "###"}, FinishReason.STOP),
    ({"type": "length", "length": 4}, FinishReason.LENGTH),
])
def test_finish_reasons(finish, expected):
    response = copy.deepcopy(fixture("generate_input_ids_logprobs")["response"])
    response["meta_info"]["finish_reason"] = finish
    assert parse_completion(response, prompt_len=4).finish_reason is expected


def test_aborted_request_is_an_error():
    response = copy.deepcopy(fixture("generate_input_ids_logprobs")["response"])
    response["meta_info"]["finish_reason"] = {"type": "abort", "message": "paused"}
    with pytest.raises(SGLangRequestAborted, match="paused"):
        parse_completion(response, prompt_len=4)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda r: r.pop("meta_info"), "no meta_info"),
    (lambda r: r.__setitem__("output_ids", "x"), "output_ids must be a list"),
    (lambda r: r["meta_info"]["output_token_logprobs"].pop(), "3 entries for 4 output_ids"),
    (lambda r: r["meta_info"]["output_token_logprobs"][1].__setitem__(1, 999), r"output_token_logprobs\[1\]"),
    (lambda r: r["meta_info"].__setitem__("cached_tokens", -1), "cached_tokens"),
    (lambda r: r["meta_info"].__setitem__("finish_reason", {"type": "odd"}), "'odd' is not length"),
])
def test_malformed_responses_name_the_field(mutate, message):
    response = copy.deepcopy(fixture("generate_input_ids_logprobs")["response"])
    mutate(response)
    with pytest.raises(SGLangProtocolError, match=message):
        parse_completion(response, prompt_len=4)


def test_weight_versions():
    assert parse_weight_version("default") == 0 and parse_weight_version("7") == 7
    # The recorded update used the free-form version "v2": not one this engine sets, so it is refused.
    assert fixture("generate_after_update")["response"]["meta_info"]["weight_version"] == "v2"
    with pytest.raises(SGLangProtocolError, match="'v2' is not one this engine set"):
        parse_weight_version("v2")


# -- images ------------------------------------------------------------------------------------------------
IMG, VID, START, END = 90, 91, 88, 89
TOKENS = ImageTokens(image_token_id=IMG, merge_size=2, video_token_id=VID)


def two_images() -> VisionInputs:
    """Grids (1, 4, 4) and (1, 2, 4): 4 and 2 image tokens after the 2×2 merge."""
    grid = torch.tensor([[1, 4, 4], [1, 2, 4]])
    return VisionInputs(images=(Image.new("RGB", (8, 8)), Image.new("RGB", (8, 4))),
                        pixel_values=torch.zeros(int(grid.prod(-1).sum()), 6), image_grid_thw=grid)


def test_payload_collapses_each_image_run_for_sglang_to_expand_and_sends_the_images():
    ids = [1, START, *[IMG] * 4, END, 5, START, *[IMG] * 2, END, 6]
    request = GenerationRequest(prompt_ids=ids, sampling=SamplingParams(max_new_tokens=3), vision=two_images())
    payload = generate_payload(request, image_tokens=TOKENS, image_data=["data:a", "data:b"])
    assert payload["input_ids"] == [1, START, IMG, END, 5, START, IMG, END, 6]
    assert payload["image_data"] == ["data:a", "data:b"]
    assert payload["sampling_params"]["stop_token_ids"] == [IMG, VID]


@pytest.mark.parametrize(("runs", "message"), [
    ([8, 4], r"runs of lengths \[8, 4\]; the request's images need \[4, 2\]"),  # expanded twice
    ([1, 1], r"runs of lengths \[1, 1\]"),  # not expanded
    ([4], r"runs of lengths \[4\]"),  # an image missing
])
def test_payload_refuses_images_not_expanded_exactly_once(runs, message):
    ids = [1] + [t for n in runs for t in (START, *[IMG] * n, END)]
    request = GenerationRequest(prompt_ids=ids, sampling=SamplingParams(max_new_tokens=3), vision=two_images())
    with pytest.raises(ValueError, match=message):
        generate_payload(request, image_tokens=TOKENS, image_data=["a", "b"])


def test_payload_refuses_images_for_a_text_model_or_without_their_data():
    ids = [1, START, *[IMG] * 4, END, START, *[IMG] * 2, END]
    request = GenerationRequest(prompt_ids=ids, sampling=SamplingParams(max_new_tokens=3), vision=two_images())
    with pytest.raises(ValueError, match="not a vision-language model"):
        generate_payload(request, image_data=["a", "b"])
    with pytest.raises(ValueError, match="2 images, image_data has 1"):
        generate_payload(request, image_tokens=TOKENS, image_data=["a"])


def test_a_completion_that_emits_an_image_placeholder_ends_without_it():
    response = copy.deepcopy(fixture("generate_input_ids_logprobs")["response"])
    response["output_ids"][-1] = IMG
    response["meta_info"]["output_token_logprobs"][-1][1] = IMG
    response["meta_info"]["finish_reason"] = {"type": "stop", "matched": IMG}
    completion = parse_completion(response, prompt_len=4, placeholders=TOKENS.placeholders)
    assert completion.token_ids == [76, 655, 295] and len(completion.logprobs) == 3
    assert completion.finish_reason is FinishReason.STOP


def test_image_tokens_of_a_served_config(tiny_vl_dir, tiny_model_dir):
    """Text models have none; the tiny VL's 8-pixel patches are refused by name (SGLang runs its
    Qwen2.5-VL vision tower only on 14-pixel patches)."""
    assert image_tokens_of(AutoConfig.from_pretrained(tiny_model_dir)) is None
    config = AutoConfig.from_pretrained(tiny_vl_dir)
    with pytest.raises(ValueError, match=r"vision_config.patch_size=8 gives 384-wide image patches"):
        image_tokens_of(config)
    config.vision_config.patch_size = 14
    assert image_tokens_of(config) == ImageTokens(image_token_id=config.image_token_id, merge_size=2,
                                                  video_token_id=config.video_token_id)
