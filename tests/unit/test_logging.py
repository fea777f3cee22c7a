"""metrics.jsonl holds each step once, across a fresh rerun and a resume."""

from __future__ import annotations

import json

from megatron_guided.config import load_config
from megatron_guided.logging import Tracker


def steps(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_jsonl_rows_survive_resume_and_reset_on_fresh_run(tmp_path):
    cfg = load_config([f"trainer.output_dir={tmp_path}", "trainer.logger=[file]"])
    tracker = Tracker(cfg, tmp_path)
    for step in range(4):
        tracker.log({"x": float(step)}, step=step)
    tracker.close()
    resumed = Tracker(cfg, tmp_path, start_step=2)  # checkpoint at 2; steps 3+ will be redone
    resumed.log({"x": 3.5}, step=3)
    resumed.close()
    assert steps(tmp_path / "metrics.jsonl") == [0, 1, 2, 3]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["x"] == 3.5
    Tracker(cfg, tmp_path).close()  # a fresh run starts an empty file
    assert steps(tmp_path / "metrics.jsonl") == []
