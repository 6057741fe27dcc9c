"""Rollouts -> training micro-batches: packed under a token budget (or padded), balanced over DP.

Shape legend: B sequences of the step, R rows of a micro-batch, S positions per row (T for the
one row of a packed micro-batch).

A sequence is `prompt_ids + response_ids` (L tokens) and gives L - 1 positions: position s reads
token s and predicts token s + 1 (`labels`). The positions that predict response tokens are
`len(prompt) - 1 .. L - 2`; they carry the response mask, the per-token advantage and the
engine's logprob of the sampled token.

Two layouts (`BatchMode`, shared with SFT):
- PACKED: sequences go back to back in one row of at most `max_tokens` positions (first-fit
  decreasing; a sequence longer than the budget gets a micro-batch of its own). Position ids
  restart per sequence, `cu_seqlens` marks the boundaries, and the attention sees either THD
  (`cu_seqlens` only: TE on GPU, the SDPA core attention on CPU) or a dense block-diagonal mask
  (the unfused local attention). Real-token share close to 1 at any length distribution.
- PADDED: `micro_batch_size` sequences per micro-batch, each right-padded to the step's longest
  sequence (the simple layout, kept for comparison).

Data parallelism: every rank holds all rollouts of the step (they are broadcast), so every rank
computes the same plan without communicating. PACKED assigns sequences to DP ranks longest
first, each to the rank with the fewest positions so far (greedy LPT), then packs each rank's
share; PADDED deals rows round-robin. Ranks with fewer micro-batches get empty ones (padding
only, no loss tokens), so every rank runs the same number and the gradient all-reduce and the
pipeline schedule never wait on an unbalanced rank. Under pipeline parallelism every
micro-batch of the step has the same shape (the schedule sizes its buffers once).

What it does not do: compute anything with the model (see `grpo_update.py`), or reorder
sequences in the loss (every quantity is a sum over tokens, so the order does not matter).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from megatron_ace.data.packing import (
    AttentionFormat,
    BatchMode,
    block_causal_mask,
    first_fit_decreasing,
)

PAD_MULTIPLE = 8
"""Packed rows and padded widths are rounded up to a multiple of this (kernel-friendly sizes;
sequence parallelism needs the row length divisible by the TP size, see `pad_multiple`)."""


@dataclasses.dataclass
class Rollouts:
    """One step's rollouts as the trainer sees them (identical on every rank)."""

    prompts: list[list[int]]
    """Prompt token ids of each sequence [B]."""
    responses: list[list[int]]
    """Sampled response token ids of each sequence [B]."""
    adv_B: torch.Tensor
    """Advantage of each sequence (float32)."""
    loss_on_B: torch.Tensor
    """Bool: the sequence's response tokens count in the loss (False: masked, e.g. overlong)."""
    engine_logp: list[list[float]]
    """The engine's logprob of every sampled token (NaN where the engine gave none) [B]."""

    def __post_init__(self) -> None:
        num = len(self.prompts)
        sizes = {"responses": len(self.responses), "adv_B": int(self.adv_B.numel()),
                 "loss_on_B": int(self.loss_on_B.numel()), "engine_logp": len(self.engine_logp)}
        for name, size in sizes.items():
            if size != num:
                raise ValueError(f"Rollouts.{name}: {size} entries for {num} prompts")
        for i, (p, r, lp) in enumerate(zip(self.prompts, self.responses, self.engine_logp)):
            if not p:
                raise ValueError(f"Rollouts.prompts[{i}] is empty")
            if len(lp) != len(r):
                raise ValueError(f"Rollouts.engine_logp[{i}]: {len(lp)} logprobs for "
                                 f"{len(r)} response tokens")

    def __len__(self) -> int:
        return len(self.prompts)

    def num_positions(self, i: int) -> int:
        """Model positions of sequence i (its length minus one)."""
        return len(self.prompts[i]) + len(self.responses[i]) - 1

    def real_positions(self) -> int:
        return sum(self.num_positions(i) for i in range(len(self)))


# ----------------------------------------------------------------------------- planning


@dataclasses.dataclass(kw_only=True)
class LayoutConfig:
    """How one step's sequences become micro-batches."""

    mode: BatchMode = BatchMode.PACKED
    """PACKED under a token budget, or PADDED rows."""
    max_tokens: int = 8192
    """PACKED: positions per micro-batch (a longer sequence goes alone)."""
    micro_batch_size: int = 8
    """PADDED: sequences per micro-batch."""
    attention: AttentionFormat = AttentionFormat.THD
    """PACKED: THD (cu_seqlens) or a dense block-diagonal mask."""
    pad_id: int = 0
    """Token id of padding positions (never in the loss)."""
    multiple: int = PAD_MULTIPLE
    """Row lengths are rounded up to this."""
    uniform_length: bool = False
    """Every micro-batch of the step gets the same shape (pipeline parallelism needs it)."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.micro_batch_size < 1 or self.multiple < 1:
            raise ValueError("LayoutConfig.max_tokens, micro_batch_size and multiple must be >= 1")


def balance_longest_first(rows: Sequence[int], sizes: Sequence[int], num_ranks: int
                          ) -> list[list[int]]:
    """Split `rows` over `num_ranks` so the summed `sizes[row]` are near-equal (greedy LPT:
    longest first, each to the least loaded rank; ties go to the rank with fewer rows, then the
    lower rank). Deterministic; each rank's rows come back in ascending order."""
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    load = [(0, 0, r) for r in range(num_ranks)]
    shares: list[list[int]] = [[] for _ in range(num_ranks)]
    for row in sorted(rows, key=lambda i: (-sizes[i], i)):
        k = min(range(num_ranks), key=lambda j: load[j])
        tokens, count, rank = load[k]
        load[k] = (tokens + sizes[row], count + 1, rank)
        shares[rank].append(row)
    return [sorted(s) for s in shares]


def budget_bins(rows: Sequence[int], sizes: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Pack `rows` into bins of at most `max_tokens` summed sizes (first-fit decreasing); a row
    larger than the budget gets a bin of its own. Bins sorted by their first row."""
    small = [r for r in rows if sizes[r] <= max_tokens]
    bins = [[small[j] for j in b] for b in first_fit_decreasing([sizes[r] for r in small],
                                                                 max_tokens)]
    bins += [[r] for r in rows if sizes[r] > max_tokens]
    return sorted((sorted(b) for b in bins), key=lambda b: b[0])


def plan_micro_batches(rollouts: Rollouts, rows: Sequence[int], *, dp_size: int,
                       layout: LayoutConfig) -> list[list[list[int]]]:
    """Per DP rank, its micro-batches as lists of sequence indices; every rank gets the same
    number of micro-batches (at least one; an empty list is a padding-only micro-batch).

    With `layout.uniform_length` every packed row is as long as the longest anyway, so when a
    sequence exceeds the budget the bins are filled up to that length instead."""
    sizes = [rollouts.num_positions(i) for i in range(len(rollouts))]
    if layout.mode is BatchMode.PACKED:
        capacity = layout.max_tokens
        if layout.uniform_length and rows:
            longest = _round_up(max(sizes[i] for i in rows), layout.multiple)
            capacity = max(capacity, longest)
        plan = [budget_bins(share, sizes, capacity)
                for share in balance_longest_first(rows, sizes, dp_size)]
    else:
        rows, size = list(rows), layout.micro_batch_size
        plan = [[share[k: k + size] for k in range(0, len(share), size)]
                for share in (rows[r::dp_size] for r in range(dp_size))]
    count = max(1, max(len(p) for p in plan))
    return [p + [[] for _ in range(count - len(p))] for p in plan]


def pad_multiple(tp_size: int, sequence_parallel: bool) -> int:
    """Row-length multiple: sequence parallelism splits a row's positions over the TP ranks."""
    return PAD_MULTIPLE * tp_size if sequence_parallel else PAD_MULTIPLE


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def micro_batch_length(rollouts: Rollouts, rows: Sequence[int], mode: BatchMode,
                       multiple: int) -> int:
    """Positions per row that micro-batch `rows` needs (before any uniform padding)."""
    sizes = [rollouts.num_positions(i) for i in rows]
    if mode is BatchMode.PACKED:
        return _round_up(max(1, sum(sizes)), multiple)
    return _round_up(max([1, *sizes]), multiple)


# ----------------------------------------------------------------------------- building


_FIELDS = ("tokens", "labels", "position_ids", "response_mask", "loss_mask", "adv",
           "engine_logp", "parity_mask")


def _flat_sequences(rollouts: Rollouts, rows: Sequence[int], in_loss: bool
                    ) -> tuple[dict[str, torch.Tensor], list[int]]:
    """1-D tensors over the L - 1 positions of each sequence of `rows`, back to back, built from
    flat lists with one tensor per field (a packed step holds hundreds of sequences), and the
    sequences' lengths."""
    tokens: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    response: list[float] = []
    engine: list[float] = []
    seqlens = []
    for i in rows:
        ids = list(rollouts.prompts[i]) + list(rollouts.responses[i])
        n, first = len(ids) - 1, len(rollouts.prompts[i]) - 1
        tokens += ids[:-1]
        labels += ids[1:]
        positions += range(n)
        response += [0.0] * first + [1.0] * (n - first)
        engine += [0.0] * first
        engine += rollouts.engine_logp[i]
        seqlens.append(n)
    lengths = torch.tensor(seqlens, dtype=torch.long)
    rows_t = torch.as_tensor(list(rows), dtype=torch.long)
    response_mask = torch.tensor(response, dtype=torch.float32)
    engine_t = torch.tensor(engine, dtype=torch.float32)
    in_loss_R = rollouts.loss_on_B[rows_t].float() * float(in_loss)
    return {
        "tokens": torch.tensor(tokens, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(positions, dtype=torch.long),
        "response_mask": response_mask,
        "loss_mask": response_mask * torch.repeat_interleave(in_loss_R, lengths),
        "adv": response_mask * torch.repeat_interleave(rollouts.adv_B[rows_t].float(), lengths),
        "engine_logp": torch.nan_to_num(engine_t, nan=0.0),
        "parity_mask": response_mask * torch.isfinite(engine_t).float(),
    }, seqlens


def _padding(n: int, pad_id: int) -> dict[str, torch.Tensor]:
    zeros = torch.zeros(n)
    return {"tokens": torch.full((n,), pad_id, dtype=torch.long),
            "labels": torch.full((n,), pad_id, dtype=torch.long),
            "position_ids": torch.arange(n), **{k: zeros for k in _FIELDS[3:]}}


def build_packed(rollouts: Rollouts, rows: Sequence[int], *, length: int, pad_id: int,
                 attention: AttentionFormat, in_loss: bool = True) -> dict[str, Any]:
    """One packed row [1, length]: the sequences of `rows` back to back, then padding (its own
    segment). Keys: tokens, labels, position_ids [1, T] long; loss_mask, response_mask, adv,
    engine_logp, parity_mask [1, T] float; cu_seqlens [K + 1] int32; max_seqlen; attention_mask
    (None for THD, bool [1, 1, T, T] for DENSE_MASK); rows (the sequence indices)."""
    flat, seqlens = _flat_sequences(rollouts, rows, in_loss)
    parts = [flat]
    used = sum(seqlens)
    if used > length:
        raise ValueError(f"sequences {list(rows)} need {used} positions > row length {length}")
    if used < length:
        parts.append(_padding(length - used, pad_id))
        seqlens.append(length - used)
    batch: dict[str, Any] = {k: torch.cat([p[k] for p in parts])[None] for k in _FIELDS}
    cu = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(seqlens), 0)
    batch["cu_seqlens"] = cu
    batch["max_seqlen"] = max(seqlens)
    if attention is AttentionFormat.DENSE_MASK:
        segment_T = torch.repeat_interleave(torch.arange(len(seqlens)), torch.tensor(seqlens))
        batch["attention_mask"] = block_causal_mask(segment_T[None])
    else:
        batch["attention_mask"] = None
    batch["rows"] = list(rows)
    return batch


def build_padded(rollouts: Rollouts, rows: Sequence[int], *, width: int, num_rows: int,
                 pad_id: int, in_loss: bool = True) -> dict[str, Any]:
    """`num_rows` rows [R, width]: the sequences of `rows`, each right-padded, then rows of
    padding only. Same keys as `build_packed`, without cu_seqlens; causal attention."""
    out_rows = []
    for i in rows:
        seq, (n,) = _flat_sequences(rollouts, [i], in_loss)
        if n > width:
            raise ValueError(f"sequence {i} needs {n} positions > width {width}")
        pad = _padding(width - n, pad_id)
        out_rows.append({k: torch.cat([seq[k], pad[k]]) for k in _FIELDS})
    out_rows += [_padding(width, pad_id) for _ in range(num_rows - len(rows))]
    batch: dict[str, Any] = {k: torch.stack([r[k] for r in out_rows]) for k in _FIELDS}
    batch["position_ids"] = torch.arange(width).expand(num_rows, width).clone()
    batch["attention_mask"] = None
    batch["rows"] = list(rows)
    return batch


def build_micro_batches(rollouts: Rollouts, plan: list[list[list[int]]], dp_rank: int,
                        layout: LayoutConfig, *, in_loss: bool = True) -> list[dict[str, Any]]:
    """This DP rank's micro-batches of `plan` (see `plan_micro_batches`), each tagged with
    `mb_id` (its index). `in_loss=False` builds them for measurement only (no loss tokens)."""
    mode = layout.mode
    if mode is BatchMode.PADDED:
        # The simple layout pads to the step's longest sequence, whichever rows a batch holds.
        every = [i for rank in plan for mb in rank for i in mb]
        width = micro_batch_length(rollouts, every, mode, layout.multiple)
        num_rows = layout.micro_batch_size
        mbs = [build_padded(rollouts, rows, width=width, num_rows=num_rows, pad_id=layout.pad_id,
                            in_loss=in_loss) for rows in plan[dp_rank]]
    else:
        uniform = 0
        if layout.uniform_length:
            uniform = max(micro_batch_length(rollouts, rows, mode, layout.multiple)
                          for rank in plan for rows in rank)
        mbs = [build_packed(rollouts, rows, pad_id=layout.pad_id, attention=layout.attention,
                            in_loss=in_loss,
                            length=uniform or micro_batch_length(rollouts, rows, mode,
                                                                 layout.multiple))
               for rows in plan[dp_rank]]
    for k, mb in enumerate(mbs):
        mb["mb_id"] = k
    return mbs


def planned_positions(rollouts: Rollouts, plan: list[list[list[int]]],
                      layout: LayoutConfig) -> int:
    """Positions (real and padding) that `plan`'s micro-batches hold over all DP ranks, as
    `build_micro_batches` would build them."""
    mbs = [rows for rank in plan for rows in rank]
    if layout.mode is BatchMode.PADDED:
        every = [i for rows in mbs for i in rows]
        width = micro_batch_length(rollouts, every, layout.mode, layout.multiple)
        return len(mbs) * layout.micro_batch_size * width
    lengths = [micro_batch_length(rollouts, rows, layout.mode, layout.multiple) for rows in mbs]
    return len(mbs) * max(lengths) if layout.uniform_length else sum(lengths)


def real_token_share(micro_batches: Sequence[dict[str, Any]], rollouts: Rollouts) -> float:
    """Real (prompt + response) positions over all positions the micro-batches hold."""
    held = sum(int(mb["tokens"].numel()) for mb in micro_batches)
    real = sum(rollouts.num_positions(i) for mb in micro_batches for i in mb["rows"])
    return real / held if held else 0.0
