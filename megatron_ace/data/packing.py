"""Sequence packing, padded token-budget batching, and a resumable sampler for SFT.

What it does:
- Packs variable-length samples into rows of `seq_length` positions with first-fit- or
  best-fit-decreasing (`PackingAlgorithm` + `PACKERS`), or forms padded batches of similar
  lengths under a token budget (`token_budget_batches`).
- Turns a row of samples into training tensors with no attention across sample boundaries:
  tokens, labels (next-token targets), loss_mask, position_ids restarting at 0 per sample,
  segment ids, `cu_seqlens` for Transformer Engine's THD layout, and for the local (CPU)
  attention a boolean block-diagonal causal mask [B, 1, S, S] where True means masked out
  (Megatron-Core's convention).
- `ResumableSampler`: a seedable order over epochs, reshuffled each epoch, sharded over
  data-parallel ranks, with `state_dict()` (epoch, position) to resume exactly.
- `SFTBatcher`: all of the above behind `next_batch()`.

What it does not do: tokenize (see `sft_dataset.py`) or move tensors to a device.

A sample of L token ids gives L - 1 positions: tokens = ids[:-1], labels = ids[1:], and the
loss mask of a position is the mask of its label token. Padding (pad id, loss mask 0) fills the
tail of a row and forms its own block (its own position ids and `cu_seqlens` segment), so every
query attends to at least itself and no softmax row is empty. Bin composition is fixed once
(packing is global and deterministic); epochs reshuffle the order of rows.

Shape legend: B rows in a micro-batch, S positions per row, N samples.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

PAD_SEGMENT = 0
"""Segment id of padding; samples in a row are numbered 1, 2, ..."""


class PackingAlgorithm(enum.Enum):
    FIRST_FIT_DECREASING = "ffd"
    BEST_FIT_DECREASING = "bfd"


class BatchMode(enum.Enum):
    PACKED = "packed"
    """Several samples per row of exactly `seq_length` positions."""
    PADDED = "padded"
    """One sample per row, rows of similar length padded to the longest, token budget per batch."""


class AttentionFormat(enum.Enum):
    DENSE_MASK = "dense_mask"
    """Boolean [B, 1, S, S] mask, True = masked out: the local (CPU) attention path."""
    THD = "thd"
    """No dense mask (None); attention reads `cu_seqlens` (Transformer Engine, GPU)."""


def first_fit_decreasing(lengths_N: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins (lists of sample indices) by first-fit-decreasing, O(N log N) with a max-tree."""
    order = sorted(range(len(lengths_N)), key=lambda i: (-lengths_N[i], i))
    size = 1
    while size < max(1, len(order)):
        size *= 2
    # tree[1] is the root; leaves tree[size + b] hold the free space of bin b. Unopened bins
    # have full capacity, so "leftmost bin that fits" opens a new bin only when none fits.
    tree = [capacity] * (2 * size)
    bins: list[list[int]] = []
    for i in order:
        need = lengths_N[i]
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


def best_fit_decreasing(lengths_N: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins by best-fit-decreasing: each sample goes to the open bin with the least room left."""
    order = sorted(range(len(lengths_N)), key=lambda i: (-lengths_N[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, bin index) of open bins
    for i in order:
        need = lengths_N[i]
        k = bisect.bisect_left(free, (need, -1))
        if k == len(free):
            bins.append([i])
            room, b = capacity - need, len(bins) - 1
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            room -= need
        if room > 0:
            bisect.insort(free, (room, b))
    return bins


PACKERS: dict[PackingAlgorithm, Callable[[Sequence[int], int], list[list[int]]]] = {
    PackingAlgorithm.FIRST_FIT_DECREASING: first_fit_decreasing,
    PackingAlgorithm.BEST_FIT_DECREASING: best_fit_decreasing,
}


def pack_indices(
    lengths_N: Sequence[int], capacity: int, algorithm: PackingAlgorithm
) -> list[list[int]]:
    """Pack samples of `lengths_N` positions into bins of `capacity`; each bin sorted by index."""
    too_long = [i for i, n in enumerate(lengths_N) if n > capacity or n < 1]
    if too_long:
        i = too_long[0]
        raise ValueError(
            f"{len(too_long)} sample(s) do not fit a row of {capacity} positions "
            f"(first: sample {i} with {lengths_N[i]}); drop or truncate them first"
        )
    return [sorted(b) for b in PACKERS[algorithm](lengths_N, capacity)]


def token_budget_batches(
    lengths_N: Sequence[int], max_tokens: int, *, seed: int, bucket_window: int = 1024
) -> list[list[int]]:
    """Padded batches of similar-length samples with rows x longest <= `max_tokens`.

    Samples are shuffled (seeded), cut into windows of `bucket_window`, sorted by length inside
    each window, then cut greedily; the batches are shuffled again so lengths do not trend.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths_N)).tolist()
    batches: list[list[int]] = []
    for start in range(0, len(order), bucket_window):
        window = sorted(order[start : start + bucket_window], key=lambda i: lengths_N[i])
        batch: list[int] = []
        for i in window:
            if lengths_N[i] > max_tokens:
                raise ValueError(
                    f"sample {i} has {lengths_N[i]} positions > max_tokens {max_tokens}"
                )
            if batch and (len(batch) + 1) * lengths_N[i] > max_tokens:
                batches.append(batch)
                batch = []
            batch.append(i)
        if batch:
            batches.append(batch)
    return [batches[k] for k in rng.permutation(len(batches)).tolist()]


def build_row(
    samples: Sequence[tuple[Sequence[int], Sequence[int]]], seq_length: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """One row of S = `seq_length` positions from (input_ids, loss_mask) samples.

    Returns 1-D tensors [S]: tokens, labels, loss_mask (float), position_ids, segment_ids;
    and `seqlens` [K]: positions per block (samples, then padding if any).
    """
    tokens, labels, mask, pos, seg, seqlens = [], [], [], [], [], []
    for k, (ids, loss_mask) in enumerate(samples, start=1):
        n = len(ids) - 1
        tokens += ids[:-1]
        labels += ids[1:]
        mask += loss_mask[1:]
        pos += range(n)
        seg += [k] * n
        seqlens.append(n)
    used = len(tokens)
    if used > seq_length:
        raise ValueError(f"samples need {used} positions > seq_length {seq_length}")
    if used < seq_length:
        num_pad = seq_length - used
        tokens += [pad_id] * num_pad
        labels += [pad_id] * num_pad
        mask += [0] * num_pad
        pos += range(num_pad)
        seg += [PAD_SEGMENT] * num_pad
        seqlens.append(num_pad)
    return {
        "tokens": torch.tensor(tokens, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "loss_mask": torch.tensor(mask, dtype=torch.float32),
        "position_ids": torch.tensor(pos, dtype=torch.long),
        "segment_ids": torch.tensor(seg, dtype=torch.long),
        "seqlens": torch.tensor(seqlens, dtype=torch.int32),
    }


def block_causal_mask(segment_ids_BS: torch.Tensor) -> torch.Tensor:
    """Bool [B, 1, S, S]: True where query i must NOT attend key j (other block, or j > i)."""
    same_BSS = segment_ids_BS[:, :, None] == segment_ids_BS[:, None, :]
    S = segment_ids_BS.shape[1]
    causal_SS = torch.ones(S, S, dtype=torch.bool, device=segment_ids_BS.device).tril()
    return ~(same_BSS & causal_SS)[:, None]


def collate_rows(
    rows: Sequence[Mapping[str, torch.Tensor]], attention: AttentionFormat
) -> dict[str, Any]:
    """Stack rows into a micro-batch.

    Returns tokens, labels, position_ids, segment_ids [B, S] long; loss_mask [B, S] float;
    attention_mask [B, 1, S, S] bool (True = masked), or for THD None with the rows flattened
    into one packed row ([1, B*S] everywhere); cu_seqlens [K+1] int32 over the flattened B*S
    tokens (THD layout) and max_seqlen (int).
    """
    batch: dict[str, Any] = {
        key: torch.stack([r[key] for r in rows])
        for key in ("tokens", "labels", "loss_mask", "position_ids", "segment_ids")
    }
    seqlens = torch.cat([r["seqlens"] for r in rows])
    cu = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(seqlens, 0)
    batch["cu_seqlens"] = cu
    batch["max_seqlen"] = int(seqlens.max())
    if attention is AttentionFormat.DENSE_MASK:
        batch["attention_mask"] = block_causal_mask(batch["segment_ids"])
    else:
        # THD is one packed row: the B rows go back to back ([1, B*S]), as cu_seqlens counts.
        for key in ("tokens", "labels", "loss_mask", "position_ids", "segment_ids"):
            batch[key] = batch[key].reshape(1, -1)
        batch["attention_mask"] = None
    return batch


class ResumableSampler:
    """Infinite, seeded stream of item indices over epochs, sharded over data-parallel ranks.

    The global stream is perm(epoch 0) + perm(epoch 1) + ..., each epoch's permutation drawn
    from (seed, epoch); rank r takes global positions r, r + W, r + 2W, ... All ranks advance in
    lockstep, so `state_dict()` is the same on every rank and resuming from it continues the
    stream exactly where it stopped.
    """

    def __init__(
        self, num_items: int, *, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1
    ) -> None:
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.num_items, self.seed, self.shuffle = num_items, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self._consumed = 0  # global stream positions consumed by all ranks together
        self._perm_epoch = -1
        self._perm: list[int] = []

    @property
    def epoch(self) -> int:
        return self._consumed // self.num_items

    def _order(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            if self.shuffle:
                self._perm = (
                    np.random.default_rng([self.seed, epoch]).permutation(self.num_items).tolist()
                )
            else:
                self._perm = list(range(self.num_items))
            self._perm_epoch = epoch
        return self._perm

    def next_indices(self, count: int) -> list[int]:
        """This rank's next `count` item indices (may cross into the next epoch)."""
        out = []
        for _ in range(count):
            g = self._consumed + self.rank
            out.append(self._order(g // self.num_items)[g % self.num_items])
            self._consumed += self.world_size
        return out

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self._consumed % self.num_items,
            "consumed": self._consumed,
            "seed": self.seed,
            "num_items": self.num_items,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        for key in ("seed", "num_items", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state {key}={state[key]} does not match this sampler's {getattr(self, key)}"
                )
        self._consumed = int(state["epoch"]) * self.num_items + int(state["position"])


@dataclasses.dataclass(kw_only=True)
class BatchingConfig:
    seq_length: int
    """Positions per row (PACKED) or the longest allowed sample in positions (PADDED)."""
    micro_batch_size: int = 1
    """Rows per micro-batch in PACKED mode (PADDED batches are sized by `max_tokens`)."""
    mode: BatchMode = BatchMode.PACKED
    """PACKED rows of several samples, or PADDED rows of one sample each."""
    algorithm: PackingAlgorithm = PackingAlgorithm.FIRST_FIT_DECREASING
    """Bin packing algorithm for PACKED mode."""
    max_tokens: int = 0
    """Token budget (rows x padded length) of one PADDED batch; 0 means `seq_length`."""
    attention: AttentionFormat = AttentionFormat.DENSE_MASK
    """DENSE_MASK for the local attention (CPU), THD for Transformer Engine (cu_seqlens only)."""
    seed: int = 1234
    """Seed of the epoch shuffles (and of the PADDED bucketing)."""
    shuffle: bool = True
    """Reshuffle the order of rows/batches every epoch."""

    def __post_init__(self) -> None:
        if self.seq_length < 2:
            raise ValueError(f"seq_length must be >= 2, got {self.seq_length}")
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.max_tokens and self.max_tokens < self.seq_length:
            raise ValueError(
                f"max_tokens ({self.max_tokens}) must be >= seq_length ({self.seq_length})"
            )


class SFTBatcher:
    """Micro-batches of SFT samples (packed or padded) in a resumable, seeded order.

    `samples[i]` must give {"input_ids": list[int], "loss_mask": list[int]} (a `datasets.Dataset`
    or a list of dicts). Every unit of the order is a packed row (PACKED) or a whole padded batch
    (PADDED).
    """

    def __init__(
        self,
        samples: Sequence[Mapping[str, Any]],
        cfg: BatchingConfig,
        *,
        pad_id: int,
        lengths: Sequence[int] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.samples, self.cfg, self.pad_id = samples, cfg, pad_id
        if lengths is None:
            # An SFTDataset carries its lengths; otherwise read every sample once.
            lengths = getattr(samples, "lengths", None) or [len(s["input_ids"]) for s in samples]
        positions_N = [n - 1 for n in lengths]
        if cfg.mode is BatchMode.PACKED:
            self.units = pack_indices(positions_N, cfg.seq_length, cfg.algorithm)
        else:
            too_long = [i for i, n in enumerate(positions_N) if n > cfg.seq_length]
            if too_long:
                raise ValueError(
                    f"{len(too_long)} sample(s) exceed seq_length {cfg.seq_length} (first: {too_long[0]})"
                )
            budget = cfg.max_tokens or cfg.seq_length
            self.units = token_budget_batches(positions_N, budget, seed=cfg.seed)
        self.sampler = ResumableSampler(
            len(self.units), seed=cfg.seed, shuffle=cfg.shuffle, rank=rank, world_size=world_size
        )

    @property
    def units_per_micro_batch(self) -> int:
        return self.cfg.micro_batch_size if self.cfg.mode is BatchMode.PACKED else 1

    def micro_batches_per_epoch(self) -> int:
        """Micro-batches one rank draws per epoch (rounded down)."""
        return len(self.units) // (self.units_per_micro_batch * self.sampler.world_size)

    def _pair(self, i: int) -> tuple[Sequence[int], Sequence[int]]:
        s = self.samples[i]
        return s["input_ids"], s["loss_mask"]

    def next_batch(self) -> dict[str, Any]:
        """The next micro-batch (see `collate_rows` for its keys and shapes)."""
        unit_ids = self.sampler.next_indices(self.units_per_micro_batch)
        if self.cfg.mode is BatchMode.PACKED:
            rows = [
                build_row([self._pair(i) for i in self.units[u]], self.cfg.seq_length, self.pad_id)
                for u in unit_ids
            ]
        else:
            members = [self._pair(i) for i in self.units[unit_ids[0]]]
            width = max(len(ids) - 1 for ids, _ in members)
            rows = [build_row([m], width, self.pad_id) for m in members]
        return collate_rows(rows, self.cfg.attention)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.sampler.load_state_dict(state)
