"""Atomic, resumable training checkpoints.

Layout under the checkpoint root::

    global_step_12/            one complete checkpoint
        huggingface/           the policy as an HF folder (config, model.safetensors, tokenizer)
        optimizer.pt           TorchBackend: optimizer and scheduler
        dist_ckpt/, layout.json  MegatronBackend: model + optimizer in dist_checkpointing format
        trainer_state.pt       RNG states, data position, step
    latest                     text file naming the newest complete checkpoint

A checkpoint is written into a hidden temp folder, fsynced, then renamed into place, and only
then is ``latest`` replaced (write-temp + rename). A crash mid-save leaves the previous checkpoint
and ``latest`` untouched; half-written temp folders are cleaned up on the next save.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

_STEP_DIR = re.compile(r"^global_step_(\d+)$")
TMP_PREFIX = ".tmp-"


def capture_rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    dir_fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def publish_dir(tmp: Path, final: Path) -> None:
    """Make the fully written folder `tmp` appear as `final`: fsync it, move an existing `final`
    aside, rename, then delete the old one. A crash leaves either the old or the new folder."""
    _fsync_tree(tmp)
    old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, root: Path | str, *, keep_last: int = -1):
        self.root = Path(root)
        self.keep_last = keep_last

    def step_dirs(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return sorted(found)

    def latest(self) -> Path | None:
        marker = self.root / "latest"
        if marker.is_file():
            path = self.root / marker.read_text().strip()
            if path.is_dir():
                return path
        steps = self.step_dirs()
        return steps[-1][1] if steps else None

    def save(self, step: int, *, write: Callable[[Path], None], trainer_state: dict[str, Any]) -> Path:
        """Write checkpoint `step` atomically: `write(folder)` fills a temporary folder (the backend's
        weights and optimizer), then the trainer state is added and the folder published."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        final = self.root / f"global_step_{step}"
        tmp = self.root / f"{TMP_PREFIX}global_step_{step}"
        tmp.mkdir()
        write(tmp)
        torch.save(trainer_state, tmp / "trainer_state.pt")
        publish_dir(tmp, final)
        _atomic_write_text(self.root / "latest", final.name)
        self._prune()
        return final

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for _, path in self.step_dirs()[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def load_trainer_state(path: Path) -> dict[str, Any]:
        return torch.load(Path(path) / "trainer_state.pt", weights_only=False)
