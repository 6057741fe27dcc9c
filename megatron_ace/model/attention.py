"""Core attention backed by torch's scaled_dot_product_attention, for the local layer spec.

Megatron-Core's local `DotProductAttention` materialises the [b, np, sq, sk] score matrix
(baddbmm + softmax) and refuses packed sequences. This drop-in replacement (same constructor,
same inputs and outputs) calls `torch.nn.functional.scaled_dot_product_attention`, which picks a
fused kernel (flash / memory-efficient on GPU, the flash-style CPU kernel on CPU) and also takes
Megatron-Core's packed-sequence (THD) layout:

- BSHD: query [sq, b, np, hn], key / value [sk, b, ng, hn]; `attention_mask` [b, 1, sq, sk] bool
  with True = masked out (Megatron-Core's convention), or None for plain causal attention.
- THD (`packed_seq_params.qkv_format == "thd"`): query [t, np, hn], key / value [t, ng, hn]
  holding several sequences back to back, delimited by `cu_seqlens_q`; each sequence attends
  causally to itself only. Sequences of similar length (longest <= 1.25 x shortest) are
  gathered into one right-padded batch and run in one causal SDPA call (right padding needs no
  mask under a causal one: real queries never see the padding after them); a sequence without
  a similar one runs alone. The work stays close to sum(L_i^2) instead of T^2 for a dense
  block-diagonal mask over the whole row, in a few calls instead of one per sequence
  (`bench/bench_thd_attention.py`: 0.71x the time of per-sequence calls on one 8K row on an
  AVX2 CPU). Rotary embeddings were already applied per sequence (positions restart at 0) by
  Megatron-Core's attention layer.

Output: [sq, b, np * hn] (BSHD) or [t, np * hn] (THD), as `DotProductAttention` returns.

What it does not do: attention dropout (Qwen2 trains without it), attention bias, context
parallelism, or the fused masked softmax of apex/TE. With Transformer Engine the TE spec's own
attention is used instead (THD there too).
"""

from __future__ import annotations

import enum
import functools

import torch
import torch.nn.functional as F


class CoreAttention(enum.Enum):
    """Which core attention the local layer spec uses (the TE spec always uses TE's)."""

    UNFUSED = "unfused"
    """Megatron-Core's DotProductAttention (baddbmm + softmax); dense masks only."""
    SDPA = "sdpa"
    """torch scaled_dot_product_attention: fused kernels, dense masks and packed (THD) rows."""


def _dot_product_attention_base():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return DotProductAttention


def _sdpa_heads_first(q_NSH: torch.Tensor, k_GSH: torch.Tensor, v_GSH: torch.Tensor, *,
                      mask: torch.Tensor | None, causal: bool, scale: float) -> torch.Tensor:
    """SDPA over [..., heads, seq, head_dim] inputs; k/v heads repeated for grouped queries."""
    rep = q_NSH.shape[-3] // k_GSH.shape[-3]
    if rep > 1:
        k_GSH = k_GSH.repeat_interleave(rep, dim=-3)
        v_GSH = v_GSH.repeat_interleave(rep, dim=-3)
    return F.scaled_dot_product_attention(q_NSH, k_GSH, v_GSH, attn_mask=mask,
                                          is_causal=causal, scale=scale)


BUCKET_SPREAD = 1.25
"""Sequences of a THD row share one SDPA call when the longest is at most this x the shortest."""


@functools.lru_cache(maxsize=16)
def thd_buckets(cu_seqlens: tuple[int, ...]) -> tuple[tuple[int, int] | tuple[torch.Tensor, torch.Tensor], ...]:
    """The SDPA calls of a packed row: `(start, end)` for a sequence that runs alone, or
    `(index [n, width], real [n, width])` gathering n similar-length sequences, right-padded
    (padding slots index position 0 and are dropped again by `real`). Cached per row layout:
    every layer of a forward asks for the same one."""
    spans = [(a, b) for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]) if b > a]
    spans.sort(key=lambda span: span[1] - span[0])
    groups: list[list[tuple[int, int]]] = []
    for span in spans:
        if groups and span[1] - span[0] <= BUCKET_SPREAD * (groups[-1][0][1] - groups[-1][0][0]):
            groups[-1].append(span)
        else:
            groups.append([span])
    calls: list = []
    for group in groups:
        if len(group) == 1:
            calls.append(group[0])
            continue
        width = group[-1][1] - group[-1][0]
        index = torch.zeros(len(group), width, dtype=torch.long)
        real = torch.zeros(len(group), width, dtype=torch.bool)
        for row, (a, b) in enumerate(group):
            index[row, : b - a] = torch.arange(a, b)
            real[row, : b - a] = True
        calls.append((index, real))
    return tuple(calls)


def sdpa_core_attention_cls():
    """The SDPA core attention class (built lazily: megatron-core is imported on first use)."""
    base = _dot_product_attention_base()

    class SdpaCoreAttention(base):
        def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                    attention_bias=None, packed_seq_params=None):
            if attention_bias is not None:
                raise ValueError("SdpaCoreAttention: attention_bias is not supported")
            if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
                return self._thd(query, key, value, packed_seq_params)
            if packed_seq_params is not None:
                raise ValueError(f"SdpaCoreAttention: qkv_format "
                                 f"{packed_seq_params.qkv_format!r} is not supported")
            q = query.permute(1, 2, 0, 3)  # [sq, b, np, hn] -> [b, np, sq, hn]
            k = key.permute(1, 2, 0, 3)
            v = value.permute(1, 2, 0, 3)
            mask = None if attention_mask is None else ~attention_mask  # SDPA: True = attend
            out = _sdpa_heads_first(q, k, v, mask=mask, causal=attention_mask is None,
                                    scale=self.softmax_scale)
            sq, b = query.shape[0], query.shape[1]
            return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

        def _thd(self, query, key, value, packed_seq_params):
            cu_q = packed_seq_params.cu_seqlens_q.tolist()
            cu_kv = packed_seq_params.cu_seqlens_kv.tolist()
            if cu_q != cu_kv:
                raise ValueError("SdpaCoreAttention: THD needs cu_seqlens_q == cu_seqlens_kv")
            if cu_q[0] != 0 or cu_q[-1] != query.shape[0]:
                raise ValueError(f"SdpaCoreAttention: cu_seqlens span [{cu_q[0]}, {cu_q[-1]}) "
                                 f"but the packed row holds {query.shape[0]} tokens")
            outs, where = [], []
            for call in thd_buckets(tuple(cu_q)):
                if isinstance(call[0], int):  # one sequence: [L, heads, hn] -> [heads, L, hn]
                    start, end = call
                    o = _sdpa_heads_first(query[start:end].transpose(0, 1),
                                          key[start:end].transpose(0, 1),
                                          value[start:end].transpose(0, 1), mask=None,
                                          causal=True, scale=self.softmax_scale)
                    outs.append(o.transpose(0, 1))
                    where.append(torch.arange(start, end, device=query.device))
                    continue
                index, real = (t.to(query.device) for t in call)
                # [n, width, heads, hn] -> [n, heads, width, hn]
                o = _sdpa_heads_first(query[index].permute(0, 2, 1, 3),
                                      key[index].permute(0, 2, 1, 3),
                                      value[index].permute(0, 2, 1, 3), mask=None,
                                      causal=True, scale=self.softmax_scale)
                outs.append(o.permute(0, 2, 1, 3)[real])
                where.append(index[real])
            out = query.new_zeros(query.shape).index_copy(0, torch.cat(where), torch.cat(outs))
            return out.reshape(query.shape[0], self.hidden_size_per_partition)

    return SdpaCoreAttention
