"""Rollouts -> training micro-batches, and the GRPO loss as the training step calls it.

Shape legend: B sequences, S positions (prompt + response, padded), G group size.

A sequence is `prompt_ids + response_ids`, right-padded. Position s of the model output
predicts token s + 1, so `labels[s] = tokens[s + 1]` and the loss mask is 1 on the positions
that predict response tokens. Per-sequence advantages ride along as `adv_B`; the logprobs of
the policy that sampled (`old_logp_BS`, computed by the trainer right before the update) are
aligned with the labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from megatron_ace.algorithms.grpo import PolicyLossConfig, policy_loss
from megatron_ace.model.forward import entropy_from_logits, token_logprobs_from_logits


def build_sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                    *, pad_id: int, pad_to_multiple: int = 8) -> dict[str, torch.Tensor]:
    """Right-padded tokens / labels / loss_mask / position_ids for prompt+response pairs."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    seq = max(lengths)
    seq = -(-seq // pad_to_multiple) * pad_to_multiple
    num = len(prompts)
    tokens = torch.full((num, seq), pad_id, dtype=torch.long)
    labels = torch.full((num, seq), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(num, seq)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids = torch.tensor(list(p) + list(r), dtype=torch.long)
        tokens[i, : len(ids)] = ids
        labels[i, : len(ids) - 1] = ids[1:]
        # positions len(p)-1 .. len(p)+len(r)-2 predict the response tokens
        loss_mask[i, len(p) - 1: len(p) + len(r) - 1] = 1.0
    position_ids = torch.arange(seq).expand(num, seq).clone()
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
            "position_ids": position_ids}


def split_micro_batches(batch: Mapping[str, torch.Tensor], indices: Sequence[int],
                        micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Micro-batches of equal shape (the last one padded with zero-mask copies of row 0)."""
    out = []
    idx = list(indices)
    for start in range(0, len(idx), micro_batch_size):
        chunk = idx[start: start + micro_batch_size]
        pad = micro_batch_size - len(chunk)
        rows = torch.tensor(chunk + [chunk[0]] * pad)
        mb = {k: v[rows].clone() for k, v in batch.items()}
        if pad:
            for key in ("loss_mask",):
                mb[key][len(chunk):] = 0.0
        out.append(mb)
    return out


class GRPOLoss:
    """The training step's loss: logits slice [B, S, V/tp] -> (loss_sum, num_tokens, sums).

    Logprobs use the rollout temperature, as the engine sampled from softmax(logits / T).
    Besides the loss it accumulates, per micro-batch, the largest |ratio - 1| (the on-policy
    check) and the temperature-adjusted entropy of the response tokens.
    """

    def __init__(self, ps: Any, *, vocab_size: int, temperature: float,
                 config: PolicyLossConfig) -> None:
        self.ps, self.vocab_size, self.temperature, self.config = ps, vocab_size, temperature, config
        self.max_abs_ratio_dev = 0.0

    def __call__(self, logits_BSV: torch.Tensor, batch: Mapping[str, Any]):
        logp_BS = token_logprobs_from_logits(logits_BSV, batch["labels"], self.ps,
                                             self.vocab_size, self.temperature)
        mask_BS = batch["loss_mask"]
        loss_sum, num_tokens, m = policy_loss(logp_BS, batch["old_logp"], batch["adv"], mask_BS,
                                              self.config)
        on = mask_BS > 0
        if on.any():
            dev = (logp_BS.detach() - batch["old_logp"]).exp()[on].sub(1).abs().max().item()
            self.max_abs_ratio_dev = max(self.max_abs_ratio_dev, dev)
        entropy_BS = entropy_from_logits(logits_BSV.detach(), self.ps, self.vocab_size,
                                         self.temperature)
        sums = {
            "ratio_sum": m["ratio_sum"],
            "clipped_tokens": m["clipped_high_tokens"] + m["clipped_low_tokens"],
            "entropy_sum": (entropy_BS * mask_BS).sum(),
        }
        if "kl_sum" in m:
            sums["kl_sum"] = m["kl_sum"]
        return loss_sum, num_tokens.to(torch.int64), sums
