"""Build the tiny tokenizer + random-init Qwen2 (or Qwen2.5-VL) model used by CPU tests and CI.

Everything is built locally (no hub access). From the repo root::

    python tools/make_tiny_model.py --out models/tiny-qwen2
    python tools/make_tiny_model.py --arch qwen2_5_vl --out models/tiny-qwen2.5-vl

``--arch qwen2_5_vl`` adds a vision tower, the vision tokens, a chat template with image parts and
an image processor (``preprocessor_config.json``); see :mod:`megatron_guided.models.tiny_vl`.

Options (defaults shown)::

    python tools/make_tiny_model.py --out models/tiny-qwen2 \
        --hidden-size 128 --layers 4 --heads 4 --kv-heads 2 \
        --intermediate-size 512 --max-positions 512 --seed 0 [--patch-size 8]

The output folder is a standard Hugging Face checkpoint: load it with
``AutoTokenizer.from_pretrained(out)`` / ``AutoModelForCausalLM.from_pretrained(out)``.
"""

from __future__ import annotations

import argparse
import string
import sys
from pathlib import Path

try:
    import megatron_guided  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_guided.data.toy_arith import DIFFICULTIES, make_dataset  # noqa: E402
from megatron_guided.models.tiny import (  # noqa: E402
    build_tiny_qwen2,
    build_tokenizer,
    count_parameters,
    save_tiny,
)
from megatron_guided.models.tiny_vl import (  # noqa: E402
    build_image_processor,
    build_tiny_qwen2_5_vl,
    build_vl_tokenizer,
    save_tiny_vl,
)

# Characters that must always be encodable even if the toy task never emits them
# (chat roles, system prompts, free-form text): all printable ASCII + whitespace.
EXTRA_CHARS = string.digits + string.ascii_letters + string.punctuation + " \n\t"


def build_corpus(n_per_difficulty: int = 2000, seed: int = 0) -> list[str]:
    """Problems + solutions of the toy task (every difficulty) + :data:`EXTRA_CHARS`."""
    corpus: list[str] = []
    for i, difficulty in enumerate(sorted(DIFFICULTIES)):
        for ex in make_dataset(n_per_difficulty, difficulty=difficulty, seed=seed + i):
            corpus.append(ex["problem"])
            corpus.append(ex["solution"])
    corpus.append(EXTRA_CHARS)
    corpus.extend(["system", "user", "assistant"])
    return corpus


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="models/tiny-qwen2", help="output folder")
    p.add_argument("--arch", choices=("qwen2", "qwen2_5_vl"), default="qwen2")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=512)
    p.add_argument("--max-positions", type=int, default=512)
    p.add_argument("--no-tie-embeddings", action="store_true", help="untie input/output embeddings")
    p.add_argument("--corpus-size", type=int, default=2000, help="problems per difficulty in the corpus")
    p.add_argument(
        "--corpus-alphabet-only",
        action="store_true",
        help="keep only byte symbols seen in the corpus (smaller vocab; unseen chars are dropped on encode)",
    )
    p.add_argument("--patch-size", type=int, default=8,
                   help="vision patch size (qwen2_5_vl); SGLang serves Qwen2.5-VL only with 14, as released")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    corpus = build_corpus(args.corpus_size, seed=args.seed)
    sizes = dict(
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        intermediate_size=args.intermediate_size,
        max_position_embeddings=args.max_positions,
        tie_word_embeddings=not args.no_tie_embeddings,
        seed=args.seed,
    )
    if args.arch == "qwen2_5_vl":
        if args.corpus_alphabet_only:
            p.error("--corpus-alphabet-only is for --arch qwen2 only")
        tokenizer = build_vl_tokenizer(corpus)
        model = build_tiny_qwen2_5_vl(tokenizer, patch_size=args.patch_size, **sizes)
        out = save_tiny_vl(model, tokenizer, build_image_processor(patch_size=args.patch_size), args.out)
    else:
        tokenizer = build_tokenizer(corpus, full_byte_alphabet=not args.corpus_alphabet_only)
        model = build_tiny_qwen2(tokenizer, **sizes)
        out = save_tiny(model, tokenizer, args.out)
    print(f"vocab size: {len(tokenizer)}")
    print(f"parameters: {count_parameters(model):,}")
    print(f"saved to:   {out}")


if __name__ == "__main__":
    main()
