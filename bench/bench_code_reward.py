"""Throughput of the sandboxed code reward pool vs one fresh `python3` subprocess per test.

Both sides run the same programs on the same inputs with the same parallelism (`--workers`)
in the same run: the pool (long-lived bubblewrap sandboxes, one fork per test) and a baseline
that starts a fresh, unsandboxed system `python3 -I` per test. Both check every output, so a
fast but wrong path cannot win. Results go to stdout and, as JSON, to `--out`.

usage: python bench/bench_code_reward.py --tests 400 --workers 2 --out bench_code_reward.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import subprocess
import sys
import time

from megatron_ace.rewards.code_reward import CodeRewardConfig, CodeRewardPool, CodeStatus, CodeTask, TestCase, TestKind
from megatron_ace.rewards.code_sandbox import SandboxConfig, find_system_python

PROGRAM = "import sys\nnums = list(map(int, sys.stdin.read().split()))\nprint(sum(x * x for x in nums))\n"


def _cases(num_tests: int) -> list[tuple[str, str]]:
    cases = []
    for i in range(num_tests):
        nums = list(range(i % 50, i % 50 + 100))
        cases.append((" ".join(map(str, nums)) + "\n", f"{sum(x * x for x in nums)}\n"))
    return cases


def bench_pool(cases: list[tuple[str, str]], workers: int) -> dict:
    config = CodeRewardConfig(sandbox=SandboxConfig(timeout_s=10.0), num_workers=workers)
    start_up = time.perf_counter()
    with CodeRewardPool(config) as pool:
        ready = time.perf_counter()
        # One task per test, so that the pool's parallelism is used like the baseline's.
        tasks = [CodeTask(PROGRAM, (TestCase(TestKind.STDIN, input=i, expected=o),)) for i, o in cases]
        results = pool.score(tasks)
        elapsed = time.perf_counter() - ready
        sandboxed = pool.sandboxed
    passed = sum(r.status is CodeStatus.PASSED for r in results)
    return {"executions": len(cases), "passed": passed, "seconds": round(elapsed, 3),
            "executions_per_s": round(len(cases) / elapsed, 1), "startup_s": round(ready - start_up, 3),
            "sandboxed": sandboxed}


def bench_fresh_subprocess(cases: list[tuple[str, str]], workers: int) -> dict:
    python = find_system_python()

    def run(case: tuple[str, str]) -> bool:
        proc = subprocess.run([python, "-I", "-c", PROGRAM], input=case[0], capture_output=True, text=True, timeout=10)
        return proc.returncode == 0 and proc.stdout.strip() == case[1].strip()

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        passed = sum(ex.map(run, cases))
    elapsed = time.perf_counter() - start
    return {"executions": len(cases), "passed": passed, "seconds": round(elapsed, 3),
            "executions_per_s": round(len(cases) / elapsed, 1), "python": python, "sandboxed": False}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", type=int, default=400, help="test executions per side (default: 400)")
    parser.add_argument("--workers", type=int, default=2, help="parallel sandboxes / subprocesses (default: 2)")
    parser.add_argument("--out", default="bench_code_reward.json", help="JSON file for the results")
    args = parser.parse_args()
    cases = _cases(args.tests)
    bench_pool(cases[:20], args.workers)  # warm the page cache for both sides alike
    pool = bench_pool(cases, args.workers)
    fresh = bench_fresh_subprocess(cases, args.workers)
    report = {
        "pool": pool, "fresh_python3_per_test": fresh,
        "speedup": round(pool["executions_per_s"] / fresh["executions_per_s"], 2),
        "workers": args.workers, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "python": sys.version.split()[0],
    }
    for name in ("pool", "fresh_python3_per_test"):
        r = report[name]
        print(f"{name:<24} {r['executions_per_s']:>8.1f} exec/s  ({r['passed']}/{r['executions']} passed, {r['seconds']} s)")
    print(f"speedup: {report['speedup']}x")
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    return 0 if pool["passed"] == fresh["passed"] == len(cases) else 1


if __name__ == "__main__":
    sys.exit(main())
