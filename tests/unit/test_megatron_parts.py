"""Megatron-side pieces that need no process group: vocab-parallel logprobs against the plain
log-softmax, the layout checks, the CPU RNG tracker and the layer-spec choice."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config

from megatron_guided.config import ConfigError, MegatronConfig
from megatron_guided.megatron.layout import check_layout
from megatron_guided.megatron.model import padded_vocab_size, te_available
from megatron_guided.megatron.vocab_parallel import vocab_parallel_logprobs

pytest.importorskip("megatron.core")


def test_logprobs_and_entropy_match_log_softmax_with_padded_vocab():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 12, generator=gen, requires_grad=True)  # vocab 9 real + 3 padded columns
    targets = torch.randint(0, 9, (3, 5), generator=gen)
    logp, entropy = vocab_parallel_logprobs(logits, targets, temperature=0.7, vocab_start=0, vocab_size=9)
    ref_all = torch.log_softmax(logits[..., :9] / 0.7, dim=-1)
    ref_logp = ref_all.gather(-1, targets[..., None]).squeeze(-1)
    ref_entropy = -(ref_all.exp() * ref_all).sum(-1)
    assert torch.allclose(logp, ref_logp, atol=1e-6)
    assert torch.allclose(entropy, ref_entropy, atol=1e-6)
    (logp.sum() + entropy.sum()).backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad[..., 9:] == 0)  # padded columns get no gradient


def test_padded_vocab_rule():
    assert padded_vocab_size(264, divisible_by=128, tp=1) == 384
    assert padded_vocab_size(264, divisible_by=128, tp=2) == 512
    assert padded_vocab_size(256, divisible_by=128, tp=2) == 256


def hf_config(**kw):
    return Qwen2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, **kw)


@pytest.mark.parametrize("mg, message", [
    (MegatronConfig(tp=4), "tp=4 must divide num_attention_heads=4 and num_key_value_heads=2"),
    (MegatronConfig(pp=3), "pp × vpp = 3 must divide num_hidden_layers=4"),
    (MegatronConfig(pp=2, vpp=4), "pp × vpp = 8"),
    (MegatronConfig(tp=2, sequence_parallel=True), "sequence_parallel=True needs GPUs with Transformer Engine"),
    (MegatronConfig(cp=2), "cp=2 needs GPUs with Transformer Engine"),
    (MegatronConfig(fp8="hybrid"), "fp8='hybrid' needs GPUs with Transformer Engine"),
])
def test_layout_checks_name_the_key(mg, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_layout(hf_config(), mg, gpu=False, te=False)


def test_gpu_only_options_pass_with_te_on_gpu():
    check_layout(hf_config(), MegatronConfig(tp=2, sequence_parallel=True, cp=2, fp8="hybrid"), gpu=True, te=True)


def test_spec_and_fp8_config_selection():
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_guided.megatron.layout import ParallelLayout
    from megatron_guided.megatron.model import layer_spec, transformer_config

    assert te_available() is (torch.cuda.is_available() and _te_importable())
    config = transformer_config(hf_config(), ParallelLayout(), fp8="hybrid", fp8_recipe="tensorwise")
    assert (config.fp8, config.fp8_recipe) == ("hybrid", "tensorwise")
    spec = layer_spec(config, use_te=False)
    assert spec.module is TransformerLayer
    if not _te_importable():
        with pytest.raises(Exception):
            layer_spec(config, use_te=True)  # the TE spec needs transformer_engine


def _te_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def test_cpu_rng_tracker_forks_and_restores():
    from megatron_guided.megatron.compat import CpuRngStatesTracker

    tracker = CpuRngStatesTracker()
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(0)
    outside = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork("model-parallel-rng"):
        first = torch.rand(3)
    assert torch.equal(torch.rand(3), outside)  # the default stream is untouched by the fork
    with tracker.fork("model-parallel-rng"):
        second = torch.rand(3)
    assert not torch.equal(first, second)  # the tracked stream advanced
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), first)  # and it was seeded with its own seed
    with pytest.raises(ValueError, match="already tracked"):
        tracker.add("other", 123)


def test_thd_packing_maps_back_to_the_padded_layout():
    from megatron_guided.megatron.packing import pack_rows, unpack

    input_ids = torch.tensor([[5, 6, 7, 8, 0], [9, 10, 0, 0, 0], [11, 12, 13, 14, 15]])
    lens = torch.tensor([4, 2, 5])
    packed = pack_rows(input_ids, lens, multiple=4)
    assert packed.cu_seqlens.tolist() == [0, 4, 8, 16] and packed.max_seqlen == 8
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, *range(8)]
    # a per-position function of (token, next token) computed on the packed row equals the padded one
    code = packed.input_ids[0] * 100 + packed.targets[0]
    out = unpack(code.float(), packed, (3, 4))
    expected = (input_ids[:, :-1] * 100 + input_ids[:, 1:]).float()
    mask = torch.arange(4)[None] < (lens - 1)[:, None]
    assert torch.equal(out[mask], expected[mask]) and torch.all(out[~mask] == 0)


def test_context_parallel_shares_cover_the_sequence_once_and_balance_causal_work():
    from megatron_guided.megatron.packing import context_parallel_index

    shares = [context_parallel_index(16, rank=r, size=2) for r in range(2)]
    assert sorted(torch.cat(shares).tolist()) == list(range(16))
    assert shares[0].tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    work = [int(s.sum()) for s in shares]  # causal attention cost grows with the position
    assert work[0] == work[1]
    with pytest.raises(ValueError, match="multiple of 2 × cp"):
        context_parallel_index(10, rank=0, size=4)


def test_context_parallel_refuses_per_sequence_means():
    with pytest.raises(ConfigError, match="loss_avg_mode=token"):
        check_layout(hf_config(), MegatronConfig(cp=2), gpu=True, te=True, loss_avg_mode="seq")
