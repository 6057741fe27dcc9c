"""pass@k against brute-force enumeration and exact binomials; avg@k and its intervals."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import numpy as np
import pytest

from megatron_ace.algorithms.passk import (
    IntervalMethod,
    avg_at_k,
    avg_at_k_interval,
    mean_pass_at_k,
    pass_at_k,
)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_enumeration_of_all_k_subsets(n):
    for c in range(n + 1):
        answers = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(answers, k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


@pytest.mark.parametrize("n, c, k", [(1000, 10, 100), (200, 3, 64), (64, 1, 1), (500, 250, 499), (1024, 0, 8)])
def test_pass_at_k_is_exact_for_large_n(n, c, k):
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)


def test_pass_at_1_is_the_fraction_correct():
    assert pass_at_k(64, 17, 1) == pytest.approx(17 / 64)
    assert mean_pass_at_k([4, 8], [1, 8], 1) == pytest.approx((0.25 + 1.0) / 2)


@pytest.mark.parametrize("args, field", [((0, 0, 1), "num_samples"), ((4, 5, 1), "num_correct"), ((4, 2, 5), "k")])
def test_pass_at_k_rejects_bad_counts(args, field):
    with pytest.raises(ValueError, match=field):
        pass_at_k(*args)


def test_avg_at_k_and_normal_interval_match_numpy():
    rng = np.random.default_rng(0)
    correct_PK = (rng.random((30, 16)) < rng.random((30, 1))).tolist()
    acc = np.asarray(correct_PK, dtype=float).mean(axis=1)
    assert avg_at_k(correct_PK) == pytest.approx(acc.mean())
    interval = avg_at_k_interval(correct_PK, confidence=0.95)
    half = 1.959963984540054 * acc.std(ddof=1) / math.sqrt(len(acc))
    assert (interval.low, interval.high) == pytest.approx((acc.mean() - half, acc.mean() + half))
    assert interval.method is IntervalMethod.NORMAL and interval.mean == pytest.approx(acc.mean())


def test_bootstrap_interval_is_seeded_and_close_to_normal():
    rng = np.random.default_rng(1)
    correct_PK = (rng.random((200, 8)) < rng.random((200, 1))).tolist()
    boot = avg_at_k_interval(correct_PK, method=IntervalMethod.BOOTSTRAP, seed=3, num_resamples=1000)
    assert boot == avg_at_k_interval(correct_PK, method="bootstrap", seed=3, num_resamples=1000)
    assert boot != avg_at_k_interval(correct_PK, method="bootstrap", seed=4, num_resamples=1000)
    normal = avg_at_k_interval(correct_PK)
    assert boot.low < boot.mean < boot.high
    width = normal.high - normal.low
    assert abs(boot.low - normal.low) < 0.15 * width and abs(boot.high - normal.high) < 0.15 * width


@pytest.mark.parametrize("method, trials", [(IntervalMethod.NORMAL, 400), (IntervalMethod.BOOTSTRAP, 60)])
def test_interval_coverage_on_synthetic_benchmarks(method, trials):
    """The 90% interval covers the true expected avg@k in roughly 90% of simulated evaluations."""
    rng = random.Random(7)
    true_p = [rng.random() for _ in range(40)]  # fixed problem difficulties
    true_mean = sum(true_p) / len(true_p)
    hits = 0
    for t in range(trials):
        draws = [[rng.random() < p for _ in range(8)] for p in rng.choices(true_p, k=40)]
        iv = avg_at_k_interval(draws, confidence=0.9, method=method, seed=t, num_resamples=300)
        hits += iv.low <= true_mean <= iv.high
    assert 0.78 <= hits / trials <= 0.98


def test_interval_argument_checks():
    with pytest.raises(ValueError, match="confidence"):
        avg_at_k_interval([[True]], confidence=1.0)
    with pytest.raises(ValueError, match=r"correct_PK\[1\]"):
        avg_at_k([[True], []])
