"""Step checker for the toy visual task (:mod:`megatron_guided.data.toy_visual`).

Use as ``worker.rollout.verifier.function=examples/verifier_function/visual_arith_checker.py:verify``
with ``show_reference`` covering the samples it checks (``train`` in the example config).

The problem text says ``Compute ((N+5)-3)+8.`` and shows N only in the image, which a function cannot
read. The checker recovers N from the reference answer by undoing the operations from the last to the
first (``N = ((57-8)+3)-5``), writes it into the problem and hands the request to
``arith_step_checker.verify``, so every rule and message is that checker's. Without a reference answer
(or when undoing does not give a whole number) it raises ``ValueError``, which the FunctionVerifier
turns into a FAILED reply (``on_failure`` decides).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from megatron_guided.utils.loading import load_module

_step_checker = load_module(Path(__file__).with_name("arith_step_checker.py"),
                            what="visual_arith_checker: examples/verifier_function/arith_step_checker.py")
STOP_TOKEN = _step_checker.STOP_TOKEN
_PROBLEM = re.compile(r"Compute\s+\(*N((?:\s*[-+*]\s*\d+\s*\)?)+)")
_OP = re.compile(r"([-+*])\s*(\d+)")
_UNDO = {"+": lambda v, x: v - x, "-": lambda v, x: v + x}


def start_number(problem: str, reference: str) -> int:
    """N such that applying the problem's operations to N gives ``reference``."""
    match = _PROBLEM.search(problem)
    if match is None:
        raise ValueError(f"visual_arith_checker: no 'Compute <expression in N>' in {problem[:200]!r}")
    value = int(reference)
    for op, rhs in reversed(_OP.findall(match.group(1))):
        if op == "*":
            if value % int(rhs):
                raise ValueError(f"visual_arith_checker: {reference} is not reachable from a whole N")
            value //= int(rhs)
        else:
            value = _UNDO[op](value, int(rhs))
    return value


def verify(request: Any, *, stop_token: str = STOP_TOKEN) -> str:
    """arith_step_checker's reply, with N (recovered from the reference answer) in the problem."""
    if request.reference_answer is None:
        raise ValueError("visual_arith_checker needs the reference answer (worker.rollout.verifier.show_reference)")
    problem = request.problem
    n = start_number(problem, str(request.reference_answer).strip())
    problem = problem[: problem.index("Compute")] + re.sub(r"\bN\b", str(n), problem[problem.index("Compute"):], 1)
    return _step_checker.verify(dataclasses.replace(request, problem=problem), stop_token=stop_token)
