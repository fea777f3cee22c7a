"""Guided (closed-loop) rollouts: the policy writes a step, the verifier reads the dialogue and
answers guidance or STOP, the guidance is appended as a user turn, and the policy goes on.

Every sample is its own asyncio task, so samples advance independently: the policy engine is
reached through an :class:`~megatron_guided.rollout.engine.AsyncGenerator` (for the in-process engine
an :class:`~megatron_guided.rollout.batcher.AsyncBatchGenerator` batching the pending requests, for
SGLang the engine's own front), and verifier calls overlap freely. The trajectory is one growing token
sequence: policy turns are appended as sampled (trainable), the verifier's reply as the chat
template's user-turn delta (context). Nothing is re-rendered, so the engine's session cache serves the
whole prefix of every continuation and the trainer sees exactly the sampled tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from megatron_guided.config import VerifierConfig
from megatron_guided.data.dataset import PromptSample
from megatron_guided.rollout.engine import AsyncGenerator, FinishReason, GenerationRequest, SamplingParams
from megatron_guided.rollout.plain import finish_status, sample_seed
from megatron_guided.rollout.trajectory import Trajectory, TrajectoryStatus
from megatron_guided.verifier.base import Turn, VerdictKind, Verifier, VerifierReply, VerifierRequest

FINISH_REQUEST = "Please finish: give your final answer in the required format."
_FINAL_ANSWER = re.compile(r"<answer>.*\\boxed\{.*\}.*</answer>", re.DOTALL)


class VerifierUnavailableError(RuntimeError):
    """The verifier failed after its retries and worker.rollout.verifier.on_failure=fail."""


def has_final_answer(text: str) -> bool:
    """True when the text holds ``<answer>…\\boxed{…}…</answer>`` (whitespace around tags ignored)."""
    return _FINAL_ANSWER.search(re.sub(r"\s*([<>/])\s*", r"\1", text)) is not None


@dataclass(kw_only=True, slots=True)
class ChatDelta:
    """Renders a user turn as the tokens the chat template puts between the end of an assistant
    turn and the start of the next one (computed once per text, never re-tokenising the prefix)."""

    tokenizer: object
    end_of_turn_id: int

    def user_turn(self, text: str, *, turn_closed: bool) -> list[int]:
        sentinel = "\x00SENTINEL\x00"
        messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": sentinel}]
        full = self.tokenizer.apply_chat_template(messages + [{"role": "user", "content": text}],
                                                  add_generation_prompt=True, tokenize=False)
        end_of_turn = self.tokenizer.convert_ids_to_tokens(self.end_of_turn_id)
        marker = sentinel + end_of_turn
        cut = full.find(marker)
        if cut < 0:
            raise ValueError("the chat template does not close an assistant turn with its EOS token; "
                             "cannot append user turns at the token level")
        delta = self.tokenizer(full[cut + len(marker):], add_special_tokens=False)["input_ids"]
        return delta if turn_closed else [self.end_of_turn_id] + delta


@dataclass(kw_only=True)
class GuidedRolloutStats:
    verifier_calls: int = 0
    verifier_failures: int = 0
    verifier_latency_s: float = 0.0
    context_tokens_resent: int = 0
    """Tokens that continuation requests sent again (prompt + earlier turns the engine already saw)."""
    context_tokens_cached: int = 0
    """Of those, the tokens the engine served from its session cache instead of recomputing."""


@dataclass(kw_only=True)
class GuidedRollout:
    """Runs one batch of prompts × n samples, guided as the VerifierConfig says."""

    generator: AsyncGenerator
    verifier: Verifier
    cfg: VerifierConfig
    delta: ChatDelta
    decode: Callable[[list[int]], str]
    max_response_length: int
    stats: GuidedRolloutStats = field(default_factory=GuidedRolloutStats)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    """One event loop for the whole run, so async clients (httpx) stay bound to it."""

    @property
    def max_tokens_per_turn(self) -> int:
        return self.cfg.max_tokens_per_turn or self.max_response_length

    @property
    def max_trajectory_tokens(self) -> int:
        return self.cfg.max_trajectory_tokens or self.max_response_length

    def rollout(self, prompts: Sequence[PromptSample], *, n: int, sampling: SamplingParams, base_seed: int,
                step: int, show_reference: bool, score: Callable[[list[Trajectory]], None],
                guide_when: str | None = None) -> list[Trajectory]:
        """Synchronous entry: all n samples of every prompt. With guide_when=group_failed the open-loop
        slots run and are scored (`score` fills rewards) first, and only groups where all of them
        failed get the verifier in their guided slots."""
        kwargs = dict(n=n, sampling=sampling, base_seed=base_seed, step=step, show_reference=show_reference)
        if (guide_when or self.cfg.guide_when) == "always":
            return self.loop.run_until_complete(self.run(prompts, **kwargs))
        mask = self.guided_mask(n)
        first = self.loop.run_until_complete(self.run(prompts, slots=[k for k in range(n) if not mask[k]], **kwargs))
        score(first)
        solved = {t.group_id for t in first if t.reward_breakdown.get("accuracy", t.reward) > 0}
        failed = {g for g in range(len(prompts)) if g not in solved}
        second = self.loop.run_until_complete(
            self.run(prompts, slots=[k for k in range(n) if mask[k]], failed_groups=failed, **kwargs))
        return sorted(first + second, key=lambda t: (t.group_id, t.extra["slot"]))

    def collect_metrics(self, trajectories: Sequence[Trajectory]) -> dict[str, float]:
        """Turns, guidance, verifier health and prefix-cache reuse since the last call (resets stats)."""
        stats, self.stats = self.stats, GuidedRolloutStats()
        count = len(trajectories)
        guided = [t for t in trajectories if t.guided]
        metrics = {
            "guided/fraction": len(guided) / count,
            "guided/turns_mean": sum(t.num_turns for t in trajectories) / count,
            "guided/corrections_mean": sum(t.num_corrections for t in guided) / max(1, len(guided)),
            "guided/tokens_policy": sum(t.num_policy_tokens for t in trajectories) / count,
            "guided/tokens_context": sum(len(t.response_ids) - t.num_policy_tokens for t in trajectories) / count,
            "verifier/calls": stats.verifier_calls,
            "verifier/failures": stats.verifier_failures,
            "verifier/latency_mean_s": stats.verifier_latency_s / max(1, stats.verifier_calls),
            "verifier/hallucination_score": sum(
                hallucination_score(t, default=self.cfg.default_hallucination_score) for t in guided
            ) / max(1, len(guided)),
            "engine/context_tokens_resent": stats.context_tokens_resent,
            "engine/context_tokens_cached": stats.context_tokens_cached,
        }
        if stats.context_tokens_resent:
            metrics["engine/prefix_reuse"] = stats.context_tokens_cached / stats.context_tokens_resent
        if guided:
            accuracy = [t.reward_breakdown.get("accuracy") for t in guided]
            if None not in accuracy:
                metrics["guided/accuracy_guided"] = sum(accuracy) / len(accuracy)
        return metrics

    def close(self) -> None:
        """Release the verifier's connections, the batcher and the event loop."""
        self.loop.run_until_complete(self.verifier.aclose())
        self.loop.run_until_complete(self.generator.aclose())
        self.loop.close()

    @contextlib.contextmanager
    def fully_guided(self):
        """Every sample guided (for evaluation with the verifier), whatever guided_fraction says."""
        saved = self.cfg
        self.cfg = dataclasses.replace(saved, guided_fraction=1.0)
        try:
            yield
        finally:
            self.cfg = saved

    def guided_mask(self, n: int) -> list[bool]:
        """Which of a group's n samples get the verifier: the last round(guided_fraction·n)."""
        guided = round(self.cfg.guided_fraction * n)
        return [k >= n - guided for k in range(n)]

    async def run(self, prompts: Sequence[PromptSample], *, n: int, sampling: SamplingParams, base_seed: int,
                  step: int, show_reference: bool, slots: Sequence[int] | None = None,
                  failed_groups: set[int] | None = None) -> list[Trajectory]:
        """Trajectories for sample slots `slots` (default all n) of every prompt, ordered by prompt then
        slot. A slot in guided_mask(n) gets the verifier, but with `failed_groups` given only in those
        groups (guide_when=group_failed); every other sample runs open-loop."""
        mask = self.guided_mask(n)
        tasks = []
        for group, prompt in enumerate(prompts):
            for k in (range(n) if slots is None else slots):
                traj = Trajectory(prompt_ids=list(prompt.prompt_ids), group_id=group,
                                  sample_seed=sample_seed(base_seed, step, group, k),
                                  ground_truth=prompt.ground_truth, prompt_index=prompt.index,
                                  vision=prompt.vision)
                traj.guided = mask[k] and (failed_groups is None or group in failed_groups)
                traj.extra["slot"] = k
                reference = prompt.ground_truth if show_reference else None
                tasks.append(self._run_sample(traj, prompt, sampling, reference, f"s{step}-g{group}-k{k}"))
        return list(await asyncio.gather(*tasks))

    async def _policy_turn(self, traj: Trajectory, sampling: SamplingParams, session: str, budget: int):
        request = GenerationRequest(prompt_ids=traj.prompt_ids + traj.response_ids, session_id=session,
                                    vision=traj.vision,
                                    sampling=dataclasses.replace(sampling, max_new_tokens=budget,
                                                                 seed=turn_seed(traj.sample_seed, traj.num_turns)))
        seen_before = len(traj.prompt_ids) + traj.extra.get("engine_seen_tokens", 0)
        completion = await self.generator.generate(request)
        if traj.num_turns > 0:  # a continuation re-sends the whole dialogue the engine has seen
            self.stats.context_tokens_resent += seen_before
            self.stats.context_tokens_cached += min(completion.cached_prompt_tokens, seen_before)
        traj.append(completion.token_ids, completion.logprobs, trainable=True)
        traj.extra["engine_seen_tokens"] = len(traj.response_ids)
        traj.weight_version = completion.weight_version
        return completion

    async def _run_sample(self, traj: Trajectory, prompt: PromptSample, sampling: SamplingParams,
                          reference: str | None, session: str) -> Trajectory:
        try:
            if not traj.guided:
                completion = await self._policy_turn(traj, sampling, session, self.max_response_length)
                traj.status = finish_status(completion.finish_reason)
                traj.extra["finish_reason"] = str(completion.finish_reason)
                return traj
            await self._guided_dialogue(traj, prompt, sampling, reference, session)
            if self.cfg.train_scope == "final_turn":
                traj.train_final_turn_only()
            return traj
        finally:
            self.generator.release_session(session)

    async def _guided_dialogue(self, traj: Trajectory, prompt: PromptSample, sampling: SamplingParams,
                               reference: str | None, session: str) -> None:
        dialogue: list[Turn] = []
        max_corrections = self.cfg.max_corrections if self.cfg.max_corrections >= 0 else self.cfg.max_turns
        while True:
            budget = min(self.max_tokens_per_turn, self.max_trajectory_tokens - len(traj.response_ids))
            completion = await self._policy_turn(traj, sampling, session, budget)
            text = self.decode(completion.token_ids)
            dialogue.append(Turn(role="policy", content=text))
            traj.extra["finish_reason"] = str(completion.finish_reason)
            final = has_final_answer(text)
            out_of_tokens = len(traj.response_ids) >= self.max_trajectory_tokens
            if traj.num_turns >= self.cfg.max_turns or out_of_tokens:
                traj.status = TrajectoryStatus.COMPLETED if final else TrajectoryStatus.TRUNCATED
                return
            if traj.num_corrections >= max_corrections:
                if final:  # no more guidance to give: the answer stands
                    traj.status = TrajectoryStatus.COMPLETED
                    return
                reply = VerifierReply(kind=VerdictKind.STOP)
            else:
                reply = await self._ask_verifier(traj, prompt, dialogue, reference)
            if reply.kind is VerdictKind.FAILED:
                if self.cfg.on_failure == "fail":
                    raise VerifierUnavailableError(f"verifier failed for {session}: {reply.error}")
                if self.cfg.on_failure == "stop" or final:
                    traj.status = TrajectoryStatus.COMPLETED if final else TrajectoryStatus.ABORTED
                    return
                # continue_unguided: the policy finishes on its own
                message = FINISH_REQUEST
            elif reply.kind is VerdictKind.STOP:
                if final:
                    traj.status = TrajectoryStatus.COMPLETED
                    return
                message = FINISH_REQUEST
            else:
                message = reply.guidance
            context = self.delta.user_turn(message, turn_closed=completion.finish_reason is FinishReason.EOS)
            if len(traj.response_ids) + len(context) >= self.max_trajectory_tokens:
                traj.status = TrajectoryStatus.TRUNCATED
                return
            traj.append(context, None, trainable=False)
            traj.num_corrections += 1
            dialogue.append(Turn(role="verifier", content=message))

    async def _ask_verifier(self, traj: Trajectory, prompt: PromptSample, dialogue: list[Turn],
                            reference: str | None) -> VerifierReply:
        request = VerifierRequest(problem=_problem_text(prompt), dialogue=list(dialogue),
                                  reference_answer=reference, images=list(prompt.images),
                                  sample_id=f"{traj.group_id}-{traj.sample_seed}")
        start = time.perf_counter()
        reply = await self.verifier.verify(request)
        self.stats.verifier_calls += 1
        self.stats.verifier_latency_s += time.perf_counter() - start
        traj.hallucination_flags.extend(reply.hallucination_flags)
        if reply.kind is VerdictKind.FAILED:
            self.stats.verifier_failures += 1
            traj.verifier_failures += 1
        return reply


def turn_seed(seed: int, turn: int) -> int:
    """The sample's own seed for its first turn (as in open-loop rollouts), then a distinct seed per
    later turn, mixed so that it never equals a neighbouring sample's seed."""
    return seed if turn == 0 else (seed * 1_000_003 + turn) % (2**63 - 1)


def _problem_text(prompt: PromptSample) -> str:
    """The user message of the prompt, as text (image parts become [IMAGE])."""
    for message in prompt.messages:
        if message["role"] == "user":
            content = message["content"]
            if isinstance(content, str):
                return content
            return "".join(part.get("text", "[IMAGE]") for part in content)
    raise ValueError(f"prompt {prompt.source} has no user message")


def hallucination_score(traj: Trajectory, *, default: float) -> float:
    """Mean of the verifier's flags (1 = no hallucination); `default` when it sent none."""
    flags = traj.hallucination_flags
    return sum(flags) / len(flags) if flags else default
