"""Tests for the locally built tokenizer + tiny Qwen2 model (megatron_guided.models.tiny)."""

from __future__ import annotations

import importlib.util
import json
import string
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_guided.data.toy_arith import make_dataset
from megatron_guided.models.tiny import (
    EOS_TOKEN,
    IM_START_TOKEN,
    MULTI_CHAR_TOKENS,
    PAD_TOKEN,
    build_tiny_qwen2,
    build_tokenizer,
    count_parameters,
    save_tiny,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _examples():
    return make_dataset(100, difficulty="easy", seed=11) + make_dataset(100, difficulty="med", seed=12)


@pytest.fixture(scope="module")
def corpus():
    ex = make_dataset(500, difficulty="easy", seed=0) + make_dataset(500, difficulty="med", seed=1)
    return [e["problem"] for e in ex] + [e["solution"] for e in ex] + [string.printable]


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return build_tokenizer(corpus)


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_qwen2(tokenizer, seed=0)


@pytest.fixture(scope="module")
def saved_dir(model, tokenizer, tmp_path_factory):
    return Path(save_tiny(model, tokenizer, tmp_path_factory.mktemp("tiny") / "tiny-qwen2"))


# ----------------------------------------------------------------------------- tokenizer


def test_special_tokens(tokenizer):
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.convert_tokens_to_ids([PAD_TOKEN, IM_START_TOKEN, EOS_TOKEN]) == [0, 1, 2]
    assert tokenizer.bos_token is None  # Qwen2 style: nothing prepended
    assert tokenizer("abc")["input_ids"] == tokenizer.convert_tokens_to_ids(["a", "b", "c"])
    for tok in (PAD_TOKEN, IM_START_TOKEN, EOS_TOKEN):
        assert len(tokenizer(tok)["input_ids"]) == 1
    assert len(tokenizer) == 264  # 3 special + 256 byte symbols + 5 multi-char tokens


def test_round_trip(tokenizer):
    texts = []
    for ex in _examples():
        texts += [ex["problem"], ex["solution"], ex["problem"] + "\n" + ex["solution"]]
    texts += [string.printable, "  two  spaces\n\n\nnewlines\ttab ", "unicode: é×−√ 你好 🙂", ""]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text, text
    # batch decode and skip_special_tokens keep the text too
    ids = tokenizer([ex["solution"] for ex in _examples()[:8]])["input_ids"]
    assert tokenizer.batch_decode(ids, skip_special_tokens=True) == [ex["solution"] for ex in _examples()[:8]]


def test_multi_char_tokens_are_single_ids(tokenizer):
    for tok in MULTI_CHAR_TOKENS:
        ids = tokenizer(tok)["input_ids"]
        assert len(ids) == 1, tok
        assert tokenizer.convert_ids_to_tokens(ids) == [tok]
    ex = make_dataset(1, difficulty="easy", seed=0)[0]
    toks = tokenizer.convert_ids_to_tokens(tokenizer(ex["problem"] + "\n" + ex["solution"])["input_ids"])
    assert toks[0] == "Compute "
    assert toks.count("Step ") == 3
    assert toks[-(len(ex["answer"]) + 4) :] == ["<answer>", "\\boxed{", *ex["answer"], "}", "</answer>"]


def test_no_unknown_on_task_text(tokenizer, corpus):
    assert tokenizer.unk_token is None  # byte-level: every character is encodable
    small = build_tokenizer(corpus, full_byte_alphabet=False)
    assert len(small) < len(tokenizer)
    vocab = tokenizer.get_vocab()
    for ex in _examples():
        for text in (ex["problem"], ex["solution"]):
            for tok in (tokenizer, small):
                ids = tok(text)["input_ids"]
                assert all(0 <= i < len(tok) for i in ids)
                assert tok.decode(ids) == text  # nothing dropped
            # char-level: one id per character, apart from the multi-char tokens
            n_multi = sum(text.count(m) * (len(m) - 1) for m in MULTI_CHAR_TOKENS)
            assert len(tokenizer(text)["input_ids"]) == len(text) - n_multi
    assert {"Step ", "<answer>"} <= set(vocab)


def test_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "Answer step by step."},
        {"role": "user", "content": "Compute ((47+5)-3)+8."},
    ]
    expected = (
        "<|im_start|>system\nAnswer step by step.<|im_end|>\n"
        "<|im_start|>user\nCompute ((47+5)-3)+8.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected[: -len("<|im_start|>assistant\n")]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == tokenizer(expected)["input_ids"]
    assert ids.count(tokenizer.eos_token_id) == 2 and ids.count(1) == 3


# ----------------------------------------------------------------------------- model


def test_model_config(model, tokenizer):
    n = count_parameters(model)
    assert 0.8e6 <= n <= 1.3e6, n
    cfg = model.config
    assert cfg.vocab_size == len(tokenizer)
    assert cfg.eos_token_id == tokenizer.eos_token_id == model.generation_config.eos_token_id
    assert cfg.pad_token_id == tokenizer.pad_token_id == model.generation_config.pad_token_id
    assert cfg.bos_token_id == model.generation_config.bos_token_id == 0
    assert cfg._attn_implementation == "eager"
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    assert model.dtype == torch.float32


def test_same_seed_same_weights(tokenizer, model):
    other = build_tiny_qwen2(tokenizer, seed=0)
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k


def test_save_load_round_trip(model, tokenizer, saved_dir):
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ):
        assert (saved_dir / name).is_file(), name
    tok_cfg = json.loads((saved_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == tokenizer.chat_template
    gen_cfg = json.loads((saved_dir / "generation_config.json").read_text())
    assert gen_cfg["eos_token_id"] == tokenizer.eos_token_id

    tok2 = AutoTokenizer.from_pretrained(saved_dir)
    model2 = AutoModelForCausalLM.from_pretrained(saved_dir)
    model2.eval()
    assert model2.config._attn_implementation == "eager"
    assert model2.dtype == torch.float32
    assert model2.generation_config.eos_token_id == tok2.eos_token_id == tokenizer.eos_token_id

    texts = [ex["problem"] + "\n" + ex["solution"] for ex in _examples()[:6]]
    texts.append(string.printable + "é×🙂")
    assert len(tok2) == len(tokenizer)
    assert tok2.get_vocab() == tokenizer.get_vocab()
    for text in texts:
        assert tok2(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert tok2.decode(tok2(text)["input_ids"]) == text
    msgs = [{"role": "user", "content": "Compute ((47+5)-3)+8."}]
    assert tok2.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    )

    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
        logits2 = model2(**batch).logits
    assert logits.shape == (len(texts), batch["input_ids"].shape[1], len(tokenizer))
    assert torch.equal(logits, logits2)


def test_generate_smoke(model, tokenizer):
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Compute ((47+5)-3)+8."}], add_generation_prompt=True, return_dict=True,
        return_tensors="pt",
    )  # fmt: skip
    torch.manual_seed(0)
    out = model.generate(**prompt, max_new_tokens=8, do_sample=True, top_k=0, top_p=1.0)
    assert out.shape[0] == 1 and prompt["input_ids"].shape[1] < out.shape[1] <= prompt["input_ids"].shape[1] + 8


def test_make_tiny_model_cli(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_tiny_model", REPO_ROOT / "tools" / "make_tiny_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "tiny"
    mod.main(["--out", str(out), "--corpus-size", "200", "--layers", "2"])
    printed = capsys.readouterr().out
    assert str(out) in printed and "parameters" in printed
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    assert model.config.vocab_size == len(tok)
