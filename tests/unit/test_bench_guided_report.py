"""Pure report functions of bench/guided_vs_plain.py on synthetic metrics (no training)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("guided_vs_plain", REPO_ROOT / "bench" / "guided_vs_plain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_rows(seconds_per_step: float, accuracies: dict[int, float], steps: int) -> list[dict]:
    """metrics.jsonl rows as the Trainer writes them: step 0 = validation only, then one row per step."""
    rows = [{"step": 0, "val/accuracy": accuracies[0]}]
    for step in range(1, steps + 1):
        row = {"step": step, "timing/step": seconds_per_step}
        if step in accuracies:
            row["val/accuracy"] = accuracies[step]
        rows.append(row)
    return rows


def write_run(out: Path, name: str, rows: list[dict]) -> None:
    (out / "runs" / name).mkdir(parents=True)
    (out / "runs" / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_mean_spread(bench):
    assert bench.mean_spread([0.4, 0.5, 0.6]) == pytest.approx((0.5, 0.1))
    assert bench.mean_spread([0.7]) == (0.7, 0.0)
    assert all(math.isnan(x) for x in bench.mean_spread([]))
    assert bench.fmt([0.4, 0.5, 0.6]) == "0.500±0.100"
    assert bench.fmt([0.7]) == "0.700"
    assert bench.fmt([]) == "-"


def test_train_seconds_are_cumulative_step_times(bench):
    rows = synthetic_rows(2.0, {0: 0.4, 2: 0.5, 4: 0.6}, steps=4)
    assert bench.train_seconds(rows) == {0: 0.0, 1: 2.0, 2: 4.0, 3: 6.0, 4: 8.0}
    assert bench.val_series(rows, "val/accuracy") == [(0, 0.0, 0.4), (2, 4.0, 0.5), (4, 8.0, 0.6)]


def test_value_at_time_is_the_last_validation_done(bench):
    series = bench.val_series(synthetic_rows(2.0, {0: 0.4, 2: 0.5, 4: 0.6}, steps=4), "val/accuracy")
    assert bench.value_at_time(series, 0.0) == (0, 0.4)
    assert bench.value_at_time(series, 3.9) == (0, 0.4)   # step 2 finishes at 4 s
    assert bench.value_at_time(series, 4.0) == (2, 0.5)
    assert bench.value_at_time(series, 100.0) == (4, 0.6)
    assert bench.value_at_time(series, -1.0) is None


def test_equal_time_favours_the_faster_run(bench):
    """Same accuracy per step, but the slow run (2x s/step) has reached less of it by time t."""
    fast = bench.val_series(synthetic_rows(1.0, {0: 0.4, 2: 0.5, 4: 0.6}, steps=4), "val/accuracy")
    slow = bench.val_series(synthetic_rows(2.0, {0: 0.4, 2: 0.5, 4: 0.6}, steps=4), "val/accuracy")
    assert bench.value_at_time(fast, 4.0) == (4, 0.6)
    assert bench.value_at_time(slow, 4.0) == (2, 0.5)


def test_time_grid(bench):
    assert bench.time_grid(100.0, 30) == [0, 30, 60, 90, 100.0]
    assert bench.time_grid(90.0, 30) == [0, 30, 60, 90.0]
    grid = bench.time_grid(175.0)
    assert grid[0] == 0 and grid[-1] == 175.0 and 5 <= len(grid) <= 8


def test_read_metrics_merges_repeated_steps(bench, tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "val/accuracy": 0.4}\n{"step": 1, "timing/step": 2.0}\n\n'
                    '{"step": 1, "timing/step": 3.0}\n')
    assert bench.read_metrics(path) == [{"step": 0, "val/accuracy": 0.4}, {"step": 1, "timing/step": 3.0}]


def test_judge(bench):
    assert bench.judge([0.05]).startswith("single seed")
    assert bench.judge([-0.05, -0.06, -0.04]) == "lower"
    assert bench.judge([0.05, 0.06, 0.04]) == "higher"
    assert bench.judge([0.05, -0.06, 0.01]).startswith("no clear difference")


def test_report_on_synthetic_runs(bench, tmp_path, capsys):
    """Guided: same per-step accuracy as plain at 2x the s/step -> equal steps tie, equal time lower."""
    for seed, offset in ((1, 0.0), (2, 0.02)):
        accs = {0: 0.4 + offset, 2: 0.5 + offset, 4: 0.6 + offset}
        write_run(tmp_path, f"plain__s{seed}", synthetic_rows(1.0, accs, steps=4))
        write_run(tmp_path, f"guided_half__s{seed}", synthetic_rows(2.0, accs, steps=4))
    runs = bench.load_runs(tmp_path)
    assert list(runs) == ["plain", "guided_half"] and sorted(runs["plain"]) == [1, 2]
    lines = bench.verdicts(runs, t_end=4.0)
    assert "2.00x" in lines[0]
    assert "at step 4" in lines[1] and "+0.000±0.000" in lines[1]
    assert "at equal time 4.0s" in lines[2] and "-0.100±0.000" in lines[2] and lines[2].endswith("lower")
    bench.report(tmp_path)
    out = capsys.readouterr().out
    assert "0.510±0.014" in out  # step 2, plain and guided: mean of 0.50 and 0.52
