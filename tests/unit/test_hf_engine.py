"""Tests for the generation-engine seam and the in-process transformers engine (HFEngine).

References are computed independently of the engine's cache code: a full forward of the model over the
whole sequence, without any cache, one token at a time.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
from transformers import Qwen2ForCausalLM

from megatron_guided.rollout.engine import (
    Completion,
    FinishReason,
    GenerationEngine,
    GenerationRequest,
    SamplingParams,
)
from megatron_guided.rollout.hf_engine import HFEngine

from tests.conftest import random_qwen2

VOCAB = 64


def _tiny_model(seed: int = 0) -> Qwen2ForCausalLM:
    return random_qwen2(seed=seed, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def model() -> Qwen2ForCausalLM:
    return _tiny_model(0)


def _decode(ids: list[int]) -> str:
    return "".join(chr(97 + i % 26) for i in ids)


def _prompts(n: int, lo: int = 2, hi: int = 20, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, VOCAB, (k,), generator=g).tolist() for k in lens]


def _req(prompt: list[int], n: int, temperature: float = 0.0, **kw) -> GenerationRequest:
    session_id = kw.pop("session_id", None)
    return GenerationRequest(
        prompt_ids=list(prompt),
        sampling=SamplingParams(max_new_tokens=n, temperature=temperature, **kw),
        session_id=session_id,
    )


@torch.inference_mode()
def _full_logits(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] float32 logits of one cache-free forward."""
    return model(input_ids=torch.tensor([ids])).logits[0].float()


@torch.inference_mode()
def _naive_greedy(model, prompt: list[int], n: int, eos: set[int] = frozenset()) -> tuple[list[int], list[float]]:
    ids, toks, lps = list(prompt), [], []
    for _ in range(n):
        logits = _full_logits(model, ids)[-1]
        t = int(logits.argmax())
        toks.append(t)
        lps.append(float(torch.log_softmax(logits, -1)[t]))
        ids.append(t)
        if t in eos:
            break
    return toks, lps


def _ref_logprobs(model, prompt: list[int], tokens: list[int], temperature: float) -> list[float]:
    logits = _full_logits(model, prompt + tokens)[len(prompt) - 1 : -1]
    logp = torch.log_softmax(logits / temperature, -1)
    return logp.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()


# ----------------------------------------------------------------------------------------------------------
# Types
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 4, "temperature": -0.1}, "temperature"),
        ({"max_new_tokens": 4, "top_p": 0.0}, "top_p"),
        ({"max_new_tokens": 4, "top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 4, "top_k": 0}, "top_k"),
        ({"max_new_tokens": 4, "stop": "abc"}, "stop"),
        ({"max_new_tokens": 4, "stop": ("",)}, "stop"),
        ({"max_new_tokens": 4, "seed": 1.5}, "seed"),
    ],
)
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_types_and_protocol(model):
    sp = SamplingParams(max_new_tokens=3, temperature=0.0, stop=("x",), seed=3)
    assert sp.greedy and not SamplingParams(max_new_tokens=3).greedy
    with pytest.raises(AttributeError):
        sp.top_k = 3  # frozen
    assert FinishReason.EOS == "eos" and str(FinishReason.LENGTH) == "length"
    assert isinstance(HFEngine(model), GenerationEngine)


def test_request_validation(model):
    eng = HFEngine(model)
    with pytest.raises(ValueError, match="empty"):
        eng.generate([_req([], 3)])
    with pytest.raises(ValueError, match="outside"):
        eng.generate([_req([VOCAB], 3)])
    with pytest.raises(ValueError, match="decode"):
        eng.generate([_req([1, 2], 3, stop=("a",))])
    with pytest.raises(ValueError, match="twice"):
        eng.generate([_req([1, 2], 3, session_id="s"), _req([3], 3, session_id="s")])
    assert eng.generate([]) == []


# ----------------------------------------------------------------------------------------------------------
# 1-2. Greedy output and log-probs vs the cache-free reference
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("max_batch_size", "max_batch_tokens"),
    [(256, None), (2, None), (256, 40)],  # small limits: continuous batching (refill + merge) paths
)
def test_greedy_matches_naive_reference(model, max_batch_size, max_batch_tokens):
    prompts = _prompts(7, lo=1, hi=17, seed=1)
    news = [12, 3, 9, 1, 15, 6, 10]
    eng = HFEngine(model, eos_token_ids=[], max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens)
    outs = eng.generate([_req(p, n) for p, n in zip(prompts, news, strict=True)])
    assert len({len(p) for p in prompts}) > 3  # padding exercised
    for p, n, out in zip(prompts, news, outs, strict=True):
        ref_toks, ref_lps = _naive_greedy(model, p, n)
        assert out.token_ids == ref_toks
        assert out.logprobs == pytest.approx(ref_lps, abs=1e-5)
        assert out.finish_reason is FinishReason.LENGTH
        assert out.cached_prompt_tokens == 0 and out.weight_version == 0


@pytest.mark.parametrize("max_batch_size", [256, 3])
def test_sampled_logprobs_match_reference(model, max_batch_size):
    prompts = _prompts(6, seed=2)
    eng = HFEngine(model, eos_token_ids=[], max_batch_size=max_batch_size)
    outs = eng.generate([_req(p, 10 + 2 * i, temperature=0.7, seed=i) for i, p in enumerate(prompts)])
    for p, out in zip(prompts, outs, strict=True):
        assert len(out.token_ids) == len(out.logprobs)
        ref = _ref_logprobs(model, p, out.token_ids, 0.7)
        assert out.logprobs == pytest.approx(ref, abs=1e-5)
    # the logprob is at temperature 0.7, not 1.0 (catches a missing temperature)
    ref_t1 = _ref_logprobs(model, prompts[0], outs[0].token_ids, 1.0)
    assert max(abs(a - b) for a, b in zip(outs[0].logprobs, ref_t1, strict=True)) > 1e-3


# ----------------------------------------------------------------------------------------------------------
# 3. Per-request seeds
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_batch_size", [256, 2])
def test_seed_independent_of_batch(model, max_batch_size):
    target = _req([5, 6, 7], 32, temperature=1.0, seed=1234)
    eng = HFEngine(model, eos_token_ids=[], max_batch_size=max_batch_size)
    alone = eng.generate([target])[0]
    others = [_req(p, 20, temperature=0.9, seed=i) for i, p in enumerate(_prompts(6, lo=8, hi=19, seed=3))]
    others[1] = _req(others[1].prompt_ids, 20, temperature=0.0)  # a greedy neighbour
    others[4] = _req(others[4].prompt_ids, 20, temperature=1.0, top_k=3, top_p=0.8, seed=9)  # a filtered one
    in_batch = eng.generate(others[:3] + [target] + others[3:])[3]
    assert in_batch.token_ids == alone.token_ids
    assert in_batch.logprobs == pytest.approx(alone.logprobs, abs=1e-5)
    other_seed = eng.generate([_req([5, 6, 7], 32, temperature=1.0, seed=1235)])[0]
    assert other_seed.token_ids != alone.token_ids


def test_unseeded_requests_reproducible_per_engine_seed(model):
    reqs = [_req([1, 2, 3], 16, temperature=1.0) for _ in range(3)]
    a = [o.token_ids for o in HFEngine(model, eos_token_ids=[], seed=7).generate(reqs)]
    b = [o.token_ids for o in HFEngine(model, eos_token_ids=[], seed=7).generate(reqs)]
    c = [o.token_ids for o in HFEngine(model, eos_token_ids=[], seed=8).generate(reqs)]
    assert a == b
    assert a != c
    assert len({tuple(t) for t in a}) == 3  # each request gets its own seed


# ----------------------------------------------------------------------------------------------------------
# 4. top-k / top-p
# ----------------------------------------------------------------------------------------------------------
def test_topk1_and_tiny_topp_equal_greedy(model):
    prompts = _prompts(4, seed=4)
    eng = HFEngine(model, eos_token_ids=[])
    greedy = eng.generate([_req(p, 12) for p in prompts])
    topk1 = eng.generate([_req(p, 12, temperature=1.3, top_k=1, seed=i) for i, p in enumerate(prompts)])
    topp = eng.generate([_req(p, 12, temperature=1.3, top_p=1e-6, seed=i) for i, p in enumerate(prompts)])
    for g, k, q in zip(greedy, topk1, topp, strict=True):
        assert k.token_ids == g.token_ids
        assert q.token_ids == g.token_ids


def test_topk_and_topp_samples_stay_in_truncated_set(model):
    prompts = _prompts(12, seed=5)
    eng = HFEngine(model, eos_token_ids=[])
    k, temp = 4, 1.5
    outs = eng.generate([_req(p, 16, temperature=temp, top_k=k, seed=i) for i, p in enumerate(prompts)])
    not_argmax = 0
    for p, out in zip(prompts, outs, strict=True):
        logits = _full_logits(model, p + out.token_ids)[len(p) - 1 : -1]
        topk = logits.topk(k, dim=-1).indices
        for t, allowed in zip(out.token_ids, topk, strict=True):
            assert t in allowed.tolist()
            not_argmax += t != int(allowed[0])
    assert not_argmax > 20  # it really sampled

    top_p = 0.6
    outs = eng.generate([_req(p, 16, temperature=temp, top_p=top_p, seed=i) for i, p in enumerate(prompts)])
    for p, out in zip(prompts, outs, strict=True):
        logits = _full_logits(model, p + out.token_ids)[len(p) - 1 : -1]
        probs = torch.softmax(logits / temp, -1)
        for t, row in zip(out.token_ids, probs, strict=True):
            sorted_p, order = row.sort(descending=True)
            exclusive = sorted_p.cumsum(0) - sorted_p
            nucleus = order[exclusive < top_p + 1e-6].tolist()
            assert t in nucleus


def test_sampling_distribution_matches_softmax(model):
    prompt = [3, 1, 4, 1, 5]
    n = 3000
    eng = HFEngine(model, eos_token_ids=[])
    outs = eng.generate([_req(prompt, 1, temperature=1.0, seed=i) for i in range(n)])
    counts = torch.bincount(torch.tensor([o.token_ids[0] for o in outs]), minlength=VOCAB).float()
    probs = torch.softmax(_full_logits(model, prompt)[-1], -1)
    tv = 0.5 * (counts / n - probs).abs().sum()
    assert tv < 0.08, tv


# ----------------------------------------------------------------------------------------------------------
# 5. EOS, stop strings, length
# ----------------------------------------------------------------------------------------------------------
def test_eos_stop_and_length(model):
    prompt = [2, 7, 1, 8, 2, 8]
    ref, ref_lps = _naive_greedy(model, prompt, 24)
    # EOS: the first token that does not occur earlier in the reference, at index >= 3.
    j = next(i for i in range(3, len(ref)) if ref[i] not in ref[:i])
    eng = HFEngine(model, eos_token_ids={ref[j]}, decode=_decode)
    out = eng.generate([_req(prompt, 24)])[0]
    assert out.finish_reason is FinishReason.EOS
    assert out.token_ids == ref[: j + 1]  # EOS included
    assert out.logprobs == pytest.approx(ref_lps[: j + 1], abs=1e-5)

    # Stop string: 3 chars that first occur ending at token j (one char per token).
    text = _decode(ref)
    j = next(i for i in range(4, len(ref)) if text.find(text[i - 2 : i + 1]) == i - 2)
    stop = text[j - 2 : j + 1]
    eng = HFEngine(model, eos_token_ids=[], decode=_decode)
    out, out_len = eng.generate([_req(prompt, 24, stop=("zzzzz", stop)), _req(prompt, 24)])
    assert out.finish_reason is FinishReason.STOP
    assert out.token_ids == ref[: j + 1]  # stop string's tokens kept
    assert _decode(out.token_ids).endswith(stop)
    assert out_len.finish_reason is FinishReason.LENGTH and out_len.token_ids == ref

    # Two chars per token, stop string ends in the middle of a token: the whole token is kept.
    def decode2(ids):
        return "".join(chr(97 + i % 26) + chr(65 + i % 26) for i in ids)

    text2 = decode2(ref)
    j2 = next(i for i in range(2, len(ref)) if text2.find(text2[2 * i - 1 : 2 * i + 1]) == 2 * i - 1)
    eng = HFEngine(model, eos_token_ids=[], decode=decode2)
    out = eng.generate([_req(prompt, 24, stop=(text2[2 * j2 - 1 : 2 * j2 + 1],))])[0]
    assert out.finish_reason is FinishReason.STOP and out.token_ids == ref[: j2 + 1]

    # max_new_tokens
    out = HFEngine(model, eos_token_ids=[]).generate([_req(prompt, 1), _req(prompt, 5)])
    assert [o.token_ids for o in out] == [ref[:1], ref[:5]]
    assert all(o.finish_reason is FinishReason.LENGTH for o in out)


def test_eos_rows_mixed_with_long_rows(model):
    """Rows finishing at different times (compaction) while others keep going stay exact."""
    prompts = _prompts(8, seed=6)
    eos = {int(t) for t in torch.arange(0, VOCAB, 5)}
    eng = HFEngine(model, eos_token_ids=eos, compact_fraction=0.01)
    outs = eng.generate([_req(p, 20) for p in prompts])
    finishes = set()
    for p, out in zip(prompts, outs, strict=True):
        ref, ref_lps = _naive_greedy(model, p, 20, eos)
        assert out.token_ids == ref
        assert out.logprobs == pytest.approx(ref_lps, abs=1e-5)
        finishes.add(out.finish_reason)
        assert out.finish_reason is (FinishReason.EOS if ref[-1] in eos else FinishReason.LENGTH)
    assert finishes == {FinishReason.EOS, FinishReason.LENGTH}
    assert len({len(o.token_ids) for o in outs}) > 2


# ----------------------------------------------------------------------------------------------------------
# 6. Session KV reuse
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_batch_size", [256, 2])
def test_session_reuse_matches_fresh_engine(model, max_batch_size):
    prompts = _prompts(3, lo=3, hi=11, seed=7)
    eng = HFEngine(model, eos_token_ids=[], max_batch_size=max_batch_size)
    fresh = HFEngine(model, eos_token_ids=[])
    turn1 = eng.generate([_req(p, 5 + 3 * i, session_id=f"s{i}") for i, p in enumerate(prompts)])
    assert all(o.cached_prompt_tokens == 0 for o in turn1) and eng.num_sessions == 3

    # turn 2: previous prompt + generated + new "user" tokens (different lengths), plus a session-less row
    users = [[11, 12, 13], [14], [15, 16, 17, 18, 19, 20]]
    full2 = [p + o.token_ids + u for p, o, u in zip(prompts, turn1, users, strict=True)]
    reqs2 = [_req(f, 8, session_id=f"s{i}") for i, f in enumerate(full2)] + [_req([9, 9, 9], 8)]
    turn2 = eng.generate(reqs2)
    expect = fresh.generate([_req(f, 8) for f in full2] + [_req([9, 9, 9], 8)])
    for i, (got, exp) in enumerate(zip(turn2, expect, strict=True)):
        assert got.token_ids == exp.token_ids
        assert got.logprobs == pytest.approx(exp.logprobs, abs=1e-4)
        if i < 3:
            assert got.cached_prompt_tokens == len(prompts[i]) + len(turn1[i].token_ids) - 1
        else:
            assert got.cached_prompt_tokens == 0
    assert turn2[0].token_ids == _naive_greedy(model, full2[0], 8)[0]

    # turn 3: s0 continues, s1 diverges inside the cached prompt, s2 resends a strict prefix of its cache
    full3 = [
        full2[0] + turn2[0].token_ids + [21, 22],
        full2[1][:4] + [23, 24, 25],
        full2[2][:6],
    ]
    turn3 = eng.generate(
        [_req(f, 7, temperature=0.7, seed=i, session_id=f"s{i}") for i, f in enumerate(full3)]
    )
    expect3 = fresh.generate([_req(f, 7, temperature=0.7, seed=i) for i, f in enumerate(full3)])
    for got, exp in zip(turn3, expect3, strict=True):
        assert got.token_ids == exp.token_ids
        assert got.logprobs == pytest.approx(exp.logprobs, abs=1e-4)
    assert turn3[0].cached_prompt_tokens == len(full2[0]) + len(turn2[0].token_ids) - 1
    assert turn3[1].cached_prompt_tokens == 4 + (full2[1][4] == 23)
    assert turn3[2].cached_prompt_tokens == 5  # at least one prompt token is always fed

    eng.release_session("s0")
    again = eng.generate([_req(full3[0], 3, session_id="s0")])[0]
    assert again.cached_prompt_tokens == 0
    eng.flush_cache()
    assert eng.num_sessions == 0


def test_session_prefix_of_other_rows_with_sampling_and_eos(model):
    """Sessions with EOS-terminated turns, sampled, and a brand-new session in the same batch."""
    eos = {int(t) for t in torch.arange(0, VOCAB, 7)}
    eng = HFEngine(model, eos_token_ids=eos, max_batch_size=4)
    fresh = HFEngine(model, eos_token_ids=eos)
    prompts = _prompts(4, lo=2, hi=9, seed=8)
    turn1 = eng.generate([_req(p, 12, temperature=1.0, seed=i, session_id=f"a{i}") for i, p in enumerate(prompts)])
    full2 = [p + o.token_ids + [30, 31] for p, o in zip(prompts, turn1, strict=True)]
    reqs = [_req(f, 10, temperature=0.8, seed=10 + i, session_id=f"a{i}") for i, f in enumerate(full2)]
    reqs.append(_req([1, 2, 3, 4], 10, temperature=0.8, seed=99, session_id="new"))
    got = eng.generate(reqs)
    exp = fresh.generate([_req(r.prompt_ids, 10, temperature=0.8, seed=r.sampling.seed) for r in reqs])
    for g, e in zip(got, exp, strict=True):
        assert g.token_ids == e.token_ids and g.finish_reason == e.finish_reason
        assert g.logprobs == pytest.approx(e.logprobs, abs=1e-4)
    assert [g.cached_prompt_tokens for g in got] == [
        len(p) + len(o.token_ids) - 1 for p, o in zip(prompts, turn1, strict=True)
    ] + [0]


def test_sdpa_attention_and_bf16(model):
    """The prepared 4-D mask also drives SDPA; in bf16, padded batches and session splices stay finite."""
    prompts = _prompts(5, lo=1, hi=15, seed=11)
    eager = HFEngine(model, eos_token_ids=[])
    sdpa_model = Qwen2ForCausalLM._from_config(model.config, attn_implementation="sdpa").eval()
    sdpa_model.load_state_dict(model.state_dict())
    sdpa = HFEngine(sdpa_model, eos_token_ids=[])
    t1a = eager.generate([_req(p, 6, session_id=str(i)) for i, p in enumerate(prompts)])
    t1b = sdpa.generate([_req(p, 6, session_id=str(i)) for i, p in enumerate(prompts)])
    for a, b in zip(t1a, t1b, strict=True):
        assert a.token_ids == b.token_ids and a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    full = [p + o.token_ids + [1] for p, o in zip(prompts, t1a, strict=True)]
    t2b = sdpa.generate([_req(f, 6, session_id=str(i)) for i, f in enumerate(full)])
    assert all(o.cached_prompt_tokens > 0 for o in t2b)
    for f, b in zip(full, t2b, strict=True):
        assert b.token_ids == _naive_greedy(model, f, 6)[0]

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    eng = HFEngine(bf16, eos_token_ids=[], max_batch_size=3)
    t1 = eng.generate([_req(p, 8, temperature=1.0, seed=i, session_id=str(i)) for i, p in enumerate(prompts)])
    full = [p + o.token_ids + [2, 3] for p, o in zip(prompts, t1, strict=True)]
    t2 = eng.generate([_req(f, 8, temperature=1.0, seed=i, session_id=str(i)) for i, f in enumerate(full)])
    for out in t1 + t2:
        lp = torch.tensor(out.logprobs)
        assert torch.isfinite(lp).all() and (lp <= 0).all()
    # bf16 logprobs are close to a float32 recomputation of the bf16 model's own forward
    ref = _ref_logprobs(bf16, full[0], t2[0].token_ids, 1.0)
    assert t2[0].logprobs == pytest.approx(ref, abs=0.1)


# ----------------------------------------------------------------------------------------------------------
# 7. Weight updates
# ----------------------------------------------------------------------------------------------------------
def test_update_weights(model):
    base = copy.deepcopy(model)
    perturbed = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))

    eng = HFEngine(base, eos_token_ids=[])
    prompts = _prompts(4, seed=9)
    before = eng.generate([_req(p, 10, session_id=f"s{i}") for i, p in enumerate(prompts)])
    assert eng.num_sessions == 4
    ptrs = {n: p.data_ptr() for n, p in base.named_parameters()}

    with pytest.raises(KeyError, match="model.bogus.weight"):
        eng.update_weights([("model.bogus.weight", torch.zeros(1)), ("model.norm.weight", torch.zeros(64))])
    assert eng.weight_version == 0 and eng.num_sessions == 4
    assert torch.equal(base.model.norm.weight, model.model.norm.weight)  # nothing copied
    with pytest.raises(ValueError, match="shape"):
        eng.update_weights([("model.norm.weight", torch.zeros(3))])

    eng.update_weights(perturbed.named_parameters())
    assert eng.weight_version == 1 and eng.num_sessions == 0
    assert {n: p.data_ptr() for n, p in base.named_parameters()} == ptrs  # in place

    reqs = [_req(p + b.token_ids, 10, session_id=f"s{i}") for i, (p, b) in enumerate(zip(prompts, before))]
    reqs += [_req(p, 10, temperature=0.9, seed=i) for i, p in enumerate(prompts)]
    after = eng.generate(reqs)
    expect = HFEngine(perturbed, eos_token_ids=[]).generate(
        [_req(r.prompt_ids, 10, temperature=r.sampling.temperature, seed=r.sampling.seed) for r in reqs]
    )
    for a, e in zip(after, expect, strict=True):
        assert a.token_ids == e.token_ids
        assert a.logprobs == pytest.approx(e.logprobs, abs=1e-5)
        assert a.cached_prompt_tokens == 0  # sessions were flushed
        assert a.weight_version == 1
    old_weights = HFEngine(model, eos_token_ids=[]).generate(reqs[4:])
    assert [a.token_ids for a in after[4:]] != [o.token_ids for o in old_weights]  # the update mattered

    # tied alias accepted
    eng.update_weights([("lm_head.weight", model.lm_head.weight)])
    assert torch.equal(base.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert eng.weight_version == 2


# ----------------------------------------------------------------------------------------------------------
# Throughput (printed, not asserted)
# ----------------------------------------------------------------------------------------------------------
def test_throughput_print(model):
    prompts = _prompts(128, lo=8, hi=32, seed=10)
    eng = HFEngine(model, eos_token_ids=[])
    reqs = [_req(p, 64, temperature=1.0, seed=i) for i, p in enumerate(prompts)]
    eng.generate(reqs[:2])  # warm-up
    t0 = time.perf_counter()
    outs: list[Completion] = eng.generate(reqs)
    dt = time.perf_counter() - t0
    n = sum(len(o.token_ids) for o in outs)
    assert n == 128 * 64
    print(f"\nHFEngine throughput: {n} tokens in {dt:.3f}s = {n / dt:,.0f} tok/s (128 req x 64 new, tiny Qwen2)")
