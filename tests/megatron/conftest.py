"""Fixtures of the Megatron tests: small random HF checkpoints on disk."""

from __future__ import annotations

import pytest

from tests.conftest import random_qwen2


@pytest.fixture(scope="session")
def random_qwen2_dir(tmp_path_factory):
    """Tied Qwen2, vocab 64 (padded to 128/256 by Megatron), hidden 64, 2 layers, 4 heads / 2 KV groups."""
    out = tmp_path_factory.mktemp("models") / "random-qwen2"
    random_qwen2(vocab_size=64).save_pretrained(out)
    return out
