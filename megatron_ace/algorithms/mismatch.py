"""Trainer-vs-rollout logprob mismatch as reducible sums.

The trainer's logprob of each sampled token should equal the rollout engine's right after a
weight sync (same weights, same temperature); a gap means a mapping, sync or numerics bug, and
makes the "on-policy" update off-policy. These metrics compare the two per token:
|trainer - engine|, the importance ratio r = exp(trainer - engine) (exactly 1 when they agree),
the share of tokens a PPO clip at `clip_eps` would cut, and the k3 estimate of
KL(engine || trainer).

They are computed as SUMS and extremes over tokens (`mismatch_sums`), so micro-batches and
data-parallel ranks combine them by adding (`*_max` / `*_min`: max / min) before
`mismatch_metrics` turns them into means, exactly as if every token had been seen at once.
Pure tensor math: no torch.distributed, no I/O.

Shape legend: N tokens (any shape works; the mask selects the tokens compared).
"""

from __future__ import annotations

import math

import torch

PREFIX = "mm_"
"""Key prefix of the sums, so they can share a dict with other loss sums."""


def mismatch_sums(trainer_logp_N: torch.Tensor, rollout_logp_N: torch.Tensor,
                  mask_N: torch.Tensor, *, clip_eps: float) -> dict[str, torch.Tensor]:
    """Sums and extremes over the tokens where `mask_N` is nonzero (float64, detached).

    The ratio's spread is kept as the sum of (r - 1)^2, not of r^2, so that the variance of
    ratios within 1e-6 of 1 survives the subtraction in `mismatch_metrics`.
    """
    if not trainer_logp_N.shape == rollout_logp_N.shape == mask_N.shape:
        raise ValueError(f"shapes: trainer {tuple(trainer_logp_N.shape)}, rollout "
                         f"{tuple(rollout_logp_N.shape)}, mask {tuple(mask_N.shape)}")
    on = mask_N.detach() > 0
    diff = (trainer_logp_N.detach().double() - rollout_logp_N.detach().double())[on]
    ratio = diff.exp()
    dev = ratio - 1.0
    clipped = (ratio < 1.0 - clip_eps) | (ratio > 1.0 + clip_eps)
    empty = diff.numel() == 0
    zero = diff.new_zeros(())
    return {
        f"{PREFIX}tokens": diff.new_tensor(float(diff.numel())),
        f"{PREFIX}abs_diff": diff.abs().sum(),
        f"{PREFIX}abs_diff_max": zero if empty else diff.abs().max(),
        f"{PREFIX}ratio_dev": dev.sum(),
        f"{PREFIX}ratio_dev_sq": (dev * dev).sum(),
        f"{PREFIX}ratio_max": diff.new_tensor(-math.inf) if empty else ratio.max(),
        f"{PREFIX}ratio_min": diff.new_tensor(math.inf) if empty else ratio.min(),
        f"{PREFIX}clipped": clipped.double().sum(),
        # k3 = r - 1 - log r: unbiased for KL(rollout || trainer), >= 0.
        f"{PREFIX}k3": (dev - diff).sum(),
    }


def mismatch_metrics(sums: dict[str, float], prefix: str = "mismatch/") -> dict[str, float]:
    """Means from (reduced) `mismatch_sums`; {} when no token was compared."""
    n = float(sums.get(f"{PREFIX}tokens", 0.0))
    if n <= 0:
        return {}
    mean_dev = float(sums[f"{PREFIX}ratio_dev"]) / n
    var = max(0.0, float(sums[f"{PREFIX}ratio_dev_sq"]) / n - mean_dev * mean_dev)
    values = {
        "logp_abs_diff_mean": float(sums[f"{PREFIX}abs_diff"]) / n,
        "logp_abs_diff_max": float(sums[f"{PREFIX}abs_diff_max"]),
        "ratio_mean": 1.0 + mean_dev,
        "ratio_std": math.sqrt(var),
        "ratio_min": float(sums[f"{PREFIX}ratio_min"]),
        "ratio_max": float(sums[f"{PREFIX}ratio_max"]),
        "ratio_clipped_frac": float(sums[f"{PREFIX}clipped"]) / n,
        "kl_k3": float(sums[f"{PREFIX}k3"]) / n,
        "num_tokens": n,
    }
    return {prefix + k: v for k, v in values.items()}
