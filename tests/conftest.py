"""Shared fixtures: the tiny local model and toy data, built once per test session (no hub access)."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools import make_tiny_model, prepare_data

SGLANG_STUBS = Path(__file__).resolve().parent / "sglang_stubs"


@functools.cache
def sglang_python() -> str | None:
    """The interpreter that runs SGLang servers in tests: $SGLANG_PYTHON (e.g. .venv-sglang/bin/python,
    see the README), else this one if it can import sglang; None when neither."""
    candidate = os.environ.get("SGLANG_PYTHON")
    if not candidate:
        return sys.executable if importlib.util.find_spec("sglang") is not None else None
    probe = subprocess.run([candidate, "-c", "import importlib.util, sys; "
                            "sys.exit(importlib.util.find_spec('sglang') is None)"], capture_output=True)
    return candidate if probe.returncode == 0 else None


def pytest_collection_modifyitems(config, items):
    gpus = torch.cuda.device_count()
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is not None and gpus < (marker.args[0] if marker.args else 1):
            item.add_marker(pytest.mark.skip(reason=f"needs {marker.args[0] if marker.args else 1} CUDA GPU(s)"))
        if item.get_closest_marker("sglang") is not None and sglang_python() is None:
            item.add_marker(pytest.mark.skip(
                reason="sglang is not installed: build the SGLang venv and set SGLANG_PYTHON (README, 'SGLang engine')"))


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread():
    """The tests run thousands of tiny ops; on 2 shared cores a second intra-op thread mostly waits for
    a time slice (measured: 20 s instead of 0.15 s for the engine throughput test under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_qwen2(*, seed: int = 0, vocab_size: int = 64, max_positions: int = 512):
    """A small random Qwen2 (eager attention, eval mode). initializer_range=0.2: with the default 0.02,
    greedy decoding of a random tied-embedding model repeats one token forever, which would make
    greedy/EOS/stop-string checks toothless."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=max_positions,
                         tie_word_embeddings=True, initializer_range=0.2)
    return Qwen2ForCausalLM._from_config(config, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny-qwen2"
    make_tiny_model.main(["--out", str(out)])
    return out


@pytest.fixture(scope="session")
def arith_data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "arith_easy"
    prepare_data.main(["--task", "arith", "--difficulty", "easy", "--out", str(out),
                       "--train", "2000", "--test", "64", "--seed", "0"])
    return out


def cpu_sglang_config(**overrides):
    """worker.rollout.sglang for a real CPU server in tests (serving-on-cpu.md's flags, float32 so its
    log-probs match the in-process engine, the import stand-ins of tests/sglang_stubs on its path)."""
    from megatron_guided.config import SGLangConfig

    settings = dict(device="cpu", dtype="float32", mem_fraction_static=0.05, python=sglang_python() or "",
                    pythonpath=[str(SGLANG_STUBS)], extra_args=["--max-total-tokens", "65536"],
                    startup_timeout_s=300.0, request_timeout_s=120.0, env={"OMP_NUM_THREADS": "1"})
    return SGLangConfig(**(settings | overrides))


@pytest.fixture(scope="session")
def tiny_vl_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny-qwen2.5-vl"
    make_tiny_model.main(["--arch", "qwen2_5_vl", "--corpus-size", "200", "--out", str(out)])
    return out


@pytest.fixture(scope="session")
def visual_data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "visual_arith"
    prepare_data.main(["--task", "visual_arith", "--out", str(out), "--train", "64", "--test", "16", "--seed", "0"])
    return out
