"""Toy chained-arithmetic reasoning task, generated locally and deterministically.

Each problem applies three operations to a starting number, e.g.::

    problem:  "Compute ((47+5)-3)+8."
    solution: "Step 1: 47+5=52\\nStep 2: 52-3=49\\nStep 3: 49+8=57\\n<answer>\\\\boxed{57}</answer>"
    answer:   "57"

Difficulties
------------
``easy``
    Start value in 10..99; each operation is ``+`` or ``-`` with a one-digit
    operand (1..9); every intermediate value stays in 0..99.
``med``
    Start value in 10..99; operations ``+``/``-`` with an operand in 1..49, or
    ``*`` with an operand in 2..5; every intermediate value stays in 0..199.

If a randomly drawn (op, operand) pair would leave the allowed range it is
redrawn, so every problem has exactly :data:`NUM_STEPS` steps. Multiplication is
written ``*`` (ASCII) so that each step ``"a op b"`` is valid Python.

All functions are pure: randomness comes only from the ``random.Random`` passed
in (or built from ``seed``), so the same seed always yields the same data.
"""

from __future__ import annotations

import random
from typing import Any

__all__ = [
    "DIFFICULTIES",
    "NUM_STEPS",
    "apply_op",
    "format_problem",
    "format_solution",
    "make_problem",
    "make_dataset",
    "make_splits",
]

NUM_STEPS = 3

# difficulty -> spec. ``ops`` maps each operator to its inclusive operand range.
DIFFICULTIES: dict[str, dict[str, Any]] = {
    "easy": {
        "start": (10, 99),
        "ops": {"+": (1, 9), "-": (1, 9)},
        "range": (0, 99),
    },
    "med": {
        "start": (10, 99),
        "ops": {"+": (1, 49), "-": (1, 49), "*": (2, 5)},
        "range": (0, 199),
    },
}

_ALIASES = {"medium": "med"}

_MAX_REDRAWS = 1000


def _spec(difficulty: str) -> dict[str, Any]:
    key = _ALIASES.get(difficulty, difficulty)
    try:
        return DIFFICULTIES[key]
    except KeyError:
        raise ValueError(
            f"unknown difficulty {difficulty!r}; expected one of {sorted(DIFFICULTIES)}"
        ) from None


def apply_op(lhs: int, op: str, rhs: int) -> int:
    """Evaluate ``lhs op rhs`` for op in ``+ - *``."""
    if op == "+":
        return lhs + rhs
    if op == "-":
        return lhs - rhs
    if op == "*":
        return lhs * rhs
    raise ValueError(f"unsupported op {op!r}")


def format_problem(start: int, steps: list[dict[str, Any]]) -> str:
    """``47, [(+,5), (-,3), (+,8)]`` -> ``"Compute ((47+5)-3)+8."``."""
    expr = str(start)
    for i, s in enumerate(steps):
        if i > 0:
            expr = f"({expr})"
        expr = f"{expr}{s['op']}{s['rhs']}"
    return f"Compute {expr}."


def format_solution(steps: list[dict[str, Any]]) -> str:
    """Render the step-by-step target completion, ending in a boxed answer."""
    lines = [
        f"Step {i}: {s['lhs']}{s['op']}{s['rhs']}={s['result']}"
        for i, s in enumerate(steps, start=1)
    ]
    lines.append(f"<answer>\\boxed{{{steps[-1]['result']}}}</answer>")
    return "\n".join(lines)


def make_problem(rng: random.Random, difficulty: str = "easy") -> dict[str, Any]:
    """Draw one problem.

    Returns a dict with keys ``problem`` (str), ``answer`` (str), ``solution``
    (str, the target completion) and ``steps`` (list of
    ``{"lhs": int, "op": str, "rhs": int, "result": int}``).
    """
    spec = _spec(difficulty)
    lo, hi = spec["range"]
    ops = sorted(spec["ops"])  # sorted: independent of dict order
    start = rng.randint(*spec["start"])
    value = start
    steps: list[dict[str, Any]] = []
    for _ in range(NUM_STEPS):
        for _attempt in range(_MAX_REDRAWS):
            op = rng.choice(ops)
            rhs = rng.randint(*spec["ops"][op])
            result = apply_op(value, op, rhs)
            if lo <= result <= hi:
                break
        else:  # pragma: no cover - unreachable with the built-in specs
            raise RuntimeError(f"could not draw a valid step from value {value}")
        steps.append({"lhs": value, "op": op, "rhs": rhs, "result": result})
        value = result
    return {
        "problem": format_problem(start, steps),
        "answer": str(value),
        "solution": format_solution(steps),
        "steps": steps,
    }


def make_dataset(n: int, *, difficulty: str = "easy", seed: int = 0) -> list[dict[str, Any]]:
    """``n`` problems drawn from ``random.Random(seed)`` (duplicates possible)."""
    rng = random.Random(seed)
    return [make_problem(rng, difficulty) for _ in range(n)]


def make_splits(
    n_train: int, n_test: int, *, difficulty: str = "easy", seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Return ``(train, test)`` with all ``problem`` strings distinct.

    Problems are drawn from one ``random.Random(seed)`` stream; the test set is
    filled first, then the train set, skipping any problem already seen. So no
    problem appears twice within a split or in both splits, and the test set
    for a given ``(n_test, difficulty, seed)`` does not depend on ``n_train``.
    """
    if n_train < 0 or n_test < 0:
        raise ValueError("n_train and n_test must be >= 0")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[list[dict[str, Any]]] = [[], []]  # [test, train]
    budget = 50 * (n_train + n_test) + 1000
    for split, n in ((0, n_test), (1, n_train)):
        while len(out[split]) < n:
            if budget <= 0:
                raise ValueError(
                    f"could not draw {n_train}+{n_test} distinct {difficulty!r} problems"
                )
            budget -= 1
            ex = make_problem(rng, difficulty)
            if ex["problem"] in seen:
                continue
            seen.add(ex["problem"])
            out[split].append(ex)
    test, train = out
    return train, test
