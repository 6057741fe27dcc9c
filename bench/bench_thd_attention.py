"""Attention of one packed GRPO row on this CPU: the SDPA calls of each layout, timed alone.

The packed layout (`grpo.batching=packed`) runs the SDPA core attention
(`megatron_ace/model/attention.py`) once per sequence of a THD row, causal, no mask; the padded
layout runs one SDPA call over right-padded rows with a dense boolean mask. Which of the two
kernels torch picks, and how fast each is, depends on the CPU (AVX2 / AVX-512) and torch's
build, so this script times, forward + backward, float32, on one packed row drawn like
`bench_grpo_update.py`'s rollouts:

- `packed_per_sequence`: one causal SDPA call per sequence (the THD path before buckets);
- `packed_length_buckets`: what `SdpaCoreAttention` runs for a THD row (its own `_thd`): the
  sequences gathered into length buckets (longest / shortest <= 1.25), one causal SDPA call
  per bucket, a sequence without a similar one alone;
- `padded_masked`: the padded layout's call on the same sequences, each padded to the row's
  longest (the padded layout pads to the step's longest: more still), with the causal +
  padding mask.

Reported: milliseconds (best of `--repeats`), ratios to `packed_per_sequence` measured in the
same run, the per-position cost of each, and the largest output difference from the
per-sequence reference (all three compute the same attention for real positions).

    python bench/bench_thd_attention.py --out bench/out/thd_attention.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any directory
    sys.path.insert(0, str(REPO))


def draw_lengths(budget: int, median: int, sigma: float, cap: int, seed: int) -> list[int]:
    """Sequence lengths (prompt 64-256 + log-normal response) filling one row of `budget`."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths, used = [], 0
    while True:
        n = int(torch.randint(64, 257, (1,), generator=g)) + int(
            torch.empty(1).log_normal_(math.log(median), sigma, generator=g).clamp(1, cap))
        if used + n > budget:
            return lengths
        lengths.append(n)
        used += n


def make_cases(lengths: list[int], heads: int, groups: int, head_dim: int):
    """The three ways to compute the row's attention; each maps (q, k, v) [T, h, d] -> [T, h*d]."""
    import torch

    from megatron_ace.model.attention import _sdpa_heads_first

    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    total, scale = cu[-1], 1.0 / math.sqrt(head_dim)

    def per_sequence(q, k, v):  # as SdpaCoreAttention._thd
        parts = []
        for start, end in zip(cu[:-1], cu[1:]):
            o = _sdpa_heads_first(q[start:end].transpose(0, 1), k[start:end].transpose(0, 1),
                                  v[start:end].transpose(0, 1), mask=None, causal=True,
                                  scale=scale)
            parts.append(o.transpose(0, 1).reshape(end - start, heads * head_dim))
        return torch.cat(parts)

    def sdpa_core_attention(q, k, v):  # the real SdpaCoreAttention._thd
        import types

        from megatron.core.packed_seq_params import PackedSeqParams

        from megatron_ace.model.attention import sdpa_core_attention_cls

        cu_t = torch.tensor(cu, dtype=torch.int32)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_t, cu_seqlens_kv=cu_t,
                                 max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
        owner = types.SimpleNamespace(softmax_scale=scale,
                                      hidden_size_per_partition=heads * head_dim)
        return sdpa_core_attention_cls()._thd(owner, q, k, v, params)

    def padded_masked(q, k, v):  # every sequence padded to the row's longest, one call
        width = max(lengths)
        index = torch.zeros(len(lengths), width, dtype=torch.long)
        real = torch.zeros(len(lengths), width, dtype=torch.bool)
        for row, n in enumerate(lengths):
            index[row, :n] = torch.arange(cu[row], cu[row + 1])
            real[row, :n] = True
        mask = torch.ones(width, width, dtype=torch.bool).tril()[None, None] & real[:, None, None, :]
        o = _sdpa_heads_first(q[index].permute(0, 2, 1, 3), k[index].permute(0, 2, 1, 3),
                              v[index].permute(0, 2, 1, 3), mask=mask, causal=False, scale=scale)
        out = q.new_zeros(total, heads, head_dim).index_copy(0, index[real],
                                                             o.permute(0, 2, 1, 3)[real])
        return out.reshape(total, heads * head_dim)

    return total, {
        "packed_per_sequence": per_sequence,
        "packed_length_buckets": sdpa_core_attention,
        "padded_masked": padded_masked,
    }


def time_case(fn, q, k, v, repeats: int) -> tuple[float, "object"]:
    best, out = float("inf"), None
    for _ in range(repeats):
        q.grad = k.grad = v.grad = None
        start = time.perf_counter()
        out = fn(q, k, v)
        out.sum().backward()
        best = min(best, time.perf_counter() - start)
    return best, out.detach()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=int, default=8192, help="positions of the packed row")
    p.add_argument("--median", type=int, default=256, help="median response length")
    p.add_argument("--sigma", type=float, default=0.9)
    p.add_argument("--cap", type=int, default=2048)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--groups", type=int, default=2, help="key/value heads")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=4, help="timed runs per case (best counts)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench_thd_attention.json"))
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    lengths = draw_lengths(args.budget, args.median, args.sigma, args.cap, args.seed)
    if not lengths:
        p.error("--budget holds no sequence; raise it")
    total, cases = make_cases(lengths, args.heads, args.groups, args.head_dim)
    g = torch.Generator().manual_seed(args.seed)
    q = torch.randn(total, args.heads, args.head_dim, generator=g).requires_grad_()
    k = torch.randn(total, args.groups, args.head_dim, generator=g).requires_grad_()
    v = torch.randn(total, args.groups, args.head_dim, generator=g).requires_grad_()
    results, reference = {}, None
    for name, fn in cases.items():
        seconds, out = time_case(fn, q, k, v, args.repeats)
        reference = out if reference is None else reference
        positions = total if name.startswith("packed") else len(lengths) * max(lengths)
        results[name] = {"ms": 1000 * seconds, "positions": positions,
                         "us_per_position": 1e6 * seconds / positions,
                         "max_abs_diff": float((out - reference).abs().max())}
    base = results["packed_per_sequence"]["ms"]
    for r in results.values():
        r["ratio_to_per_sequence"] = r["ms"] / base
    record = {"benchmark": "thd_attention", "cases": results, "num_sequences": len(lengths),
              "lengths": lengths, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "load_average": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"one packed row: {len(lengths)} sequences, {total:,} positions "
             f"(padded: {len(lengths)} x {max(lengths)}); torch CPU kernels "
             f"{record['cpu_capability']}",
             "| case | ms (fwd + bwd) | positions | us / position | vs per-sequence | max diff |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['ms']:.1f} | {r['positions']:,} | {r['us_per_position']:.2f} "
                     f"| {r['ratio_to_per_sequence']:.2f}x | {r['max_abs_diff']:.1e} |")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
