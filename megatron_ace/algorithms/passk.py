"""Evaluation statistics over n sampled answers per problem: pass@k, avg@k and its interval.

- pass@k: the unbiased estimator of Chen et al. 2021 (HumanEval paper), the probability that
  at least one of k answers drawn without replacement from the n sampled is correct,
  1 - C(n-c, k) / C(n, k), computed as the product 1 - prod_{i=n-c+1..n} (1 - k / i), which
  neither overflows nor cancels for large n.
- avg@k: the mean accuracy over k samples per problem, averaged over problems (AIME avg@64).
- A confidence interval for avg@k across problems: normal approximation or a seeded
  percentile bootstrap over problems. It covers problem-sampling noise plus the finite-k noise
  that each problem's accuracy carries; it does not model anything else (prompt or seed choice).

Pure functions of counts: no model, no I/O.
"""

from __future__ import annotations

import enum
import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass


def _check_counts(num_samples: int, num_correct: int, k: int) -> None:
    if num_samples < 1:
        raise ValueError(f"num_samples: must be >= 1, got {num_samples}")
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"num_correct: must be in [0, {num_samples}], got {num_correct}")
    if not 1 <= k <= num_samples:
        raise ValueError(f"k: must be in [1, num_samples={num_samples}], got {k}")


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k for one problem with `num_correct` of `num_samples` answers correct."""
    _check_counts(num_samples, num_correct, k)
    if num_samples - num_correct < k:
        return 1.0  # every k-subset contains a correct answer
    prob_all_wrong = 1.0
    for i in range(num_samples - num_correct + 1, num_samples + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def mean_pass_at_k(num_samples: Sequence[int], num_correct: Sequence[int], k: int) -> float:
    """pass@k averaged over problems (each problem may have its own n)."""
    if len(num_samples) != len(num_correct) or not num_samples:
        raise ValueError(f"num_correct: {len(num_correct)} counts for {len(num_samples)} problems")
    return sum(pass_at_k(n, c, k) for n, c in zip(num_samples, num_correct)) / len(num_samples)


def avg_at_k(correct_PK: Sequence[Sequence[bool | float]]) -> float:
    """avg@k: mean over problems of the mean score of each problem's k samples."""
    return statistics.fmean(per_problem_accuracy(correct_PK))


def per_problem_accuracy(correct_PK: Sequence[Sequence[bool | float]]) -> list[float]:
    """Mean score of each problem's samples (rows may have different lengths, none empty)."""
    if not correct_PK:
        raise ValueError("correct_PK: no problems")
    out = []
    for p, row in enumerate(correct_PK):
        if len(row) == 0:
            raise ValueError(f"correct_PK[{p}]: no samples")
        out.append(sum(float(v) for v in row) / len(row))
    return out


class IntervalMethod(enum.Enum):
    NORMAL = "normal"
    """mean +- z * sample std / sqrt(P): fine for tens of problems and more."""
    BOOTSTRAP = "bootstrap"
    """Percentile bootstrap over problems (seeded): no normality assumption."""


@dataclass(frozen=True)
class Interval:
    mean: float
    """avg@k over all problems."""
    low: float
    """Lower end of the interval."""
    high: float
    """Upper end of the interval."""
    confidence: float
    """Nominal coverage, e.g. 0.95."""
    method: IntervalMethod
    """How the interval was computed."""


def _normal_interval(acc_P: list[float], confidence: float, num_resamples: int, seed: int) -> tuple[float, float]:
    mean = statistics.fmean(acc_P)
    if len(acc_P) < 2:
        return mean, mean
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    half = z * statistics.stdev(acc_P) / math.sqrt(len(acc_P))
    return mean - half, mean + half


def _bootstrap_interval(acc_P: list[float], confidence: float, num_resamples: int, seed: int) -> tuple[float, float]:
    rng = random.Random(seed)
    n = len(acc_P)
    means = sorted(statistics.fmean(rng.choices(acc_P, k=n)) for _ in range(num_resamples))
    tail = (1.0 - confidence) / 2
    lo_idx = min(num_resamples - 1, max(0, math.floor(tail * num_resamples)))
    hi_idx = min(num_resamples - 1, max(0, math.ceil((1.0 - tail) * num_resamples) - 1))
    return means[lo_idx], means[hi_idx]


INTERVALS: dict[IntervalMethod, Callable[[list[float], float, int, int], tuple[float, float]]] = {
    IntervalMethod.NORMAL: _normal_interval,
    IntervalMethod.BOOTSTRAP: _bootstrap_interval,
}


def avg_at_k_interval(
    correct_PK: Sequence[Sequence[bool | float]],
    *,
    confidence: float = 0.95,
    method: IntervalMethod = IntervalMethod.NORMAL,
    num_resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """avg@k with a confidence interval across problems (see IntervalMethod)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: must be in (0, 1), got {confidence}")
    if num_resamples < 1:
        raise ValueError(f"num_resamples: must be >= 1, got {num_resamples}")
    method = IntervalMethod(method)
    acc_P = per_problem_accuracy(correct_PK)
    low, high = INTERVALS[method](acc_P, confidence, num_resamples, seed)
    return Interval(mean=statistics.fmean(acc_P), low=low, high=high, confidence=confidence, method=method)
