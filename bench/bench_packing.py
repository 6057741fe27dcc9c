"""Share of real (non-padding) tokens: packed rows vs padded batches, on R1-like lengths.

Sample lengths are drawn from a lognormal (long-tailed, like long chain-of-thought SFT data)
and clipped at the maximum sequence length. For each maximum length we compare:
  - padded_fixed:    every sample padded to the maximum length (fixed-shape batches);
  - padded_random:   random batches of `--batch-size` samples, padded to the batch's longest;
  - padded_bucketed: token-budget batches of similar lengths (`token_budget_batches`);
  - packed_ffd / packed_bfd: first-/best-fit-decreasing packing into rows of the maximum length.
Prints a table and writes JSON (`--out`).

  python bench/bench_packing.py --num-samples 20000 --out bench/out/packing.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from megatron_ace.data.packing import PackingAlgorithm, pack_indices, token_budget_batches


def r1_like_lengths(num: int, max_len: int, *, median: float, sigma: float, seed: int) -> list[int]:
    """Lognormal lengths (median `median`, log-space sigma `sigma`), clipped to [16, max_len]."""
    rng = np.random.default_rng(seed)
    lengths = rng.lognormal(mean=np.log(median), sigma=sigma, size=num)
    return np.clip(lengths, 16, max_len).astype(int).tolist()


def measure(lengths: list[int], max_len: int, batch_size: int, seed: int) -> list[dict]:
    real = sum(lengths)
    rows = []

    def add(method: str, total: int, num_rows: int, seconds: float) -> None:
        rows.append(
            {
                "method": method,
                "real_token_share": real / total,
                "rows_or_batches": num_rows,
                "padded_tokens": total,
                "seconds": round(seconds, 3),
            }
        )

    add("padded_fixed", len(lengths) * max_len, len(lengths), 0.0)
    order = np.random.default_rng(seed).permutation(len(lengths))
    total = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        total += len(batch) * max(batch)
    add("padded_random", total, -(-len(lengths) // batch_size), 0.0)
    t0 = time.perf_counter()
    batches = token_budget_batches(lengths, batch_size * max_len, seed=seed)
    seconds = time.perf_counter() - t0
    add(
        "padded_bucketed",
        sum(len(b) * max(lengths[i] for i in b) for b in batches),
        len(batches),
        seconds,
    )
    for algorithm, name in (
        (PackingAlgorithm.FIRST_FIT_DECREASING, "packed_ffd"),
        (PackingAlgorithm.BEST_FIT_DECREASING, "packed_bfd"),
    ):
        t0 = time.perf_counter()
        bins = pack_indices(lengths, max_len, algorithm)
        add(name, len(bins) * max_len, len(bins), time.perf_counter() - t0)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--num-samples", type=int, default=20000)
    p.add_argument("--max-lens", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--median", type=float, default=4000.0, help="median sample length in tokens")
    p.add_argument("--sigma", type=float, default=0.9, help="lognormal sigma (log space)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="samples per padded batch (token budget = this x max len)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/out/packing.json")
    args = p.parse_args(argv)
    results = []
    header = (
        f"{'max_len':>8} {'clipped':>8} {'method':<16} {'real share':>10} {'rows':>8} {'secs':>7}"
    )
    print(header)
    print("-" * len(header))
    for max_len in args.max_lens:
        lengths = r1_like_lengths(
            args.num_samples, max_len, median=args.median, sigma=args.sigma, seed=args.seed
        )
        clipped = sum(n == max_len for n in lengths) / len(lengths)
        for row in measure(lengths, max_len, args.batch_size, args.seed):
            row.update(max_len=max_len, clipped_share=clipped, mean_len=float(np.mean(lengths)))
            results.append(row)
            print(
                f"{max_len:>8} {clipped:>8.3f} {row['method']:<16} {row['real_token_share']:>10.4f} "
                f"{row['rows_or_batches']:>8} {row['seconds']:>7.2f}"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
