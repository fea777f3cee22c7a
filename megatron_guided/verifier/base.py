"""The verifier seam: what a verifier reads, what it answers, and how its raw text is parsed.

A verifier reads the problem, optionally the reference answer, and the whole dialogue so far
(the policy's steps and its own earlier replies). It answers with guidance for the policy, or with
STOP once the policy's final answer is correct/complete, and may add a line
``[SCORE] hallucination_detect=0|1`` (1 = no hallucination). Score lines are parsed (on STOP
replies too) and stripped from what the policy sees.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

DEFAULT_STOP_TOKEN = "###STOP###"
_SCORE_LINE = re.compile(r"^[ \t]*\[SCORE\][ \t]*hallucination_detect[ \t]*=[ \t]*([01])\b.*$", re.MULTILINE)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_UNCLOSED_THINK = re.compile(r"^.*?</think>", re.DOTALL)


@dataclass(kw_only=True, slots=True)
class Turn:
    role: str
    """"policy" (a step the policy wrote) or "verifier" (guidance the verifier gave)."""
    content: str


@dataclass(kw_only=True, slots=True)
class VerifierRequest:
    problem: str
    dialogue: list[Turn]
    """Every turn so far, oldest first; the last one is the policy's newest step."""
    reference_answer: str | None = None
    """Shown only where `show_reference` allows it (training by default, never in evaluation)."""
    images: list[Any] = field(default_factory=list)
    sample_id: str = ""


class VerdictKind(str, enum.Enum):
    GUIDE = "guide"
    """Guidance text for the policy."""
    STOP = "stop"
    """The verifier accepts the policy's answer (or has nothing to add)."""
    FAILED = "failed"
    """No usable reply (transport failure after retries, unusable text); `on_failure` decides."""


@dataclass(kw_only=True, slots=True)
class VerifierReply:
    kind: VerdictKind
    guidance: str = ""
    """What the policy will see: score lines and reasoning removed. Empty unless kind is GUIDE."""
    hallucination_flags: list[int] = field(default_factory=list)
    raw_text: str = ""
    error: str | None = None
    latency_s: float = 0.0


@runtime_checkable
class Verifier(Protocol):
    async def verify(self, request: VerifierRequest) -> VerifierReply: ...

    async def aclose(self) -> None: ...


def parse_verifier_text(text: str, *, stop_token: str = DEFAULT_STOP_TOKEN) -> VerifierReply:
    """Raw verifier text → reply: drop ``<think>…</think>`` reasoning, collect and strip ``[SCORE]``
    lines, detect the stop token anywhere in what is left.

    >>> parse_verifier_text("Step 2 is wrong: 41+9 is 50.\\n[SCORE] hallucination_detect=1").guidance
    'Step 2 is wrong: 41+9 is 50.'
    >>> parse_verifier_text("###STOP###\\n[SCORE] hallucination_detect=0").hallucination_flags
    [0]
    """
    visible = _THINK.sub("", text)
    if "</think>" in visible:  # a reply whose opening tag was in the prompt (thinking-mode templates)
        visible = _UNCLOSED_THINK.sub("", visible)
    flags = [int(m.group(1)) for m in _SCORE_LINE.finditer(visible)]
    visible = _SCORE_LINE.sub("", visible).strip()
    if stop_token in visible:
        return VerifierReply(kind=VerdictKind.STOP, hallucination_flags=flags, raw_text=text)
    if visible.lower().startswith("user:"):
        visible = visible[len("user:"):].strip()
    if not re.search(r"[A-Za-z0-9]", visible):
        return VerifierReply(kind=VerdictKind.FAILED, hallucination_flags=flags, raw_text=text,
                             error="verifier reply has no guidance text and no stop token")
    return VerifierReply(kind=VerdictKind.GUIDE, guidance=visible, hallucination_flags=flags, raw_text=text)
