"""Exact step checker for the toy chained-arithmetic task (:mod:`megatron_guided.data.toy_arith`).

Use as ``worker.rollout.verifier.function=examples/verifier_function/arith_step_checker.py:verify``.
``verify(request)`` returns raw verifier text (guidance or the stop token, then a ``[SCORE]`` line),
which :class:`~megatron_guided.verifier.function.FunctionVerifier` parses with ``parse_verifier_text``.

Problem
-------
The first ``Compute <expr>`` in ``request.problem`` (a format prompt around it is fine), where
``<expr>`` is left-nested as :func:`~megatron_guided.data.toy_arith.format_problem` writes it:
``((47+5)-3)+8`` → start 47, operations ``+5, -3, +8``. A problem that does not parse (or is not
left-nested) raises ``ValueError``: the checker cannot judge it, and the FunctionVerifier turns that
into a FAILED reply (``on_failure`` decides).

The policy's steps: "latest attempt" of each step
-------------------------------------------------
Only policy turns are read (verifier turns are ignored), oldest first, line by line. A line holding
``Step k:`` (case-insensitive) is an *attempt at step k*, read from its body (the rest of the line,
up to the next ``Step j:``): the first ``a op b = c`` there (integers, ``op`` one of ``+ - *``, also
``x × − –``; ``c`` not followed by more arithmetic); a body without one is a *malformed* attempt.
Each attempt at step k **replaces** the recorded step k and **discards every recorded step > k**
(rewriting a step restarts the solution from there, so later steps built on the old value are stale).
What remains is the *chain* that is judged. The final answer is read only from the latest policy
turn.

Rules, in order (the first that applies gives the reply)
--------------------------------------------------------
1. No policy turn, or a latest turn with neither a ``Step k:`` line nor an answer marker
   (``<answer>`` or ``\\boxed``) while the chain holds no error → ``Write the steps as 'Step k: a+b=c'.``
   (An unfixed error in the chain is repeated instead: rule 2 runs first.)
2. The chain, step k = 1, 2, … — the first failing check names step k only (a ``Step 0`` anywhere →
   ``Number the steps from 1, as in 'Step 1: a+b=c'.``):
   a. step k missing while a later step is recorded → ``Step k is missing; write the steps in order.``
   b. malformed attempt → ``Write step k as 'Step k: a+b=c' with numbers.``
   c. k larger than the number of operations → ``The problem has only N operations; step k is not needed.``
   d. wrong left operand: for k = 1 not the problem's start number →
      ``Step 1 should start from S, the first number in the problem.``; for k > 1 not the result the
      policy wrote for step k-1 → ``Step k should start from the previous step's result.``
   e. operation/right operand not the problem's k-th one →
      ``Check step k: the problem applies -3 here, not +3.``
   f. wrong arithmetic → ``Check step k: 52-3 is not 48.``
   Apart from step indices (and N in 2c), messages only repeat numbers the policy wrote or the problem
   states: never a correct result (nor, therefore, the final answer) the policy has not produced itself.
3. An answer marker in the latest turn, but not exactly one ``<answer>``, one ``</answer>`` and one
   ``\\boxed{N}`` (inside the block, N an integer; whitespace around tags ignored as in the math reward) →
   ``Write the final answer once, as <answer>\\boxed{N}</answer> with a whole number N.``
4. A well-formed answer with fewer steps than operations → ``Step m is missing; do every step before
   the final answer.`` (m = the first step not written).
5. All steps right and N ≠ the last step's result → ``Your final answer does not follow from your steps.``
6. All steps right and N = the last step's result → the stop token.
7. No answer, no error: all steps done → ``All steps are done; now give the final answer.``;
   otherwise → ``Continue with the next step.``

Hallucination flag (always appended: ``[SCORE] hallucination_detect=1|0``)
-------------------------------------------------------------------------
1 iff every number the policy *used* is *available*: used = both operands of every well-formed step
in the chain, plus N of a well-formed answer in the latest turn; available for step k = the numbers
of the problem's expression plus the results the policy wrote for its chain steps < k (for the
answer: the problem's numbers plus all chain results). Results themselves are computed, not used, so
a wrong result is an arithmetic error, not a hallucination; an operand copied from the wrong place
but present in the problem is also not one. Nothing to check → 1.

Garbage never raises: any text is either a step attempt, an answer marker, or ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from megatron_guided.data.toy_arith import apply_op, format_problem

STOP_TOKEN = "###STOP###"
FORMAT_HINT = "Write the steps as 'Step k: a+b=c'."

_PROBLEM = re.compile(r"Compute\s+([0-9()+\-*\s]*[0-9)])")
_PROBLEM_TOKENS = re.compile(r"\d+|[+\-*]")
_STEP_HEADER = re.compile(r"\bstep\s*(\d{1,6})\s*:", re.IGNORECASE)
_OPS = {"+": "+", "-": "-", "*": "*", "x": "*", "X": "*", "×": "*", "−": "-", "–": "-"}
_EQUATION = re.compile(
    r"(?<![\d.])(-?\d{1,18})\s*([-+*xX×−–])\s*(\d{1,18})\s*=\s*(-?\d{1,18})"
    r"(?![\d.]*\d)(?!\s*[-+*xX×−–=/]\s*-?\d)"  # c is a whole integer, not followed by more arithmetic
)
_WS_AROUND_TAGS = re.compile(r"\s*([<>/])\s*")
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_INT = re.compile(r"-?\d{1,18}")


@dataclass(frozen=True, slots=True)
class _Problem:
    start: int
    ops: tuple[tuple[str, int], ...]  # (op, rhs) per step

    @property
    def numbers(self) -> set[int]:
        return {self.start, *(rhs for _, rhs in self.ops)}


@dataclass(frozen=True, slots=True)
class _Attempt:
    index: int
    lhs: int | None = None  # None: malformed
    op: str = ""
    rhs: int = 0
    result: int = 0

    @property
    def well_formed(self) -> bool:
        return self.lhs is not None


def parse_problem(text: str) -> _Problem:
    """``"Compute ((47+5)-3)+8."`` → start 47, ops ((+,5), (-,3), (+,8)); ValueError if it does not parse."""
    match = _PROBLEM.search(text or "")
    if match is None:
        raise ValueError(f"arith_step_checker: no 'Compute <expression>' in the problem {text[:200]!r}")
    expr = re.sub(r"\s+", "", match.group(1))
    tokens = _PROBLEM_TOKENS.findall(expr)
    if len(tokens) < 3 or len(tokens) % 2 == 0 or not tokens[0].isdigit():
        raise ValueError(f"arith_step_checker: cannot read the expression {expr!r}")
    start = int(tokens[0])
    ops = []
    for op, rhs in zip(tokens[1::2], tokens[2::2]):
        if op not in "+-*" or not rhs.isdigit():
            raise ValueError(f"arith_step_checker: cannot read the expression {expr!r}")
        ops.append((op, int(rhs)))
    steps = [{"op": op, "rhs": rhs} for op, rhs in ops]
    if format_problem(start, steps) != f"Compute {expr}.":  # only left-nested chains evaluate left to right
        raise ValueError(f"arith_step_checker: {expr!r} is not a left-nested chain like ((a+b)-c)+d")
    return _Problem(start=start, ops=tuple(ops))


def _attempts(text: str) -> list[_Attempt]:
    """Every ``Step k:`` attempt in one policy turn, in order."""
    out = []
    for line in text.splitlines():
        headers = list(_STEP_HEADER.finditer(line))
        for i, header in enumerate(headers):  # several steps on one line: each body ends at the next header
            body = line[header.end(): headers[i + 1].start() if i + 1 < len(headers) else len(line)]
            index = int(header.group(1))
            eq = _EQUATION.search(body)
            if eq is None:
                out.append(_Attempt(index=index))
            else:
                out.append(_Attempt(index=index, lhs=int(eq.group(1)), op=_OPS[eq.group(2)],
                                    rhs=int(eq.group(3)), result=int(eq.group(4))))
    return out


def latest_chain(policy_turns: list[str]) -> dict[int, _Attempt]:
    """Latest attempt per step index: an attempt at step k replaces step k and drops every step > k."""
    chain: dict[int, _Attempt] = {}
    for text in policy_turns:
        for attempt in _attempts(text):
            for k in [k for k in chain if k > attempt.index]:
                del chain[k]
            chain[attempt.index] = attempt
    return chain


def _answer(text: str) -> tuple[bool, int | None]:
    """(has an answer marker, N of a well-formed ``<answer>\\boxed{N}</answer>`` or None)."""
    norm = _WS_AROUND_TAGS.sub(r"\1", text)
    if "<answer>" not in norm and "</answer>" not in norm and "\\boxed" not in norm:
        return False, None
    if norm.count("<answer>") != 1 or norm.count("</answer>") != 1 or norm.count("\\boxed") != 1:
        return True, None
    block = _ANSWER_BLOCK.search(norm)
    boxed = _BOXED.search(block.group(1)) if block else None
    if boxed is None or not _INT.fullmatch(boxed.group(1).strip()):
        return True, None
    return True, int(boxed.group(1).strip())


def _step_error(problem: _Problem, chain: dict[int, _Attempt]) -> str | None:
    if 0 in chain:
        return "Number the steps from 1, as in 'Step 1: a+b=c'."
    last = max(chain, default=0)
    for k in range(1, last + 1):
        step = chain.get(k)
        if step is None:
            return f"Step {k} is missing; write the steps in order."
        if not step.well_formed:
            return f"Write step {k} as 'Step {k}: a+b=c' with numbers."
        if k > len(problem.ops):
            return f"The problem has only {len(problem.ops)} operations; step {k} is not needed."
        if k == 1 and step.lhs != problem.start:
            return f"Step 1 should start from {problem.start}, the first number in the problem."
        if k > 1 and step.lhs != chain[k - 1].result:
            return f"Step {k} should start from the previous step's result."
        op, rhs = problem.ops[k - 1]
        if (step.op, step.rhs) != (op, rhs):
            return f"Check step {k}: the problem applies {op}{rhs} here, not {step.op}{step.rhs}."
        if apply_op(step.lhs, step.op, step.rhs) != step.result:
            return f"Check step {k}: {step.lhs}{step.op}{step.rhs} is not {step.result}."
    return None


def hallucination_free(problem: _Problem, chain: dict[int, _Attempt], answer: int | None) -> bool:
    available = set(problem.numbers)
    for k in sorted(chain):
        step = chain[k]
        if not step.well_formed:
            continue
        if step.lhs not in available or step.rhs not in available:
            return False
        available.add(step.result)  # usable from step k+1 on (and by the answer)
    return answer is None or answer in available


def judge(request: Any, *, stop_token: str = STOP_TOKEN) -> tuple[str, int]:
    """(the reply without its score line, the hallucination flag)."""
    problem = parse_problem(str(getattr(request, "problem", "") or ""))
    policy_turns = [str(getattr(t, "content", "") or "") for t in (getattr(request, "dialogue", None) or [])
                    if getattr(t, "role", None) == "policy"]
    chain = latest_chain(policy_turns)
    latest = policy_turns[-1] if policy_turns else ""
    has_marker, answer = _answer(latest)
    flag = int(hallucination_free(problem, chain, answer))

    error = _step_error(problem, chain)
    if error is not None:
        return error, flag
    if not has_marker and not _STEP_HEADER.search(latest):
        return FORMAT_HINT, flag
    last = max(chain, default=0)  # no error: the chain is steps 1..last, all right, last <= number of ops
    done = last == len(problem.ops)
    if has_marker:
        if answer is None:
            return "Write the final answer once, as <answer>\\boxed{N}</answer> with a whole number N.", flag
        if not done:
            return f"Step {last + 1} is missing; do every step before the final answer.", flag
        if answer != chain[last].result:
            return "Your final answer does not follow from your steps.", flag
        return stop_token, flag
    if done:
        return "All steps are done; now give the final answer.", flag
    return "Continue with the next step.", flag


def verify(request: Any, *, stop_token: str = STOP_TOKEN) -> str:
    """Raw verifier text for `request` (a :class:`~megatron_guided.verifier.base.VerifierRequest`)."""
    text, flag = judge(request, stop_token=stop_token)
    return f"{text}\n[SCORE] hallucination_detect={flag}"
