"""SGLangEngine against a real SGLang 0.5.23 server on 127.0.0.1 (CPU engine, the tiny local model).

One server for the whole module (started once, ~20 s); the last test kills it. Needs the SGLang venv
(SGLANG_PYTHON, see the README); skipped otherwise."""

from __future__ import annotations

import copy
import importlib.util
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_guided.config import ActorConfig, AlgorithmConfig
from megatron_guided.rollout.engine import FinishReason, GenerationRequest, SamplingParams
from megatron_guided.rollout.hf_engine import HFEngine
from megatron_guided.rollout.plain import plain_rollout
from megatron_guided.rollout.sglang.client import SGLangUnavailableError
from megatron_guided.rollout.sglang.engine import SGLangEngine
from megatron_guided.rollout.sglang.server import SGLangServerError
from megatron_guided.train.batch import build_train_batch
from megatron_guided.train.torch_backend import TorchBackend
from tests.conftest import cpu_sglang_config

pytestmark = [pytest.mark.integration, pytest.mark.sglang]

REPO = Path(__file__).resolve().parents[2]
LOGPROB_TOL = 1e-4  # fp32 on both sides; measured ~5e-7


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sglang")
    served = SGLangEngine.from_config(cpu_sglang_config(), model_path=str(tiny_model_dir), log_dir=tmp / "logs",
                                      weight_sync_dir=tmp / "weight_sync")
    yield served
    served.close()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer, arith_data_dir):
    bench = _load_bench()
    return bench.load_prompts(arith_data_dir, tokenizer, 12)


def hf_engine(model, tokenizer) -> HFEngine:
    return HFEngine(copy.deepcopy(model).eval(), eos_token_ids=[tokenizer.eos_token_id],
                    pad_token_id=tokenizer.pad_token_id, decode=tokenizer.decode)


def greedy(prompt_ids, n=24, **kw) -> GenerationRequest:
    return GenerationRequest(prompt_ids=list(prompt_ids), sampling=SamplingParams(max_new_tokens=n, temperature=0, **kw))


def max_logprob_gap(a, b) -> float:
    return max(abs(x - y) for ca, cb in zip(a, b, strict=True) for x, y in zip(ca.logprobs, cb.logprobs, strict=True))


def test_greedy_generation_matches_the_in_process_engine(engine, tokenizer, tiny_model_dir, prompts):
    """Same weights, greedy: the same tokens and log_softmax log-probs (within LOGPROB_TOL), the same
    finish reasons, stop strings included (the stop-completing token kept)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference = hf_engine(model, tokenizer)
    requests = [greedy(p.prompt_ids) for p in prompts]
    ours, theirs = engine.generate(requests), reference.generate(requests)
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    gap = max_logprob_gap(ours, theirs)
    print(f"max |logprob(sglang) - logprob(hf)| = {gap:.2e}")
    assert gap < LOGPROB_TOL
    assert all(c.finish_reason is FinishReason.LENGTH and c.weight_version == engine.weight_version for c in ours)
    # a stop string taken from the middle of the greedy output: both engines stop on the same token
    stop = tokenizer.decode(theirs[0].token_ids[5:7])
    stop_requests = [greedy(prompts[0].prompt_ids, stop=(stop,))]
    ours_stop, theirs_stop = engine.generate(stop_requests)[0], reference.generate(stop_requests)[0]
    assert ours_stop.finish_reason is theirs_stop.finish_reason is FinishReason.STOP
    assert ours_stop.token_ids == theirs_stop.token_ids and len(ours_stop.token_ids) <= 7


def test_guided_multi_turn_rollout_reuses_the_radix_cache(engine, tokenizer, prompts):
    """Every continuation re-sends the whole dialogue; SGLang serves >= 90% of those tokens from its
    radix cache (sticky routing keeps a sample on its replica)."""
    bench = _load_bench()
    result = bench.guided_batch(engine, tokenizer, prompts, checker=bench.TASKS["arith"][2], max_turns=3,
                                tokens_per_turn=24)
    assert result["guided/turns_mean"] > 1.5  # continuations happened
    assert result["engine/context_tokens_resent"] > 500
    print(f"prefix reuse {result['engine/prefix_reuse']:.3f} of {result['engine/context_tokens_resent']} tokens")
    assert result["engine/prefix_reuse"] >= 0.9


def test_after_a_training_step_and_weight_sync_logprobs_match_the_new_weights(engine, tokenizer, tiny_model_dir,
                                                                              prompts):
    """One real TorchBackend update, synced through /update_weights_from_disk: SGLang's greedy log-probs
    equal the trainer's recomputed log-probs under the new weights (and differ from the old ones)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    actor = ActorConfig(global_batch_size=len(prompts))
    actor.optim.lr = 1e-2
    backend = TorchBackend(model, actor=actor, algorithm=AlgorithmConfig(), temperature=1.0, num_mini_batches=1,
                           total_optimizer_steps=1, max_response_length=24)
    sampling = SamplingParams(max_new_tokens=24, temperature=0)
    before = plain_rollout(engine, prompts, n=1, sampling=sampling, base_seed=1, step=0)
    batch = build_train_batch(before, pad_token_id=tokenizer.pad_token_id)
    batch.advantages = torch.linspace(-1, 1, batch.size)[:, None] * batch.loss_mask
    backend.train_step(batch)

    version = engine.weight_version
    engine.update_weights(backend.export_weights())
    assert engine.weight_version == version + 1
    after = plain_rollout(engine, prompts, n=1, sampling=sampling, base_seed=1, step=0)
    assert all(t.weight_version == version + 1 for t in after)
    new_batch = build_train_batch(after, pad_token_id=tokenizer.pad_token_id)
    trainer_logprobs = backend.compute_logprobs(new_batch)
    mask = new_batch.loss_mask.bool()
    gap = (trainer_logprobs[mask] - new_batch.rollout_logprobs[mask]).abs().max().item()
    moved = (backend.compute_logprobs(batch)[batch.loss_mask.bool()] - batch.rollout_logprobs[batch.loss_mask.bool()])
    print(f"after sync: max |sglang - trainer| = {gap:.2e}; the update moved log-probs by up to "
          f"{moved.abs().max().item():.2e}")
    assert gap < LOGPROB_TOL
    assert moved.abs().max().item() > 100 * LOGPROB_TOL  # the check has teeth: the weights really changed

    # restore the original weights for whoever uses the server next
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    engine.update_weights(original.state_dict().items())


def test_killing_the_server_mid_rollout_gives_a_clear_error(engine, prompts):
    """Last test of the module: SIGKILL the server while a batch is generating; the rollout fails fast
    with an error naming the dead server, and no server process is left."""
    (server,) = engine.servers
    requests = [greedy(p.prompt_ids, n=400) for p in prompts] * 4
    killer = threading.Timer(1.0, lambda: os.killpg(server.pid, signal.SIGKILL))
    killer.start()
    start = time.monotonic()
    with pytest.raises((SGLangServerError, SGLangUnavailableError)) as info:
        engine.generate(requests)
    killer.join()
    elapsed = time.monotonic() - start
    message = str(info.value)
    print(f"error after {elapsed:.1f} s: {message[:300]}")
    assert server.url in message
    assert "exited with code" in message or "failed after" in message
    assert elapsed < 30
    engine.close()
    assert server.process.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(server.pid, 0)


def _load_bench():
    spec = importlib.util.spec_from_file_location("sglang_vs_hf", REPO / "bench" / "sglang_vs_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


