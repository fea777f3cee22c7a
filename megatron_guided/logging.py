"""Metrics sinks: console, a jsonl file, TensorBoard and wandb (offline unless configured online)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from megatron_guided.config import Config, to_dict

log = logging.getLogger("megatron_guided")


def setup_logging(level: int = logging.INFO) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


class Tracker:
    """Sends each step's metrics to every configured backend."""

    def __init__(self, cfg: Config, output_dir: Path, *, start_step: int = 0):
        """`start_step`: the step the run resumes from (0 = a fresh run); jsonl rows after it (all rows,
        for a fresh run), left by an interrupted run, are dropped so that the file holds each step once."""
        self.backends = list(cfg.trainer.logger)
        self.output_dir = output_dir
        output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = None
        if "file" in self.backends:
            path = output_dir / "metrics.jsonl"
            kept = [line for line in path.read_text().splitlines(keepends=True)
                    if 0 < start_step >= json.loads(line)["step"]] if path.exists() else []
            path.write_text("".join(kept))
            self._jsonl = open(path, "a")
        self._tb = None
        if "tensorboard" in self.backends:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        self._wandb = None
        if "wandb" in self.backends:
            import wandb

            self._wandb = wandb.init(project=cfg.trainer.project_name, name=cfg.trainer.experiment_name,
                                     config=to_dict(cfg), mode=cfg.trainer.wandb_mode, dir=str(output_dir))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
        if "console" in self.backends:
            shown = {k: v for k, v in clean.items() if not k.startswith("timing/")}
            log.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in sorted(shown.items())))
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for key, value in clean.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
