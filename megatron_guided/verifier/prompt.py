"""The verifier's chat messages: a system prompt (built-in or from a file) and one user message that
lays out the problem, the reference answer (when shown) and the whole dialogue so far."""

from __future__ import annotations

from pathlib import Path

from megatron_guided.verifier.base import DEFAULT_STOP_TOKEN, VerifierRequest

DEFAULT_VERIFIER_PROMPT = """\
You check a student's step-by-step solution while it is being written.
Read the problem, the reference answer if one is given, and the dialogue so far.
- If the newest step contains a mistake, point to the first wrong step and say briefly what is wrong.
  Give the smallest hint that lets the student fix it. Never state the final answer.
- If everything so far is right but unfinished, reply with one short nudge for the next step.
- If the student has given a final answer in the required format and it is correct, reply with
  exactly {stop_token}.
End every reply with a line `[SCORE] hallucination_detect=1` if the student's steps only use facts
from the problem and correct reasoning, or `[SCORE] hallucination_detect=0` if they invent facts."""


def load_system_prompt(path: str | None, *, stop_token: str = DEFAULT_STOP_TOKEN) -> str:
    """The built-in prompt, or the file at `path` (``{stop_token}`` is filled in either way)."""
    if path is None:
        template = DEFAULT_VERIFIER_PROMPT
    else:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"worker.rollout.verifier.prompt_template={path}: no such file")
        template = file.read_text()
    return template.replace("{stop_token}", stop_token)


def build_verifier_messages(request: VerifierRequest, *, system_prompt: str,
                            multimodal: bool = False) -> list[dict]:
    """[system, user] chat messages for an LLM verifier. Images are referred to as [IMAGE k]; with
    ``multimodal`` the user content is a part list with one ``{"type": "image"}`` part per image
    right after the problem (the engine or endpoint supplies ``request.images`` in that order)."""
    parts = ["### Problem", request.problem.strip()]
    if request.images:
        parts.append(" ".join(f"[IMAGE {k + 1}]" for k in range(len(request.images))))
    if multimodal and request.images:
        head, tail = "\n".join(parts), "\n".join(_dialogue_parts(request))
        content = ([{"type": "text", "text": head + "\n"}] + [{"type": "image"} for _ in request.images]
                   + [{"type": "text", "text": "\n" + tail}])
        return [{"role": "system", "content": system_prompt}, {"role": "user", "content": content}]
    parts += _dialogue_parts(request)
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": "\n".join(parts)}]


def _dialogue_parts(request: VerifierRequest) -> list[str]:
    """The reference answer (when shown), the dialogue so far and the reply instruction."""
    parts = []
    if request.reference_answer is not None:
        parts += ["### Reference answer", str(request.reference_answer)]
    parts.append("### Dialogue so far")
    for turn in request.dialogue:
        speaker = "Student" if turn.role == "policy" else "You"
        parts.append(f"{speaker}: {turn.content.strip()}")
    parts.append("### Your reply to the student's newest step")
    return parts
