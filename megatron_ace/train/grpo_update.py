"""The trainer side of one GRPO step: old logprobs, the policy update, rollout measurements.

Every rollout of the step goes through the trainer's forward exactly once per purpose:

- Strictly on-policy (`grpo.num_updates == 1`, `grpo.fuse_old_logprobs`, the default): the
  update's own forward supplies the old logprobs (its logprobs, detached: the importance ratio
  is exactly 1 and the gradient is that of the clipped surrogate at ratio 1), the
  temperature-adjusted entropy the temperature controller needs, and the trainer-vs-engine
  mismatch. No separate logprob pass.
- Otherwise (`num_updates > 1`, or fusing turned off): a forward-only pass over each
  mini-batch's micro-batches, all before the first update, keeps the old logprobs with the very
  micro-batches the update will use on this rank (same plan, so nothing crosses ranks), and
  measures entropy and mismatch; then the updates.
- Rollouts that are not trained on (zero-variance groups) go through no forward by default:
  entropy and mismatch then cover the rollouts the update trains on (all of them, truncated
  ones included). `measure_filtered=True` adds a forward-only pass over the others so the
  measurements cover every rollout of the step, at the cost of that forward; the pass also runs
  whenever nothing is trained on, so the temperature controller always gets a measurement.
  With `filtered_by_sampled_tokens` those rollouts are measured without a forward: the mean
  -log p of their sampled tokens (engine logprobs) estimates the same entropy without bias.

Losses are token-level: `train_step` divides every micro-batch's loss sum once by the step's
loss tokens over all micro-batches and DP ranks. Measurements are sums reduced the same way
(`StepMetrics.sums`) and turned into means here.

Shape legend: R rows of a micro-batch (1 when packed), S positions, V/tp vocabulary slice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch

from megatron_ace.algorithms.grpo import PolicyLossConfig, policy_loss, split_minibatches
from megatron_ace.algorithms.mismatch import PREFIX as MISMATCH, mismatch_metrics, mismatch_sums
from megatron_ace.model.forward import entropy_from_logits, token_logprobs_from_logits
from megatron_ace.train import grpo_batch
from megatron_ace.train.step import ModelOutput, accumulate_sums, forward_only_sums, train_step
from megatron_ace.utils.logging import get_logger

log = get_logger(__name__)


class LossMode(enum.Enum):
    MEASURE = "measure"
    """Forward only: keep the logprobs (old logprobs of a later update), measure the rollouts."""
    UPDATE = "update"
    """Clipped surrogate against `old_logp` from an earlier MEASURE pass."""
    UPDATE_FUSED = "update_fused"
    """Clipped surrogate against this forward's own logprobs (detached); also measures."""


class GRPOLoss:
    """The training step's loss: logits slice [R, S, V/tp] -> (loss_sum, num_tokens, sums).

    Logprobs use the rollout temperature, as the engine sampled from softmax(logits / T).
    Sums: `ratio_sum`, `clipped_tokens`, `entropy_sum` (over loss tokens), `ratio_dev_max`
    (largest |ratio - 1|: the on-policy check), `kl_sum` when a KL term exists; and when the
    mode measures rollouts, `rollout_entropy_sum` / `rollout_tokens` over every response token
    and the mismatch sums (`mm_*`) against the engine's logprobs.
    """

    def __init__(self, ps: Any, *, vocab_size: int, temperature: float,
                 config: PolicyLossConfig, mode: LossMode, parity: bool = True) -> None:
        self.ps, self.vocab_size, self.temperature = ps, vocab_size, max(temperature, 1e-6)
        self.config, self.mode, self.parity = config, mode, parity
        self.logp_by_mb: dict[int, torch.Tensor] = {}
        """MEASURE: logprobs of each micro-batch by `mb_id` (last pipeline stage only)."""

    def __call__(self, logits_RSV: torch.Tensor, batch: Mapping[str, Any]):
        logp_RS = token_logprobs_from_logits(logits_RSV, batch["labels"], self.ps,
                                             self.vocab_size, self.temperature)
        entropy_RS = entropy_from_logits(logits_RSV.detach(), self.ps, self.vocab_size,
                                         self.temperature)
        sums: dict[str, torch.Tensor] = {}
        if self.mode is not LossMode.UPDATE:
            sums.update(self._rollout_sums(logp_RS, entropy_RS, batch))
        mask_RS = batch["loss_mask"]
        if self.mode is LossMode.MEASURE:
            self.logp_by_mb[batch["mb_id"]] = logp_RS.detach()
            return logp_RS.new_zeros(()), mask_RS.sum().to(torch.int64), sums
        old_RS = logp_RS.detach() if self.mode is LossMode.UPDATE_FUSED else batch["old_logp"]
        loss_sum, num_tokens, m = policy_loss(logp_RS, old_RS, batch["adv"], mask_RS, self.config)
        on = mask_RS > 0
        dev = (logp_RS.detach() - old_RS).exp()[on].sub(1).abs()
        sums.update({
            "ratio_sum": m["ratio_sum"],
            "clipped_tokens": m["clipped_tokens"],
            "entropy_sum": (entropy_RS * mask_RS).sum(),
            "ratio_dev_max": dev.max() if dev.numel() else dev.new_zeros(()),
        })
        if "kl_sum" in m:
            sums["kl_sum"] = m["kl_sum"]
        return loss_sum, num_tokens.to(torch.int64), sums

    def _rollout_sums(self, logp_RS, entropy_RS, batch) -> dict[str, torch.Tensor]:
        response_RS = batch["response_mask"]
        sums = {"rollout_entropy_sum": (entropy_RS * response_RS).sum(),
                "rollout_tokens": response_RS.sum()}
        if self.parity:
            sums.update(mismatch_sums(logp_RS, batch["engine_logp"], batch["parity_mask"],
                                      clip_eps=self.config.clip_low))
        return sums


@dataclasses.dataclass(kw_only=True)
class UpdateSettings:
    """What the trainer side of a step needs besides the rollouts."""

    loss: PolicyLossConfig
    """Clipped surrogate settings."""
    num_updates: int
    """Mini-batches (policy updates) per rollout batch."""
    fuse_old_logprobs: bool
    """With one update: take the old logprobs from the update's own forward."""
    layout: grpo_batch.LayoutConfig
    """Micro-batch layout (packed / padded, budget, attention format)."""
    temperature: float
    """Sampling temperature of the rollouts (logprobs and entropy use it)."""
    vocab_size: int
    """Real vocabulary (TP padding columns are masked)."""
    check_parity: bool = True
    """Measure the trainer-vs-engine mismatch."""
    measure_filtered: bool = False
    """Also measure the rollouts that are not trained on."""
    filtered_by_sampled_tokens: bool = False
    """Measure those from the engine's logprobs of their sampled tokens (no forward) instead of
    a forward-only pass; see `sampled_entropy_sums`."""


def _no_timer(name: str) -> AbstractContextManager:
    return contextlib.nullcontext()


def _plan(rollouts, rows, settings: UpdateSettings, ps) -> list[list[list[int]]]:
    return grpo_batch.plan_micro_batches(rollouts, rows, dp_size=ps.dp_size,
                                         layout=settings.layout)


def _measure(trainer, micro_batches: list[dict], settings: UpdateSettings, ps
             ) -> dict[str, float]:
    """Forward-only MEASURE pass; returns its reduced sums. Each micro-batch gets its
    `old_logp` (on the last pipeline stage, where the loss runs)."""
    loss = GRPOLoss(ps, vocab_size=settings.vocab_size, temperature=settings.temperature,
                    config=settings.loss, mode=LossMode.MEASURE, parity=settings.check_parity)
    sums, _ = forward_only_sums(trainer.opt.model_chunks, micro_batches, ps, loss_fn=loss,
                                output=ModelOutput.LOGITS)
    for mb in micro_batches:
        if mb["mb_id"] in loss.logp_by_mb:
            mb["old_logp"] = loss.logp_by_mb[mb["mb_id"]].to(mb["tokens"].device)
    return sums


def sampled_entropy_sums(rollouts: grpo_batch.Rollouts, rows: list[int]
                         ) -> dict[str, float] | None:
    """Entropy sums of `rows` from the engine's logprobs of the sampled tokens, no forward.

    A token drawn from p has E[-log p(token)] = H(p), so the sum of -log p over the sampled
    response tokens estimates, without bias, the entropy sum the forward pass would measure
    (same keys as its `rollout_*` sums). None when a token's logprob is missing (NaN or
    infinite): the caller then runs the forward pass."""
    total, tokens = 0.0, 0
    for i in rows:
        logp = torch.tensor(rollouts.engine_logp[i], dtype=torch.float64)
        if not bool(torch.isfinite(logp).all()):
            return None
        total -= float(logp.sum())
        tokens += logp.numel()
    return {"rollout_entropy_sum": total, "rollout_tokens": float(tokens)}


def _add_measurements(total: dict[str, torch.Tensor], sums: Mapping[str, float]) -> None:
    """Accumulate the rollout measurements (entropy, mismatch) of one pass into `total`."""
    accumulate_sums(total, {k: torch.tensor(v, dtype=torch.float64) for k, v in sums.items()
                            if k.startswith((MISMATCH, "rollout_"))})


def train_on_rollouts(trainer: Any, rollouts: grpo_batch.Rollouts, keep_B: torch.Tensor,
                      settings: UpdateSettings, *,
                      timer: Callable[[str], AbstractContextManager] = _no_timer
                      ) -> dict[str, float]:
    """Old logprobs (if needed), the policy update(s) on the kept rollouts, and measurements of
    every rollout. Collective over all ranks. Phases are timed as "logprob" and "update"."""
    ps = trainer.ps
    kept = keep_B.nonzero().flatten().tolist()
    dropped = [i for i in range(len(rollouts)) if not bool(keep_B[i])]
    fused = settings.num_updates == 1 and settings.fuse_old_logprobs
    minis = ([[kept[i] for i in m.tolist()] for m in split_minibatches(len(kept),
                                                                        settings.num_updates)]
             if kept else [])
    plans = [_plan(rollouts, rows, settings, ps) for rows in minis]
    batches = [grpo_batch.build_micro_batches(rollouts, plan, ps.dp_rank, settings.layout)
               for plan in plans]
    measured: dict[str, torch.Tensor] = {}
    with timer("logprob"):
        if dropped and (settings.measure_filtered or not kept):
            # Every rank holds the same rollouts, so every rank gets the same estimate (or none).
            sampled = (sampled_entropy_sums(rollouts, dropped)
                       if settings.filtered_by_sampled_tokens else None)
            if sampled is not None:
                _add_measurements(measured, sampled)
            else:
                only_measured = grpo_batch.build_micro_batches(
                    rollouts, _plan(rollouts, dropped, settings, ps), ps.dp_rank,
                    settings.layout, in_loss=False)
                _add_measurements(measured, _measure(trainer, only_measured, settings, ps))
        if not fused:
            for mbs in batches:
                _add_measurements(measured, _measure(trainer, mbs, settings, ps))
    metrics: dict[str, float] = {"update/separate_logprob_pass": float(not fused and bool(kept))}
    with timer("update"):
        if not kept:
            log.info("every group has zero reward variance; no update")
            metrics["update/skipped"] = 1.0
        for j, mbs in enumerate(batches):
            loss = GRPOLoss(ps, vocab_size=settings.vocab_size, temperature=settings.temperature,
                            config=settings.loss, parity=settings.check_parity,
                            mode=LossMode.UPDATE_FUSED if fused else LossMode.UPDATE)
            m = train_step(trainer.opt, trainer.sched, mbs, ps, loss_fn=loss,
                           output=ModelOutput.LOGITS)
            if fused:
                _add_measurements(measured, m.sums)
            if j == 0:
                metrics["update/max_abs_ratio_minus_1_first"] = m.sums["ratio_dev_max"]
            metrics.update({"update/loss": m.loss, "update/grad_norm": m.grad_norm,
                            "update/lr": m.lr, "update/tokens": float(m.num_loss_tokens),
                            "update/ratio_mean": m.extra["ratio_sum"],
                            "update/clip_fraction": m.extra["clipped_tokens"],
                            "update/entropy": m.extra["entropy_sum"]})
    real, held = _positions(rollouts, plans, settings.layout)
    metrics["update/real_token_share"] = real / held if held else float("nan")
    metrics.update(_rollout_metrics({k: float(v) for k, v in measured.items()},
                                    settings.check_parity))
    return metrics


def _positions(rollouts, plans, layout) -> tuple[int, int]:
    """Real and held positions of the update micro-batches over all DP ranks."""
    real = sum(rollouts.num_positions(i) for plan in plans for rank in plan for mb in rank
               for i in mb)
    held = sum(grpo_batch.planned_positions(rollouts, plan, layout) for plan in plans)
    return real, held


def _rollout_metrics(measured: dict[str, float], parity: bool) -> dict[str, float]:
    tokens = measured.get("rollout_tokens", 0.0)
    out = {"rollout/entropy": measured["rollout_entropy_sum"] / tokens if tokens
           else float("nan")}
    if parity:
        out.update(mismatch_metrics(measured))
    return out
