"""Tests for the locally generated chained-arithmetic task (megatron_guided.data.toy_arith)."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_guided.data.toy_arith import NUM_STEPS, make_dataset, make_problem, make_splits

REPO_ROOT = Path(__file__).resolve().parents[2]

STEP_RE = re.compile(r"^Step (\d+): (\d+)([+\-*])(\d+)=(-?\d+)$")
BOXED_RE = re.compile(r"^<answer>\\boxed\{(-?\d+)\}</answer>$")
PROBLEM_RE = re.compile(r"^Compute (.+)\.$")

RANGES = {  # difficulty -> (allowed ops, value range, rhs range per op)
    "easy": ({"+", "-"}, (0, 99), {"+": (1, 9), "-": (1, 9)}),
    "med": ({"+", "-", "*"}, (0, 199), {"+": (1, 49), "-": (1, 49), "*": (2, 5)}),
}


def _check_example(ex: dict) -> list[tuple[int, str, int, int]]:
    """Independent re-check of one example from its text; returns the parsed steps."""
    assert set(ex) == {"problem", "answer", "solution", "steps"}
    lines = ex["solution"].split("\n")
    assert len(lines) == NUM_STEPS + 1
    parsed = []
    for i, line in enumerate(lines[:-1], start=1):
        m = STEP_RE.match(line)
        assert m, line
        n, a, op, b, res = m.groups()
        assert int(n) == i
        assert eval(f"{a}{op}{b}") == int(res), line  # independent arithmetic check
        parsed.append((int(a), op, int(b), int(res)))
    # steps chain: each lhs is the previous result
    for prev, cur in zip(parsed, parsed[1:]):
        assert cur[0] == prev[3]
    boxed = BOXED_RE.match(lines[-1])
    assert boxed, lines[-1]
    assert boxed.group(1) == ex["answer"] == str(parsed[-1][3])
    # the problem's expression evaluates to the answer, and matches the steps
    expr = PROBLEM_RE.match(ex["problem"]).group(1)
    assert re.fullmatch(r"[0-9+\-*()]+", expr)
    assert eval(expr) == int(ex["answer"])
    a0, op0, b0, _ = parsed[0]
    expected = f"{a0}{op0}{b0}"
    for _, op, b, _ in parsed[1:]:
        expected = f"({expected}){op}{b}"
    assert expr == expected
    # structured steps agree with the text
    assert [(s["lhs"], s["op"], s["rhs"], s["result"]) for s in ex["steps"]] == parsed
    return parsed


def test_example_format_matches_spec():
    ex = make_problem(random.Random(0), "easy")
    _check_example(ex)
    assert ex["problem"].startswith("Compute ((")
    assert ex["solution"].startswith("Step 1: ")
    assert ex["solution"].endswith(f"<answer>\\boxed{{{ex['answer']}}}</answer>")


@pytest.mark.parametrize("difficulty", ["easy", "med"])
def test_solutions_correct_and_in_range(difficulty):
    ops, (lo, hi), rhs_ranges = RANGES[difficulty]
    seen_ops = set()
    for ex in make_dataset(2000, difficulty=difficulty, seed=123):
        parsed = _check_example(ex)
        assert 10 <= parsed[0][0] <= 99
        for a, op, b, res in parsed:
            assert op in ops
            assert rhs_ranges[op][0] <= b <= rhs_ranges[op][1]
            assert lo <= a <= hi and lo <= res <= hi
            seen_ops.add(op)
    assert seen_ops == ops  # every op actually gets used


def test_same_seed_same_data_and_different_seed_differs():
    assert make_dataset(50, difficulty="med", seed=7) == make_dataset(50, difficulty="med", seed=7)
    assert make_dataset(50, difficulty="med", seed=7) != make_dataset(50, difficulty="med", seed=8)
    assert make_splits(300, 50, difficulty="easy", seed=1) == make_splits(300, 50, difficulty="easy", seed=1)


@pytest.mark.parametrize("difficulty", ["easy", "med"])
def test_splits_disjoint_and_unique(difficulty):
    train, test = make_splits(3000, 200, difficulty=difficulty, seed=0)
    assert len(train) == 3000 and len(test) == 200
    train_p = {ex["problem"] for ex in train}
    test_p = {ex["problem"] for ex in test}
    assert len(train_p) == 3000 and len(test_p) == 200
    assert not train_p & test_p
    # the test split does not depend on the train size
    _, test_small = make_splits(10, 200, difficulty=difficulty, seed=0)
    assert test_small == test


def test_bad_difficulty_raises():
    with pytest.raises(ValueError):
        make_problem(random.Random(0), "hard")


def test_prepare_data_cli(tmp_path):
    out = tmp_path / "arith_easy"
    cmd = [
        sys.executable, str(REPO_ROOT / "tools" / "prepare_data.py"),
        "--task", "arith", "--difficulty", "easy", "--out", str(out),
        "--train", "200", "--test", "20", "--seed", "0",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=REPO_ROOT, capture_output=True, timeout=60)
    rows = {}
    for split in ("train", "test"):
        with open(out / f"{split}.jsonl", encoding="utf-8") as f:
            rows[split] = [json.loads(line) for line in f]
    assert len(rows["train"]) == 200 and len(rows["test"]) == 20
    for ex in rows["train"] + rows["test"]:
        _check_example(ex)
    assert not {r["problem"] for r in rows["train"]} & {r["problem"] for r in rows["test"]}
    assert (rows["train"], rows["test"]) == make_splits(200, 20, difficulty="easy", seed=0)
