"""GRPO math: group-normalised advantages, the token-level clipped policy loss, entropy, filters.

Pure tensor functions: no torch.distributed, no I/O, no model. The trainer gathers what crosses
ranks (the global token count) and passes it in.

Shape legend (suffixes of tensor names):
    B  sequences in the batch (B = P * G, grouped contiguously: the G rollouts of prompt 0,
       then the G rollouts of prompt 1, ...)
    P  prompts (groups)
    G  rollouts per prompt (group size)
    T  response tokens (right-padded; `mask_BT` is 1 on real response tokens)
    V  vocabulary

Token-level loss: `policy_loss` returns `(loss_sum, num_tokens, metrics)`; the caller divides
every micro-batch's `loss_sum` by the GLOBAL number of loss tokens (summed over all
micro-batches and data-parallel ranks of the optimizer step) exactly once. Each token then
weighs 1 / (total response tokens of the batch), as in DAPO and AceReason (second-hand: the
AceReason paper's description, not its code), and the gradient does not depend on how the
batch is split.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # bf16 softmax over a 150K vocabulary loses the tail; float64 inputs stay float64.
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ----------------------------------------------------------------------------- advantages


class AdvantageEstimator(enum.Enum):
    GRPO = "grpo"
    """(r - mean_group) / (std_group + eps): the original GRPO."""
    GRPO_NO_STD = "grpo_no_std"
    """r - mean_group: Dr. GRPO's fix for the std's bias toward too easy / too hard prompts."""


def _grouped_P_G(values_B: torch.Tensor, group_size: int) -> torch.Tensor:
    if values_B.dim() != 1:
        raise ValueError(f"rewards_B: expected a 1-D tensor, got shape {tuple(values_B.shape)}")
    if group_size < 1 or values_B.numel() % group_size:
        raise ValueError(f"group_size: {group_size} does not divide the batch of {values_B.numel()}")
    return values_B.view(-1, group_size)


def grpo_advantages_B(
    rewards_B: torch.Tensor, group_size: int, *, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Advantages of each rollout relative to its group: r - mean (divided by std if asked).

    The std is the unbiased sample std (torch.std's default, as GRPO reference code uses); a
    group whose rewards are all equal gets advantage 0 for every rollout.
    """
    rewards_P_G = _grouped_P_G(_at_least_fp32(rewards_B), group_size)
    centered_P_G = rewards_P_G - rewards_P_G.mean(dim=1, keepdim=True)
    if normalize_std and group_size > 1:
        centered_P_G = centered_P_G / (rewards_P_G.std(dim=1, keepdim=True) + eps)
    return centered_P_G.reshape(-1)


ADVANTAGE_ESTIMATORS: dict[AdvantageEstimator, Callable[[torch.Tensor, int], torch.Tensor]] = {
    AdvantageEstimator.GRPO: lambda rewards_B, g: grpo_advantages_B(rewards_B, g, normalize_std=True),
    AdvantageEstimator.GRPO_NO_STD: lambda rewards_B, g: grpo_advantages_B(rewards_B, g, normalize_std=False),
}


def compute_advantages_B(estimator: AdvantageEstimator, rewards_B: torch.Tensor, group_size: int) -> torch.Tensor:
    """Advantages by the named estimator (see ADVANTAGE_ESTIMATORS)."""
    return ADVANTAGE_ESTIMATORS[AdvantageEstimator(estimator)](rewards_B, group_size)


# ----------------------------------------------------------------------------- filters


def nonzero_variance_groups_P(rewards_B: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bool per group: True where the group's rewards are not all equal (it has a signal)."""
    rewards_P_G = _grouped_P_G(rewards_B, group_size)
    return (rewards_P_G != rewards_P_G[:, :1]).any(dim=1)


def zero_variance_filter_B(rewards_B: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bool keep-mask per rollout: drops every rollout of an all-correct / all-wrong group.

    Such groups have zero advantage under GRPO and only dilute the token-level denominator
    (dynamic sampling, DAPO).
    """
    return nonzero_variance_groups_P(rewards_B, group_size).repeat_interleave(group_size)


def overlong_filter_mask_BT(mask_BT: torch.Tensor, truncated_B: torch.Tensor, *, enabled: bool) -> torch.Tensor:
    """Loss mask with truncated rollouts removed when `enabled` (AceReason's early stages).

    A truncated response never reached an answer, so its reward says nothing about its tokens;
    masking keeps them out of the loss and out of the token count. `truncated_B` is bool (or 0/1).
    """
    if truncated_B.shape != mask_BT.shape[:1]:
        raise ValueError(f"truncated_B: shape {tuple(truncated_B.shape)} does not match mask_BT {tuple(mask_BT.shape)}")
    if not enabled:
        return mask_BT
    return mask_BT * (~truncated_B.bool()).unsqueeze(1).to(mask_BT.dtype)


def split_minibatches(num_samples: int, num_minibatches: int = 1) -> list[torch.Tensor]:
    """Index tensors of `num_minibatches` contiguous, near-equal slices of a rollout batch.

    One slice per policy update; k = 1 (the default) is strictly on-policy. Rollouts stay in
    their original order, so a group is split only if the slice sizes force it.
    """
    if num_minibatches < 1 or num_minibatches > num_samples:
        raise ValueError(f"num_minibatches: must be in [1, {num_samples}], got {num_minibatches}")
    return list(torch.arange(num_samples).tensor_split(num_minibatches))


# ----------------------------------------------------------------------------- log-probs, entropy


def token_logprobs_BT(logits_BTV: torch.Tensor, tokens_BT: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) under softmax(logits / temperature): what vLLM reports for sampled tokens."""
    logp_BTV = torch.log_softmax(_at_least_fp32(logits_BTV) / temperature, dim=-1)
    return logp_BTV.gather(-1, tokens_BT.unsqueeze(-1)).squeeze(-1)


def token_entropy_BT(logits_BTV: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (nats) of softmax(logits / temperature) at every position.

    With the sampling temperature this is the temperature-adjusted entropy AceReason tracks.
    """
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    logp_BTV = torch.log_softmax(_at_least_fp32(logits_BTV) / temperature, dim=-1)
    p_BTV = logp_BTV.exp()
    # -inf logits (masked vocabulary padding) have p = 0 and contribute 0, not 0 * -inf = nan.
    return -torch.where(p_BTV > 0, p_BTV * logp_BTV, torch.zeros_like(p_BTV)).sum(dim=-1)


def entropy_metrics(
    logits_BTV: torch.Tensor, mask_BT: torch.Tensor, *, temperatures: tuple[float, ...] = (1.0,)
) -> dict[str, torch.Tensor]:
    """Sums of token entropy over masked tokens, per temperature, plus the token count.

    Keys: `entropy_sum@T` for each T, and `num_tokens`; divide after summing over micro-batches
    and ranks. Computed without grad.
    """
    with torch.no_grad():
        out = {"num_tokens": mask_BT.sum().float()}
        for t in temperatures:
            out[f"entropy_sum@{t:g}"] = (token_entropy_BT(logits_BTV, temperature=t) * mask_BT).sum()
    return out


# ----------------------------------------------------------------------------- loss


@dataclass(frozen=True, kw_only=True)
class PolicyLossConfig:
    clip_low: float = 0.2
    """Lower clip: the ratio is held above 1 - clip_low where the advantage is negative."""
    clip_high: float = 0.2
    """Upper clip: the ratio is held below 1 + clip_high where the advantage is positive (0.28 = clip-higher)."""
    kl_coef: float = 0.0
    """Weight of the k3 KL estimate to a reference policy; 0 (off) as in AceReason."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"clip_low: must be in [0, 1), got {self.clip_low}")
        if not self.clip_high >= 0.0:
            raise ValueError(f"clip_high: must be >= 0, got {self.clip_high}")
        if not (self.kl_coef >= 0.0 and math.isfinite(self.kl_coef)):
            raise ValueError(f"kl_coef: must be a finite number >= 0, got {self.kl_coef}")


def kl_k3_BT(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(pi || ref) per token: exp(d) - d - 1 with d = ref_logp - logp (>= 0)."""
    d_BT = ref_logp_BT - logp_BT
    return torch.exp(d_BT) - d_BT - 1.0


def policy_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    adv_B: torch.Tensor,
    mask_BT: torch.Tensor,
    config: PolicyLossConfig = PolicyLossConfig(),
    ref_logp_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level clipped surrogate (PPO/GRPO) with separate low/high clip and optional KL.

    Per token: -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) (+ kl_coef * k3),
    ratio = exp(logp - old_logp). `adv_B` is one advantage per sequence [B], or per token
    [B, T] (packed rows hold several sequences). Returns `(loss_sum, num_tokens, metrics)`: the
    sum over masked tokens (differentiable in `logp_BT`), the masked token count, and detached
    metric sums/extremes to reduce with `reduce_loss_metrics`. Divide `loss_sum` by the global
    token count of the step; do not average per micro-batch.
    """
    if not (logp_BT.shape == old_logp_BT.shape == mask_BT.shape
            and adv_B.shape in (logp_BT.shape[:1], logp_BT.shape)):
        raise ValueError(
            f"shapes: logp_BT {tuple(logp_BT.shape)}, old_logp_BT {tuple(old_logp_BT.shape)}, "
            f"mask_BT {tuple(mask_BT.shape)}, adv_B {tuple(adv_B.shape)}"
        )
    if config.kl_coef > 0 and ref_logp_BT is None:
        raise ValueError("ref_logp_BT: required when kl_coef > 0")
    mask_BT = mask_BT.to(logp_BT.dtype)
    adv_BT = adv_B.to(logp_BT.dtype)
    if adv_BT.dim() == 1:
        adv_BT = adv_BT.unsqueeze(1)
    ratio_BT = torch.exp(logp_BT - old_logp_BT.detach())
    surr_BT = ratio_BT * adv_BT
    clipped_BT = ratio_BT.clamp(1.0 - config.clip_low, 1.0 + config.clip_high) * adv_BT
    per_token_BT = -torch.minimum(surr_BT, clipped_BT)
    kl_BT = None
    if ref_logp_BT is not None:  # logged even when kl_coef = 0: drift from the reference is worth watching
        kl_BT = kl_k3_BT(logp_BT, ref_logp_BT.detach())
        if config.kl_coef > 0:
            per_token_BT = per_token_BT + config.kl_coef * kl_BT
    loss_sum = (per_token_BT * mask_BT).sum()
    num_tokens = mask_BT.sum().detach()
    metrics = _loss_metrics(ratio_BT.detach(), adv_BT.detach(), mask_BT, config, kl_BT)
    return loss_sum, num_tokens, metrics


def _loss_metrics(ratio_BT, adv_BT, mask_BT, config, kl_BT) -> dict[str, torch.Tensor]:
    on_BT = mask_BT > 0
    # A token is clipped when the clipped branch is active and flat: its gradient is zero.
    clip_high_BT = (adv_BT > 0) & (ratio_BT > 1.0 + config.clip_high) & on_BT
    clip_low_BT = (adv_BT < 0) & (ratio_BT < 1.0 - config.clip_low) & on_BT
    masked_ratio = ratio_BT[on_BT]
    empty = masked_ratio.numel() == 0
    metrics = {
        "num_tokens": mask_BT.sum().detach(),
        "clipped_high_tokens": clip_high_BT.sum().float(),
        "clipped_low_tokens": clip_low_BT.sum().float(),
        "clipped_tokens": (clip_high_BT | clip_low_BT).sum().float(),
        "ratio_sum": (ratio_BT * mask_BT).sum(),
        "ratio_max": masked_ratio.max() if not empty else ratio_BT.new_tensor(float("-inf")),
        "ratio_min": masked_ratio.min() if not empty else ratio_BT.new_tensor(float("inf")),
    }
    if kl_BT is not None:
        metrics["kl_sum"] = (kl_BT.detach() * mask_BT).sum()
    return metrics


def reduce_loss_metrics(metrics_list: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Combine micro-batch metrics (sums add, extremes take max/min) into token means.

    Gives `clip_fraction`, `clip_fraction_low/high`, `ratio_mean`, `ratio_max`, `ratio_min`,
    `kl_mean` (when present). Across DP ranks, all-reduce the same sums first (SUM/MAX/MIN).
    """
    if not metrics_list:
        raise ValueError("metrics_list: empty")
    total: dict[str, float] = {}
    for metrics in metrics_list:
        for key, value in metrics.items():
            v = float(value)
            if key.endswith("_max"):
                total[key] = max(total.get(key, -math.inf), v)
            elif key.endswith("_min"):
                total[key] = min(total.get(key, math.inf), v)
            else:
                total[key] = total.get(key, 0.0) + v
    n = max(total["num_tokens"], 1.0)
    out = {
        "clip_fraction_high": total["clipped_high_tokens"] / n,
        "clip_fraction_low": total["clipped_low_tokens"] / n,
        "clip_fraction": total["clipped_tokens"] / n,
        "ratio_mean": total["ratio_sum"] / n,
        "ratio_max": total["ratio_max"],
        "ratio_min": total["ratio_min"],
        "num_tokens": total["num_tokens"],
    }
    if "kl_sum" in total:
        out["kl_mean"] = total["kl_sum"] / n
    return out
