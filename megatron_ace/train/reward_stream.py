"""Rewards scored while the rollouts are still generating.

`RewardStream` takes each prompt's group of samples as soon as the engine finishes it
(`RolloutEngine.generate(..., on_group=stream.submit_group)`) and hands every sample to the
domain's reward pool, which scores it in worker processes (math-verify) or sandboxes (code)
and returns a future. Scoring so overlaps generation; `collect()` then waits only for the
rewards still running, and returns them in group order (prompt i's samples, in sample order),
exactly as scoring after generation would.

A sample whose scoring fails (the worker crashed, hung past the pool's timeout and was killed,
the sandbox broke, or the row could not be parsed) gets reward 0 and is counted in
`num_failed`: it costs that sample, never the step.

What it does not do: retry a failed sample, or score across steps (the step waits for every
reward before the update: the recipe is strictly on-policy).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from megatron_ace.utils.logging import get_logger

log = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class RewardOutcome:
    reward: float
    """The reward used for training (0 when scoring failed)."""
    failed: bool
    """Scoring itself failed (not a wrong answer)."""


class StreamingRewards(Protocol):
    """A domain's reward pool as the stream uses it."""

    def submit(self, item: Any, sample: Any) -> concurrent.futures.Future:
        """Start scoring one sample of `item`'s prompt; the future holds the pool's result."""

    def outcome(self, result: Any) -> RewardOutcome:
        """The reward of a finished result, and whether scoring failed."""

    # Optional: `submit_group(item, samples) -> list[Future]`, all of a prompt's samples at
    # once (math: one worker round trip per group); used instead of `submit` when present.


class RewardStream:
    """Submit groups as they finish; collect the rewards in group order at the end."""

    def __init__(self, rewards: StreamingRewards, items: Sequence[Any]) -> None:
        self.rewards, self.items = rewards, list(items)
        self._futures: list[list[concurrent.futures.Future | None] | None] = [None] * len(items)
        self._submit_errors: dict[tuple[int, int], str] = {}

    def submit_group(self, prompt_index: int, samples: Sequence[Any]) -> None:
        """Called once per prompt, when all of its samples are done (in any prompt order)."""
        if self._futures[prompt_index] is not None:
            raise ValueError(f"prompt {prompt_index}: its group was submitted twice")
        futures: list[concurrent.futures.Future | None] = []
        submit_group = getattr(self.rewards, "submit_group", None)
        if submit_group is not None and samples:
            try:
                futures = list(submit_group(self.items[prompt_index], list(samples)))
            except Exception as exc:  # noqa: BLE001 - e.g. a closed or broken pool
                for j in range(len(samples)):
                    self._submit_errors[(prompt_index, j)] = f"{type(exc).__name__}: {exc}"
                futures = [None] * len(samples)
            self._futures[prompt_index] = futures
            return
        for j, sample in enumerate(samples):
            try:
                futures.append(self.rewards.submit(self.items[prompt_index], sample))
            except Exception as exc:  # noqa: BLE001 - e.g. a closed or broken pool
                self._submit_errors[(prompt_index, j)] = f"{type(exc).__name__}: {exc}"
                futures.append(None)
        self._futures[prompt_index] = futures

    def collect(self) -> tuple[list[float], int]:
        """(rewards of every sample in group order, number of samples whose scoring failed)."""
        missing = [i for i, f in enumerate(self._futures) if f is None]
        if missing:
            raise ValueError(f"groups of prompts {missing[:5]} were never submitted")
        rewards, failed = [], 0
        for i, group in enumerate(self._futures):
            for j, future in enumerate(group):
                outcome = self._outcome(i, j, future)
                rewards.append(outcome.reward)
                failed += outcome.failed
        return rewards, failed

    def _outcome(self, i: int, j: int, future: concurrent.futures.Future | None
                 ) -> RewardOutcome:
        if future is None:
            log.warning("prompt %d sample %d: not scored (%s); reward 0", i, j,
                        self._submit_errors[(i, j)])
            return RewardOutcome(0.0, True)
        try:
            outcome = self.rewards.outcome(future.result())
        except Exception as exc:  # noqa: BLE001 - a failed sample must not fail the step
            log.warning("prompt %d sample %d: scoring failed (%s: %s); reward 0", i, j,
                        type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "")
            return RewardOutcome(0.0, True)
        return outcome


def score_all(rewards: StreamingRewards, items: Sequence[Any],
              groups: Sequence[Sequence[Any]]) -> tuple[list[float], int]:
    """Score finished groups (no overlap): what `RewardStream` gives, for callers that already
    have every sample."""
    stream = RewardStream(rewards, items)
    for i, group in enumerate(groups):
        stream.submit_group(i, group)
    return stream.collect()


OnGroup = Callable[[int, list[Any]], None]
"""Called with (prompt index, that prompt's samples) as each group finishes."""
