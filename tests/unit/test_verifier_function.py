"""The exact toy-arithmetic step checker and the FunctionVerifier around user functions."""

from __future__ import annotations

import asyncio
import random
import re
from pathlib import Path

import pytest

from megatron_guided.config import VerifierConfig
from megatron_guided.data.toy_arith import make_dataset
from megatron_guided.utils.loading import LoadError, load_module
from megatron_guided.verifier.base import Turn, VerdictKind, VerifierRequest, parse_verifier_text
from megatron_guided.verifier.function import FunctionVerifier

ROOT = Path(__file__).resolve().parents[2]
CHECKER_PATH = ROOT / "examples/verifier_function/arith_step_checker.py"
checker = load_module(CHECKER_PATH, what="test")

PROBLEM = "Compute ((47+5)-3)+8."
SOLUTION = "Step 1: 47+5=52\nStep 2: 52-3=49\nStep 3: 49+8=57\n<answer>\\boxed{57}</answer>"


def _request(*turns: str, problem: str = PROBLEM) -> VerifierRequest:
    """Alternating policy / verifier turns, starting with the policy."""
    dialogue = [Turn(role="policy" if i % 2 == 0 else "verifier", content=t) for i, t in enumerate(turns)]
    return VerifierRequest(problem=problem, dialogue=dialogue, reference_answer="57")


def _check(*turns: str, problem: str = PROBLEM):
    raw = checker.verify(_request(*turns, problem=problem))
    return raw, parse_verifier_text(raw)


def _steps_named(text: str) -> set[int]:
    return {int(k) for k in re.findall(r"\bstep\s+(\d+)", text, flags=re.IGNORECASE)}


def _numbers(text: str) -> set[int]:
    """Numbers in a message, leaving out step indices."""
    return {int(n) for n in re.findall(r"-?\d+", re.sub(r"\bstep\s+\d+", "", text, flags=re.IGNORECASE))}


# -- the checker on hand-written dialogues ---------------------------------------------------------------
def test_correct_solution_stops_with_flag_1():
    raw, reply = _check(SOLUTION)
    assert reply.kind is VerdictKind.STOP and reply.hallucination_flags == [1]
    assert raw == "###STOP###\n[SCORE] hallucination_detect=1"
    # the answer in a later turn of its own also stops; whitespace around tags is tolerated
    _, reply = _check("Step 1: 47 + 5 = 52\nStep 2: 52 - 3 = 49\nStep 3: 49 + 8 = 57", "Good.",
                      "< answer >\\boxed{57}</answer>")
    assert reply.kind is VerdictKind.STOP


def test_wrong_step_2_is_named_without_revealing_results():
    _, reply = _check("Step 1: 47+5=52\nStep 2: 52-3=48\nStep 3: 48+8=56\n<answer>\\boxed{56}</answer>")
    assert reply.kind is VerdictKind.GUIDE
    assert reply.guidance == "Check step 2: 52-3 is not 48."
    assert "57" not in reply.guidance and "49" not in reply.guidance  # final answer, step 2's result
    assert reply.hallucination_flags == [1]  # 48 is its own (wrong) result, not an invented number
    # the same when the wrong step is the newest turn of a step-per-turn dialogue
    _, reply = _check("Step 1: 47+5=52", "Continue with the next step.", "Step 2: 52-3=48")
    assert reply.guidance == "Check step 2: 52-3 is not 48."


def test_judged_on_the_latest_attempt_after_guidance():
    first = "Step 1: 47+5=52\nStep 2: 52-3=48\nStep 3: 48+8=56\n<answer>\\boxed{56}</answer>"
    # Rewriting step 2 drops the stale step 3 (built on 48) and the earlier answer: keep going.
    _, reply = _check(first, "Check step 2: 52-3 is not 48.", "Step 2: 52-3=49")
    assert reply.kind is VerdictKind.GUIDE and reply.guidance == "Continue with the next step."
    assert reply.hallucination_flags == [1]
    _, reply = _check(first, "Check step 2: 52-3 is not 48.", "Step 2: 52-3=49\nStep 3: 49+8=57\n"
                      "<answer>\\boxed{57}</answer>")
    assert reply.kind is VerdictKind.STOP
    # A rewrite can also break a step that was right before.
    _, reply = _check(SOLUTION, "Hmm.", "Step 1: 47+5=53")
    assert reply.guidance == "Check step 1: 47+5 is not 53."
    # Steps in verifier turns are never read as the policy's.
    _, reply = _check("Step 1: 47+5=52", "Step 2: 52-3=10")
    assert reply.guidance == "Continue with the next step."


def test_wrong_operands():
    _, reply = _check("Step 1: 47+5=52\nStep 2: 47-3=44")  # restarted from the problem's start
    assert reply.guidance == "Step 2 should start from the previous step's result."
    assert reply.hallucination_flags == [1]  # 47 and 3 are in the problem
    _, reply = _check("Step 1: 47+5=52\nStep 2: 25-3=22")  # copied the previous result wrongly
    assert reply.guidance == "Step 2 should start from the previous step's result."
    assert reply.hallucination_flags == [0]  # 25 comes from nowhere
    _, reply = _check("Step 1: 74+5=79")
    assert reply.guidance == "Step 1 should start from 47, the first number in the problem."
    _, reply = _check("Step 1: 47+5=52\nStep 2: 52-4=48")  # operand copied wrongly from the problem
    assert reply.guidance == "Check step 2: the problem applies -3 here, not -4."
    assert reply.hallucination_flags == [0]
    _, reply = _check("Step 1: 47+5=52\nStep 2: 52+3=55")  # wrong operation
    assert reply.guidance == "Check step 2: the problem applies -3 here, not +3."
    assert reply.hallucination_flags == [1]


def test_correct_steps_wrong_box():
    _, reply = _check(SOLUTION.replace("{57}", "{58}"))
    assert reply.guidance == "Your final answer does not follow from your steps."
    assert "57" not in reply.guidance and reply.hallucination_flags == [0]
    _, reply = _check(SOLUTION.replace("{57}", "{49}"))  # a number it had, just the wrong one
    assert reply.guidance == "Your final answer does not follow from your steps." and reply.hallucination_flags == [1]


def test_answer_format_and_early_answers():
    _, reply = _check(SOLUTION.replace("<answer>\\boxed{57}</answer>", "\\boxed{57}"))
    assert reply.guidance.startswith("Write the final answer once, as <answer>")
    _, reply = _check(SOLUTION + "\n<answer>\\boxed{57}</answer>")
    assert reply.guidance.startswith("Write the final answer once")
    _, reply = _check(SOLUTION.replace("{57}", "{fifty-seven}"))
    assert reply.guidance.startswith("Write the final answer once")
    _, reply = _check("Step 1: 47+5=52\n<answer>\\boxed{57}</answer>")  # right number, steps skipped
    assert reply.guidance == "Step 2 is missing; do every step before the final answer."
    assert "57" not in reply.guidance
    _, reply = _check("Step 1: 47+5=52\nStep 2: 52-3=49\nStep 3: 49+8=57")
    assert reply.guidance == "All steps are done; now give the final answer."


def test_missing_extra_and_malformed_steps():
    _, reply = _check("Step 1: 47+5=52\nStep 3: 49+8=57")
    assert reply.guidance == "Step 2 is missing; write the steps in order."
    _, reply = _check(SOLUTION.replace("<answer>", "Step 4: 57+0=57\n<answer>"))
    assert reply.guidance == "The problem has only 3 operations; step 4 is not needed."
    _, reply = _check("Step 1: I add five to the start")
    assert reply.guidance == "Write step 1 as 'Step 1: a+b=c' with numbers."
    _, reply = _check("Step 1: 47+5=52.5")
    assert reply.guidance == "Write step 1 as 'Step 1: a+b=c' with numbers."


GARBAGE = [
    "", "asdf 12 ## 99", "\x00\x01<|im_end|>", "}}{{\\boxed", "Step", "Step -1: 3",
    "Step 0: 47+5=52\nStep 1: 47+5=52\nStep 2: 52-3=49\n<answer>\\boxed{49}</answer>",
    "step 99999999999999999999: 1+1=2", "Step 1: " + "9" * 400 + "+1=1", "Step 1:" * 500,
    "<answer><answer></answer>", "=" * 1000, "###STOP###",
]


@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_never_raises(garbage):
    raw, reply = _check(garbage)
    assert reply.kind is VerdictKind.GUIDE and reply.hallucination_flags in ([0], [1])
    assert raw.endswith(("hallucination_detect=0", "hallucination_detect=1"))
    raw, reply = _check("Step 1: 47+5=52", "Continue with the next step.", garbage)
    assert reply.kind is VerdictKind.GUIDE


def test_random_fragments_never_raise():
    pieces = ["Step ", "step", "0", "1", "2", "3", "4", ":", " ", "\n", "47", "+", "-", "*", "x", "=", "52", "49",
              "57", "<answer>", "</answer>", "\\boxed{", "}", "{", ".", "×", "−", "a", "<think>"]
    rng = random.Random(0)
    for _ in range(2000):
        turns = ["".join(rng.choice(pieces) for _ in range(rng.randrange(40))) for _ in range(rng.randrange(4))]
        reply = _check(*turns)[1]
        assert reply.kind is VerdictKind.GUIDE or turns and "###STOP###" in checker.verify(_request(*turns))


def test_garbage_turn_gets_the_format_hint():
    assert _check("I think the answer is big.")[1].guidance == "Write the steps as 'Step k: a+b=c'."
    assert _check("Step 1: 47+5=52", "Continue with the next step.", "hmm")[1].guidance == \
        "Write the steps as 'Step k: a+b=c'."
    # an unfixed error is repeated rather than a format hint
    assert _check("Step 1: 47+5=51", "Check step 1: 47+5 is not 51.", "hmm")[1].guidance == \
        "Check step 1: 47+5 is not 51."
    assert _check()[1].guidance == "Write the steps as 'Step k: a+b=c'."  # no policy turn at all


def test_problem_inside_a_format_prompt_and_unparseable_problem():
    wrapped = f"{PROBLEM} Solve it step by step, e.g. 'Step 1: 2+2=4', then <answer>\\boxed{{N}}</answer>."
    assert _check(SOLUTION, problem=wrapped)[1].kind is VerdictKind.STOP
    with pytest.raises(ValueError, match="no 'Compute"):
        checker.verify(_request(SOLUTION, problem="What is 2+2?"))
    with pytest.raises(ValueError, match="left-nested"):
        checker.verify(_request(SOLUTION, problem="Compute 47+(5-3)."))


def test_property_true_solutions_stop_and_single_corruptions_are_pinpointed():
    rng = random.Random(0)
    rows = make_dataset(100, difficulty="easy", seed=1) + make_dataset(100, difficulty="med", seed=2)
    for row in rows:
        raw, reply = _check(row["solution"], problem=row["problem"])
        assert reply.kind is VerdictKind.STOP and reply.hallucination_flags == [1], (row["problem"], raw)

        steps = [dict(s) for s in row["steps"]]
        j = rng.randrange(len(steps))
        kind = rng.choice(["result", "lhs", "rhs", "op"])
        step = steps[j]
        if kind == "result":
            step["result"] += rng.choice([-10, -2, -1, 1, 2, 10])
        elif kind == "lhs":
            step["lhs"] += rng.choice([-3, -1, 1, 3])
        elif kind == "rhs":
            step["rhs"] += rng.choice([1, 2])
        else:
            step["op"] = rng.choice([o for o in "+-*" if o != step["op"]])
        lines = [f"Step {i}: {s['lhs']}{s['op']}{s['rhs']}={s['result']}" for i, s in enumerate(steps, start=1)]
        boxed = rng.choice([row["answer"], str(steps[-1]["result"])])
        policy = "\n".join(lines + [f"<answer>\\boxed{{{boxed}}}</answer>"])
        raw, reply = _check(policy, problem=row["problem"])
        assert reply.kind is VerdictKind.GUIDE, (policy, raw)
        assert _steps_named(reply.guidance) == {j + 1}, (row["problem"], policy, raw)
        # only numbers the problem or the policy itself wrote: never a correct result it did not find
        allowed = _numbers(row["problem"]) | _numbers(policy)
        assert _numbers(reply.guidance) <= allowed, (policy, raw)
        truth = row["steps"][j]["result"]
        if str(truth) not in re.findall(r"-?\d+", policy):
            assert truth not in _numbers(reply.guidance)


# -- FunctionVerifier --------------------------------------------------------------------------------------
def test_function_verifier_from_config_runs_the_checker():
    cfg = VerifierConfig(function=f"{CHECKER_PATH}:verify", stop_token="<<done>>")
    verifier = FunctionVerifier.from_config(cfg)
    reply = asyncio.run(verifier.verify(_request(SOLUTION)))  # the checker is handed the configured stop token
    assert reply.kind is VerdictKind.STOP and reply.hallucination_flags == [1] and reply.latency_s >= 0
    reply = asyncio.run(verifier.verify(_request("Step 1: 47+5=51")))
    assert reply.kind is VerdictKind.GUIDE and reply.guidance == "Check step 1: 47+5 is not 51."
    asyncio.run(verifier.aclose())
    with pytest.raises(LoadError, match="verifier.function.*no such file"):
        FunctionVerifier.from_config(VerifierConfig(function="nope.py:verify"))
    with pytest.raises(LoadError, match="has no function 'missing'.*verify"):
        FunctionVerifier.from_config(VerifierConfig(function=f"{CHECKER_PATH}:missing"))


def test_function_verifier_errors_become_failed_replies(tmp_path: Path):
    user = tmp_path / "user_verifier.py"
    user.write_text(
        "import asyncio\n"
        "def boom(request):\n    raise ZeroDivisionError('user bug here')\n"
        "def not_text(request):\n    return 42\n"
        "async def async_ok(request):\n    await asyncio.sleep(0)\n"
        "    return 'Look again.\\n[SCORE] hallucination_detect=0'\n"
        "async def async_boom(request):\n    raise KeyError('k')\n"
        "def slow_ok(request):\n    return '###STOP###'\n")

    def run(name: str, **kw):
        verifier = FunctionVerifier.from_config(VerifierConfig(function=f"{user}:{name}"))
        for key, value in kw.items():
            setattr(verifier, key, value)
        return asyncio.run(verifier.verify(_request("Step 1: 47+5=52")))

    reply = run("boom")
    assert reply.kind is VerdictKind.FAILED and "ZeroDivisionError" in reply.error and "user bug here" in reply.error
    reply = run("not_text")
    assert reply.kind is VerdictKind.FAILED and "int" in reply.error
    reply = run("async_boom")
    assert reply.kind is VerdictKind.FAILED and "KeyError" in reply.error
    reply = run("async_ok")
    assert reply.kind is VerdictKind.GUIDE and reply.guidance == "Look again." and reply.hallucination_flags == [0]
    assert run("slow_ok", run_in_thread=True).kind is VerdictKind.STOP
