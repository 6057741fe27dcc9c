"""Math reward throughput: verifications per second, worker pool vs a serial baseline.

Both run in the same process on the same synthetic workload (equivalent and, about 30% of the
time, non-equivalent answer forms: fractions vs decimals, radicals, sets, intervals,
polynomials, thousands separators, multiples of pi; fresh numbers in every item, so sympy's
caches do not flatter either side), so the numbers are comparable. Writes a JSON record with `--out`.

    python bench/bench_math_reward.py --num-items 400 --workers 2 --out bench_math.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

from megatron_ace.rewards.math_reward import (
    MathRewardConfig,
    MathRewardPool,
    MathStatus,
    score_math,
)

_HOSTILE = "9^{9^{9^{9}}}"


def _random_pair(rng: random.Random) -> tuple[str, str]:
    """One (reference, answer) pair with fresh numbers, so that no cache sees a repeat."""
    a, b = rng.randint(1, 99), rng.randint(2, 99)
    wrong = rng.random() < 0.3  # about 30% wrong answers
    d = 1 if wrong else 0
    forms = [
        (f"\\frac{{{a}}}{{{b * 2}}}", f"{(a + d) / (b * 2):.6f}".rstrip("0")),
        (f"\\dfrac{{{a}}}{{{b}}}", f"\\frac{{{2 * a + d}}}{{{2 * b}}}"),
        (f"{a}\\sqrt{{{b}}}", f"\\sqrt{{{a * a * b + d}}}"),
        (f"\\{{{a},{b}\\}}", f"\\{{{b},{a + d}\\}}"),
        (f"[{a}, {a + b})", f"[{a},{a + b + d})"),
        (f"x^2+{2 * a}x+{a * a}", f"(x+{a + d})^2"),
        (f"{a * 1000 + b}", f"{a},{b + d:03d}"),
        (f"\\frac{{{a}\\pi}}{{{b}}}", f"{a + d}\\pi/{b}"),
    ]
    return rng.choice(forms)


def make_workload(num_items: int, hostile_every: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    items = []
    for i in range(num_items):
        reference, answer = _random_pair(rng)
        if hostile_every and i % hostile_every == hostile_every - 1:
            answer = _HOSTILE
        items.append((f"Let us think step by step. ... Therefore the answer is \\boxed{{{answer}}}.", reference))
    return items


def run_serial(items, config) -> tuple[float, list]:
    start = time.perf_counter()
    results = [score_math(r, a, config) for r, a in items]
    return time.perf_counter() - start, results


def run_pool(items, config, workers: int, timeout_s: float) -> tuple[float, float, list]:
    start = time.perf_counter()
    with MathRewardPool(config, num_workers=workers, timeout_s=timeout_s) as pool:
        warm = make_workload(workers, 0, seed=-1)  # workers up, imports done
        pool.score([r for r, _ in warm], [a for _, a in warm])
        ready = time.perf_counter()
        results = pool.score([r for r, _ in items], [a for _, a in items])
        elapsed = time.perf_counter() - ready
    return elapsed, ready - start, results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-items", type=int, default=300, help="verifications per run")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="pool workers")
    parser.add_argument("--timeout", type=float, default=10.0, help="pool's hard timeout per item, s")
    parser.add_argument("--verify-timeout", type=int, default=3, help="math-verify's own timeout, s")
    parser.add_argument("--hostile-every", type=int, default=0,
                        help="make every N-th answer 9^9^9^9 (0: none); the serial run skips them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the JSON record here")
    args = parser.parse_args(argv)
    config = MathRewardConfig(verify_timeout_s=args.verify_timeout)
    items = make_workload(args.num_items, args.hostile_every, args.seed)
    # The serial baseline cannot kill a hostile item; it scores the benign ones only.
    benign = [it for it in items if _HOSTILE not in it[0]]
    score_math(*make_workload(1, 0, args.seed + 1)[0], config)  # import math-verify / sympy first
    serial_s, serial_results = run_serial(benign, config)
    pool_s, startup_s, pool_results = run_pool(items, config, args.workers, args.timeout)
    pool_benign = [r for it, r in zip(items, pool_results) if _HOSTILE not in it[0]]
    record = {
        "benchmark": "math_reward",
        "num_items": len(items),
        "num_hostile": len(items) - len(benign),
        "workers": args.workers,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "serial_items": len(benign),
        "serial_seconds": round(serial_s, 3),
        "serial_verifications_per_s": round(len(benign) / serial_s, 2),
        "pool_startup_seconds": round(startup_s, 3),
        "pool_seconds": round(pool_s, 3),
        "pool_verifications_per_s": round(len(items) / pool_s, 2),
        "speedup": round((len(items) / pool_s) / (len(benign) / serial_s), 3),
        "pool_statuses": {s.value: sum(r.status is s for r in pool_results) for s in MathStatus},
        "pool_agrees_with_serial": [r.reward for r in pool_benign] == [r.reward for r in serial_results],
    }
    text = json.dumps(record, indent=2)
    sys.stdout.write(text + "\n")
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if record["pool_agrees_with_serial"] else 1


if __name__ == "__main__":
    sys.exit(main())
