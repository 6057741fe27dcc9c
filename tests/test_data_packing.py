"""Packing: bins are valid and match simple reference packers; a packed row gives every sample
the same per-token loss as running it alone (tiny SDPA attention model); the sampler resumes
exactly."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from tolerances import LOGPROB_ATOL

from megatron_ace.data.packing import (
    AttentionFormat,
    BatchingConfig,
    BatchMode,
    PackingAlgorithm,
    ResumableSampler,
    SFTBatcher,
    block_causal_mask,
    build_row,
    collate_rows,
    pack_indices,
    token_budget_batches,
)

VOCAB = 50


def _reference_fit(lengths, capacity, best):
    """Quadratic first-fit / best-fit decreasing, the textbook way."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins, free = [], []
    for i in order:
        fits = [b for b, f in enumerate(free) if f >= lengths[i]]
        if not fits:
            bins.append([i])
            free.append(capacity - lengths[i])
            continue
        b = min(fits, key=lambda b: (free[b], b)) if best else fits[0]
        bins[b].append(i)
        free[b] -= lengths[i]
    return sorted(sorted(b) for b in bins)


@pytest.mark.parametrize("algorithm", list(PackingAlgorithm))
def test_packers_match_reference_and_are_valid(algorithm):
    rng = random.Random(0)
    for _ in range(20):
        capacity = rng.choice([16, 64, 100])
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 200))]
        bins = pack_indices(lengths, capacity, algorithm)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
        assert len(bins) >= math.ceil(sum(lengths) / capacity)
        best = algorithm is PackingAlgorithm.BEST_FIT_DECREASING
        assert sorted(bins) == _reference_fit(lengths, capacity, best)


def test_pack_rejects_samples_longer_than_a_row():
    with pytest.raises(ValueError, match="sample 1 with 9"):
        pack_indices([3, 9], 8, PackingAlgorithm.FIRST_FIT_DECREASING)


def _samples(n, seed, lo=3, hi=20):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        out.append({"input_ids": ids, "loss_mask": [0] * prompt + [1] * (length - prompt)})
    return out


def test_row_fields_and_cu_seqlens():
    samples = _samples(5, seed=1)
    row = build_row([(s["input_ids"], s["loss_mask"]) for s in samples[:2]], 40, pad_id=0)
    a, b = samples[0]["input_ids"], samples[1]["input_ids"]
    na, nb = len(a) - 1, len(b) - 1
    assert row["tokens"][:na].tolist() == a[:-1] and row["labels"][:na].tolist() == a[1:]
    assert (
        row["tokens"][na : na + nb].tolist() == b[:-1]
        and row["labels"][na : na + nb].tolist() == b[1:]
    )
    assert row["position_ids"][: na + nb].tolist() == list(range(na)) + list(range(nb))
    assert row["loss_mask"][:na].tolist() == samples[0]["loss_mask"][1:]
    assert row["loss_mask"][na + nb :].sum() == 0 and row["segment_ids"][na + nb :].eq(0).all()
    batch = collate_rows([row, row], AttentionFormat.THD)
    assert batch["attention_mask"] is None
    seg = batch["segment_ids"].flatten()
    boundaries = (
        [0] + [k for k in range(1, len(seg)) if seg[k] != seg[k - 1] or k % 40 == 0] + [len(seg)]
    )
    assert batch["cu_seqlens"].tolist() == boundaries
    assert batch["cu_seqlens"].dtype == torch.int32


def test_block_mask_matches_brute_force():
    seg = torch.tensor([[1, 1, 2, 2, 2, 0, 0], [1, 2, 3, 3, 0, 0, 0]])
    mask = block_causal_mask(seg)
    assert mask.shape == (2, 1, 7, 7) and mask.dtype == torch.bool
    for b in range(2):
        for i in range(7):
            for j in range(7):
                allowed = seg[b, i] == seg[b, j] and j <= i
                assert bool(mask[b, 0, i, j]) == (not allowed)


class TinyAttentionLM(nn.Module):
    """Reference model: learned absolute positions (so position ids matter) + SDPA layers."""

    def __init__(self, vocab=VOCAB, dim=32, heads=4, layers=2, max_pos=64):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_pos, dim)
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim)) for _ in range(layers)
        )
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens_BS, position_ids_BS, masked_B1SS=None):
        x = self.embed(tokens_BS) + self.pos(position_ids_BS)
        B, S, D = x.shape
        for qkv, proj, mlp in zip(self.qkv, self.proj, self.mlp):
            q, k, v = (
                qkv(F.layer_norm(x, (D,))).view(B, S, 3, self.heads, D // self.heads).unbind(2)
            )
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            if masked_B1SS is None:
                att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:  # SDPA's boolean mask is True = attend; ours is True = masked out
                att = F.scaled_dot_product_attention(q, k, v, attn_mask=~masked_B1SS)
            x = x + proj(att.transpose(1, 2).reshape(B, S, D))
            x = x + mlp(F.layer_norm(x, (D,)))
        return self.head(x)


def _per_token_loss(model, batch):
    logits = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
    return F.cross_entropy(
        logits.flatten(0, 1), batch["labels"].flatten(), reduction="none"
    ).view_as(batch["labels"])


def _alone(model, sample):
    ids = torch.tensor(sample["input_ids"])
    n = len(ids) - 1
    logits = model(ids[None, :-1], torch.arange(n)[None], None)
    return F.cross_entropy(logits[0], ids[1:], reduction="none")


@pytest.mark.numerics
def test_packed_loss_equals_unpacked_loss():
    torch.manual_seed(0)
    model = TinyAttentionLM().eval()
    samples = _samples(12, seed=2)
    bins = pack_indices(
        [len(s["input_ids"]) - 1 for s in samples], 48, PackingAlgorithm.FIRST_FIT_DECREASING
    )
    rows = [
        build_row([(samples[i]["input_ids"], samples[i]["loss_mask"]) for i in b], 48, pad_id=0)
        for b in bins
    ]
    batch = collate_rows(rows, AttentionFormat.DENSE_MASK)
    assert any(len(b) > 1 for b in bins)
    with torch.no_grad():
        packed = _per_token_loss(model, batch)
        causal_only = _per_token_loss(model, dict(batch, attention_mask=None))
        total_packed = (packed * batch["loss_mask"]).sum()
        total_alone = 0.0
        leak = 0.0
        for r, b in enumerate(bins):
            for k, i in enumerate(b, start=1):
                where = batch["segment_ids"][r] == k
                alone = _alone(model, samples[i])
                torch.testing.assert_close(packed[r][where], alone, rtol=0, atol=LOGPROB_ATOL)
                leak = max(leak, float((causal_only[r][where] - alone).abs().max()))
                total_alone += float((alone * torch.tensor(samples[i]["loss_mask"][1:])).sum())
    num_loss_tokens = float(batch["loss_mask"].sum())
    assert total_packed.item() == pytest.approx(total_alone, abs=num_loss_tokens * LOGPROB_ATOL)
    # Negative control: without the block mask later samples see earlier ones (measured >= 0.09).
    assert leak > 100 * LOGPROB_ATOL


@pytest.mark.numerics
def test_thd_segments_equal_dense_mask():
    """Attention run per `cu_seqlens` segment (what varlen / THD kernels do) equals the dense mask."""
    torch.manual_seed(1)
    model = TinyAttentionLM().eval()
    samples = _samples(9, seed=5)
    bins = pack_indices(
        [len(s["input_ids"]) - 1 for s in samples], 40, PackingAlgorithm.BEST_FIT_DECREASING
    )
    rows = [
        build_row([(samples[i]["input_ids"], samples[i]["loss_mask"]) for i in b], 40, 0)
        for b in bins
    ]
    dense = collate_rows(rows, AttentionFormat.DENSE_MASK)
    thd = collate_rows(rows, AttentionFormat.THD)
    tokens, pos, cu = (
        thd["tokens"].flatten(),
        thd["position_ids"].flatten(),
        thd["cu_seqlens"].tolist(),
    )
    assert cu[-1] == tokens.numel() and thd["max_seqlen"] == max(b - a for a, b in zip(cu, cu[1:]))
    with torch.no_grad():
        ref = model(dense["tokens"], dense["position_ids"], dense["attention_mask"]).flatten(0, 1)
        for a, b in zip(cu, cu[1:]):
            assert pos[a:b].tolist() == list(range(b - a))  # positions restart at each segment
            seg = model(tokens[None, a:b], pos[None, a:b], None)[0]
            torch.testing.assert_close(seg, ref[a:b], rtol=0, atol=LOGPROB_ATOL)


@pytest.mark.numerics
def test_padded_batches_equal_unpacked_loss():
    torch.manual_seed(0)
    model = TinyAttentionLM().eval()
    samples = _samples(10, seed=3)
    cfg = BatchingConfig(seq_length=30, mode=BatchMode.PADDED, max_tokens=60, shuffle=False)
    batcher = SFTBatcher(samples, cfg, pad_id=0)
    with torch.no_grad():
        for u in range(len(batcher.units)):
            batch = batcher.next_batch()
            assert batch["tokens"].numel() <= 60
            loss = _per_token_loss(model, batch)
            for r, i in enumerate(batcher.units[u]):
                n = len(samples[i]["input_ids"]) - 1
                torch.testing.assert_close(
                    loss[r, :n], _alone(model, samples[i]), rtol=0, atol=LOGPROB_ATOL
                )


def test_token_budget_batches_cover_all_once():
    lengths = [random.Random(i).randint(1, 100) for i in range(500)]
    batches = token_budget_batches(lengths, 400, seed=0, bucket_window=64)
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert all(len(b) * max(lengths[i] for i in b) <= 400 for b in batches)


def _stream(sampler, count):
    return [sampler.next_indices(1)[0] for _ in range(count)]


def test_sampler_epochs_are_permutations_and_reshuffle():
    s = ResumableSampler(20, seed=7)
    e0, e1 = _stream(s, 20), _stream(s, 20)
    assert sorted(e0) == sorted(e1) == list(range(20))
    assert e0 != e1
    assert s.state_dict()["epoch"] == 2
    assert _stream(ResumableSampler(20, seed=7), 20) == e0
    assert _stream(ResumableSampler(20, seed=8), 20) != e0


def test_sampler_resume_equals_uninterrupted():
    full = _stream(ResumableSampler(13, seed=3), 50)
    first = ResumableSampler(13, seed=3)
    head = _stream(first, 17)
    state = first.state_dict()
    assert (state["epoch"], state["position"]) == (1, 4)
    resumed = ResumableSampler(13, seed=3)
    resumed.load_state_dict(state)
    assert head + _stream(resumed, 33) == full
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(13, seed=4).load_state_dict(state)


def test_sampler_ranks_partition_the_global_stream():
    full = _stream(ResumableSampler(10, seed=1), 30)
    ranks = [ResumableSampler(10, seed=1, rank=r, world_size=3) for r in range(3)]
    streams = [_stream(s, 10) for s in ranks]
    assert [streams[g % 3][g // 3] for g in range(30)] == full
    assert len({str(s.state_dict()) for s in ranks}) == 1


def test_batcher_resume_gives_identical_batches():
    samples = _samples(40, seed=4)
    cfg = BatchingConfig(seq_length=40, micro_batch_size=2, seed=5)
    ref = SFTBatcher(samples, cfg, pad_id=0)
    expected = [ref.next_batch() for _ in range(9)]
    first = SFTBatcher(samples, cfg, pad_id=0)
    got = [first.next_batch() for _ in range(4)]
    second = SFTBatcher(samples, cfg, pad_id=0)
    second.load_state_dict(first.state_dict())
    got += [second.next_batch() for _ in range(5)]
    for a, b in zip(expected, got):
        for key in (
            "tokens",
            "labels",
            "loss_mask",
            "position_ids",
            "attention_mask",
            "cu_seqlens",
        ):
            assert torch.equal(a[key], b[key]), key
    assert expected[0]["attention_mask"].shape == (2, 1, 40, 40)
    assert expected[0]["loss_mask"].dtype == torch.float32


def test_config_validation_names_field():
    with pytest.raises(ValueError, match="micro_batch_size"):
        BatchingConfig(seq_length=8, micro_batch_size=0)
    with pytest.raises(ValueError, match="max_tokens"):
        BatchingConfig(seq_length=8, max_tokens=4)
