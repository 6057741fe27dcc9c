"""Rewards while generating: groups go to the reward pool as they finish; a failed scoring
(crashed or hung worker, an error) costs its sample (reward 0, counted), never the step.

Real pools: `RewardPool` worker processes with functions from tests/workers/reward_fns.py, and
the GRPO math reward (math-verify) on a hostile answer that runs past its timeout.
"""

import concurrent.futures
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from megatron_ace.rewards.pool import RewardPool
from megatron_ace.train.reward_stream import RewardOutcome, RewardStream, score_all

sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))
import reward_fns  # noqa: E402


@dataclass
class Item:
    answer: str


@dataclass
class Sample:
    response_text: str


class PoolRewards:
    """A real RewardPool as the stream's reward (what MathRewards / CodeRewards provide)."""

    def __init__(self, fn, timeout_s: float = 2.0) -> None:
        self.pool = RewardPool(fn, num_workers=2, timeout_s=timeout_s)

    def submit(self, item, sample) -> concurrent.futures.Future:
        return self.pool.submit((sample.response_text, item.answer))

    def outcome(self, result) -> RewardOutcome:
        return RewardOutcome(float(result), False)

    def close(self) -> None:
        self.pool.close()


def test_stream_order_is_group_order_whatever_the_finish_order():
    rewards = PoolRewards(reward_fns.length_reward)
    try:
        items = [Item("x") for _ in range(5)]
        groups = [[Sample("a" * (i * 3 + j)) for j in range(4)] for i in range(5)]
        stream = RewardStream(rewards, items)
        for i in (3, 0, 4, 1, 2):  # groups finish out of order
            stream.submit_group(i, groups[i])
        got, failed = stream.collect()
        want = [reward_fns.length_reward((s.response_text, "x")) for g in groups for s in g]
        assert got == want and failed == 0
        assert score_all(rewards, items, groups) == (want, 0)
    finally:
        rewards.close()


def test_crashed_hung_or_raising_worker_fails_only_its_sample():
    rewards = PoolRewards(reward_fns.misbehaving_reward, timeout_s=1.5)
    try:
        items = [Item("42"), Item("7")]
        groups = [[Sample("42"), Sample("crash"), Sample("hang")],
                  [Sample("raise"), Sample("7"), Sample("8")]]
        got, failed = score_all(rewards, items, groups)
        assert got == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        assert failed == 3
        assert rewards.pool.num_killed == 1  # the hung worker was killed and replaced
    finally:
        rewards.close()


def test_group_submitted_twice_or_missing_is_an_error():
    rewards = PoolRewards(reward_fns.length_reward)
    try:
        stream = RewardStream(rewards, [Item("x"), Item("y")])
        stream.submit_group(0, [Sample("a")])
        with pytest.raises(ValueError, match="twice"):
            stream.submit_group(0, [Sample("a")])
        with pytest.raises(ValueError, match=r"never submitted"):
            stream.collect()
    finally:
        rewards.close()


def test_math_reward_timeout_is_a_failed_sample_not_a_wrong_answer():
    from megatron_ace.train.prompts import MathRewards

    # A generous pool timeout (a loaded machine parses slowly): the power tower then ends in
    # math-verify's own timeout, or in the pool's kill; both are TIMEOUT, a failed sample.
    rewards = MathRewards(num_workers=2, timeout_s=30.0)
    try:
        items = [Item("12")]
        groups = [[Sample("so \\boxed{12}"), Sample("\\boxed{13}"),
                   Sample("\\boxed{9^{9^{9^{9}}}}")]]
        got, failed = score_all(rewards, items, groups)
        assert got == [1.0, 0.0, 0.0]
        assert failed == 1  # the hostile power tower: killed after the pool timeout
    finally:
        rewards.close()
