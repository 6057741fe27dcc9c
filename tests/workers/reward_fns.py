"""Reward functions for reward-pool tests: importable by spawned worker processes."""

import os
import time


def length_reward(item: tuple[str, str]) -> float:
    """A reward that depends on the response text, so that order mix-ups show."""
    text, _ = item
    return (len(text) % 7) / 6.0


def misbehaving_reward(item: tuple[str, str]) -> float:
    """"crash" kills the worker, "hang" never returns, "raise" raises; else exact match."""
    text, answer = item
    if text == "crash":
        os._exit(3)
    if text == "hang":
        time.sleep(3600)
    if text == "raise":
        raise ValueError("unparsable")
    return float(text == answer)
