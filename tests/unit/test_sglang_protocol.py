"""The native /generate wire format against responses recorded from a real SGLang 0.5.23 server."""

from __future__ import annotations

import copy

import pytest

from megatron_guided.rollout.engine import FinishReason, GenerationRequest, SamplingParams
from megatron_guided.rollout.sglang.protocol import (
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
