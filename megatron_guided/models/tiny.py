"""Tiny, locally built tokenizer + Qwen2 model for CPU tests and CI.

Nothing is downloaded: the tokenizer is trained here with ``tokenizers``, and the
model is a randomly initialised ``Qwen2ForCausalLM`` of about 1M parameters.

Tokenizer design (and why it is byte-level BPE, not WordLevel)
--------------------------------------------------------------
With ``transformers`` 5.x, ``AutoTokenizer.from_pretrained(dir)`` on a folder
whose ``config.json`` says ``model_type: qwen2`` *always* builds a
``Qwen2Tokenizer`` (``qwen2`` is in ``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS``),
whatever ``tokenizer_class`` ``tokenizer_config.json`` names. ``Qwen2Tokenizer``
rebuilds its backend from the saved vocab/merges as a byte-level BPE (NFC
normaliser, Qwen split regex + ``ByteLevel`` pre-tokenizer, ``ByteLevel``
decoder). A WordLevel tokenizer would therefore *not* survive a save/load round
trip through ``AutoTokenizer`` (spaces/newlines would be silently dropped).

So the tokenizer here is exactly the structure ``Qwen2Tokenizer`` rebuilds: a
byte-level BPE with **no merges**, i.e. one token per byte, trained locally with
``BpeTrainer``. Consequences:

* every character (any Unicode text) is encodable; there is no unknown token,
  and ``decode(encode(x)) == unicodedata.normalize("NFC", x)`` (== ``x`` for
  ASCII). ASCII characters are one token each; ``" "`` shows up as ``"Ġ"`` and
  ``"\\n"`` as ``"Ċ"`` in ``convert_ids_to_tokens`` (ByteLevel convention).
* ids: 0 ``<|endoftext|>`` (pad; also ``bos_token_id`` in the model config, as
  in Qwen2, but never prepended), 1 ``<|im_start|>``, 2 ``<|im_end|>`` (eos),
  then the byte symbols, then :data:`MULTI_CHAR_TOKENS` (``"Step "``,
  ``"<answer>"``, ...) as non-special added tokens, each encoded as one id.
* ``full_byte_alphabet=True`` (default) keeps all 256 byte symbols (vocab 264).
  ``full_byte_alphabet=False`` keeps only the byte symbols that occur in the
  corpus (smaller vocab); characters outside it are then *silently dropped* on
  encode (``Qwen2Tokenizer`` has no unk token), so only use it when every input
  is drawn from the corpus alphabet.

A Qwen-style ChatML template is stored as ``tokenizer.chat_template`` and saved
inside ``tokenizer_config.json``.

Typical use::

    tok = build_tokenizer(corpus)
    model = build_tiny_qwen2(tok)
    save_tiny(model, tok, "models/tiny-qwen2")
    # later: AutoTokenizer / AutoModelForCausalLM .from_pretrained("models/tiny-qwen2")
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

__all__ = [
    "PAD_TOKEN",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "IM_START_TOKEN",
    "SPECIAL_TOKENS",
    "MULTI_CHAR_TOKENS",
    "CHATML_TEMPLATE",
    "build_tokenizer",
    "build_tiny_qwen2",
    "count_parameters",
    "save_tiny",
]

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = PAD_TOKEN  # Qwen2 convention: config.bos_token_id == <|endoftext|>; never prepended
IM_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
# Order fixes their ids: 0, 1, 2.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, IM_START_TOKEN, EOS_TOKEN)

# Non-special added tokens: encoded as one id each, kept by decode(skip_special_tokens=True).
MULTI_CHAR_TOKENS: tuple[str, ...] = ("Step ", "<answer>", "</answer>", "\\boxed{", "Compute ")

# Qwen-style ChatML, without Qwen's default system prompt.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def _byte_level_pipeline(tok: Tokenizer) -> Tokenizer:
    # Mirrors Qwen2Tokenizer.__init__ (transformers 5.x) so a reload rebuilds the same thing.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def build_tokenizer(corpus: Iterable[str], *, full_byte_alphabet: bool = True) -> PreTrainedTokenizerFast:
    """Train a byte-level, merge-free BPE tokenizer on ``corpus``.

    Returns a ``Qwen2Tokenizer`` (a ``PreTrainedTokenizerFast``), the class
    ``AutoTokenizer`` reloads it as. See the module docstring for the layout.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet() if full_byte_alphabet else []
    trainer = trainers.BpeTrainer(
        vocab_size=1,  # below the alphabet size: learn the alphabet, no merges
        min_frequency=0,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
    )
    backend = _byte_level_pipeline(
        Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    model_state = json.loads(backend.model.__getstate__())
    if model_state.get("merges"):
        raise RuntimeError("expected a merge-free (character-level) BPE")
    vocab: dict[str, int] = backend.get_vocab()

    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START_TOKEN],
        clean_up_tokenization_spaces=False,
    )
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in MULTI_CHAR_TOKENS])
    tok.chat_template = CHATML_TEMPLATE
    return tok


def build_tiny_qwen2(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 512,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """Randomly initialised float32 ``Qwen2ForCausalLM`` sized for ``tokenizer`` (eager attention)."""
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    bos_id = tokenizer.convert_tokens_to_ids(BOS_TOKEN)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        attn_implementation="eager",
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id
    )
    model.eval()
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def save_tiny(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, out_dir: str | os.PathLike) -> str:
    """Write a standard Hugging Face folder and return its path.

    Files: ``config.json`` (plus ``"attn_implementation": "eager"`` so a plain
    ``from_pretrained`` reloads the same attention kernel), ``generation_config.json``,
    ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json`` (with
    ``chat_template``) and ``special_tokens_map.json``.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)

    cfg_path = os.path.join(out_dir, "config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["attn_implementation"] = model.config._attn_implementation or "eager"
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")

    # transformers 5 keeps special tokens in tokenizer_config.json only; the legacy
    # map is written too for other readers (transformers 5 reloads it identically).
    special_map = {
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "additional_special_tokens": list(tokenizer.extra_special_tokens),
    }
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special_map, f, indent=2)
        f.write("\n")
    return out_dir
