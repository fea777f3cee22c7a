"""Shared fixtures: the tiny local model and toy data, built once per test session (no hub access)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tools import make_tiny_model, prepare_data


def pytest_collection_modifyitems(config, items):
    gpus = torch.cuda.device_count()
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is not None and gpus < (marker.args[0] if marker.args else 1):
            item.add_marker(pytest.mark.skip(reason=f"needs {marker.args[0] if marker.args else 1} CUDA GPU(s)"))


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
