"""One GRPO iteration of the demo, broken into its phases: sync, generate, score, logprob, update.

Runs `ace grpo` (the demo's GRPO settings: 32 prompts x 8 rollouts, up to 64 tokens) for a few
steps from a tiny SFT'd model, reads the per-step `time/*` of its metrics.jsonl, and prints each
phase's median milliseconds and its share of the iteration, plus the wall time between steps
that no phase accounts for (logging, filtering, advantages). The first step is left out when
there are several (it warms up allocators and the engine). The baseline each share is read
against is the same run's iteration total; the slowest phase is named.

    python bench/bench_grpo_iteration.py --out bench/out/grpo_iteration.json             # 6 steps
    python bench/bench_grpo_iteration.py --metrics runs/demo/grpo/metrics.jsonl --out x.json

The SFT model comes from `--sft-dir` (an `ace sft` run directory with `hf/` and `tokenizer/`,
default runs/demo/sft, what `make demo` leaves); without one, a short `ace sft` of the tiny
recipe (about a minute) makes it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any directory
    sys.path.insert(0, str(REPO))

PHASES = ("sync", "generate", "score", "logprob", "update", "broadcast")
PHASES_REQUIRED = ("sync", "generate", "score", "update")
WHY = {
    "sync": "gather TP/PP shards -> HF names -> bucketed reload into vLLM",
    "generate": "vLLM rollouts (groups go to the reward pool as they finish)",
    "score": "waiting for the rewards still running after the last rollout",
    "logprob": "forward-only passes: rollouts not trained on; old logprobs if not fused",
    "update": "forward/backward (+ entropy, mismatch when fused) + optimizer step",
    "broadcast": "rollouts and rewards from rank 0 to the other ranks",
}
# A short SFT when no SFT'd model is given: enough to make the policy answer in the task's format.
QUICK_SFT = ["arith.task.slip_fraction=0.3", "arith.num_samples=800", "schedule.num_epochs=3",
             "optim.warmup_steps=5", "checkpoint.save_interval=0"]


def _ace(argv: list[str], log_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "megatron_ace.cli", *argv], env=env,
                              stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        tail = log_path.read_text()[-4000:]
        raise SystemExit(f"`ace {' '.join(argv[:3])} ...` failed ({proc.returncode}):\n{tail}")


def _prompt_files(sft_dir: Path, data_dir: Path) -> tuple[Path, Path]:
    """RL and held-out prompts of the SFT run's arithmetic task (as the demo writes them)."""
    from megatron_ace.data.arith_task import (
        ArithTaskConfig,
        Split,
        generate_problems,
        prompt_rows,
        write_jsonl,
    )

    raw = json.loads((sft_dir / "config.json").read_text())["arith"]["task"]
    task = ArithTaskConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    train = write_jsonl(prompt_rows(generate_problems(task, Split.TRAIN, 2000)),
                        data_dir / "rl_prompts.jsonl")
    heldout = write_jsonl(prompt_rows(generate_problems(task, Split.HELDOUT, 64)),
                          data_dir / "heldout.jsonl")
    return train, heldout


def grpo_config(sft_dir: Path | None, steps: int, work: Path):
    """The demo's GRPO config for a short run (makes a quick SFT model when none is given)."""
    from megatron_ace.train.demo import GRPO_OVERRIDES
    from megatron_ace.train.grpo import parse_args

    if sft_dir is None:
        sft_dir = work / "sft"
        _ace(["sft", "--recipe", "sft-tiny", "--out", str(sft_dir), *QUICK_SFT],
             work / "sft.log")
    for need in ("hf/config.json", "tokenizer", "config.json"):
        if not (sft_dir / need).exists():
            raise SystemExit(f"--sft-dir {sft_dir}: missing {need} (expected an `ace sft` run)")
    train, heldout = _prompt_files(sft_dir, work / "data")
    # The demo's settings, minus what only the full run needs: fewer steps, a small
    # evaluation, no checkpoint or export at the end.
    overrides = [o for o in GRPO_OVERRIDES if not o.startswith(("steps=", "eval."))]
    overrides += [f"steps={steps}", "eval.max_problems=16", "eval.num_samples=1",
                  "eval.every_steps=0", "eval.at_start=false", "checkpoint.save_at_end=false",
                  "checkpoint.export_hf=false", "checkpoint.save_interval=0",
                  "logging.tensorboard=false", "logging.progress_bar=false"]
    return parse_args(["--recipe", "grpo-tiny", "--out", str(work / "grpo"),
                       f"model.hf_path={sft_dir / 'hf'}", f"data.tokenizer={sft_dir / 'tokenizer'}",
                       f"data.train_path={train}", f"data.heldout_path={heldout}", *overrides])


def run_grpo(sft_dir: Path | None, steps: int, work: Path) -> list[dict]:
    """`steps` GRPO iterations in this process with the demo's settings. After each step the
    engine still serves the weights that step sampled with (the next sync comes at the start of
    the next step), so the same requests are generated once more with plain
    `engine.generate` (no streaming, no scoring, from an empty prefix cache as after a sync):
    the baseline the step's wall time is read against. Returns one row per step: the step's metrics, `time/wall`, `time/baseline_generate`."""
    import time

    from megatron_ace.train.grpo import GRPORun

    cfg, out = grpo_config(sft_dir, steps, work)
    out.mkdir(parents=True, exist_ok=True)
    run = GRPORun(cfg, out)
    rows = []
    try:
        for _ in range(steps):
            items = [run.train_items[i]
                     for i in run.sampler.next_indices(cfg.rollout.prompts_per_step)]
            start = time.perf_counter()
            metrics = run.step(items)
            wall = time.perf_counter() - start
            sampling = run.sampling(n=cfg.rollout.group_size,
                                    temperature=metrics["temperature/used"],
                                    max_tokens=cfg.rollout.max_response_tokens,
                                    seed=cfg.rollout.seed, iteration=run.step_index)
            # The step generated right after a weight sync, which empties the prefix cache; so
            # does the baseline, or its prompts would skip the prefill.
            run.engine.reset_prefix_cache()
            start = time.perf_counter()
            run.engine.generate([it.prompt_ids for it in items], sampling)
            rows.append({**metrics, "step": run.step_index, "time/wall": wall,
                         "time/baseline_generate": time.perf_counter() - start})
    finally:
        run.close()
    return rows


def phase_breakdown(rows: list[dict], skip_first: bool = True) -> dict:
    """Median ms per phase, shares of the summed phases, and wall time not in any phase.

    `rows` are metrics.jsonl records; only those with every `time/<phase>` count.
    """
    steps = [r for r in rows if all(f"time/{p}" in r for p in PHASES_REQUIRED)]
    if not steps:
        raise ValueError("no metrics row holds all of "
                         + ", ".join(f"time/{p}" for p in PHASES_REQUIRED))
    if skip_first and len(steps) > 1:
        steps = steps[1:]
    ms = {p: 1000 * statistics.median(r.get(f"time/{p}", 0.0) for r in steps) for p in PHASES}
    total = sum(ms.values())
    if all("time/wall" in r for r in steps):  # measured around each step (in-process run)
        walls = [1000 * r["time/wall"] for r in steps]
        outside = [w - 1000 * sum(r.get(f"time/{p}", 0.0) for p in PHASES)
                   for w, r in zip(walls, steps, strict=True)]
    else:
        # A row is logged when its step ends, so the wall time of step b is b.time - a.time;
        # what its phases do not cover is logging, filtering and advantages.
        pairs = [(a, b) for a, b in zip(steps, steps[1:], strict=False)
                 if "time" in a and "time" in b and b["step"] == a["step"] + 1]
        walls = [1000 * (b["time"] - a["time"]) for a, b in pairs]
        outside = [w - 1000 * sum(b.get(f"time/{p}", 0.0) for p in PHASES)
                   for w, (_, b) in zip(walls, pairs, strict=True)]
    wall = statistics.median(walls) if walls else None
    slowest = max(PHASES, key=ms.get)
    result = {
        "num_steps": len(steps),
        "ms": ms,
        "share": {p: ms[p] / total for p in PHASES},
        "phases_total_ms": total,
        "wall_ms_per_step": wall,
        "unaccounted_ms": statistics.median(outside) if outside else None,
        "slowest_phase": slowest,
        "slowest_over_next": ms[slowest] / sorted(ms.values())[-2],
        "baseline_generate_ms": None,
        "wall_over_generate_plus_update": None,
    }
    if wall is not None and all("time/baseline_generate" in r for r in steps):
        base = 1000 * statistics.median(r["time/baseline_generate"] for r in steps)
        result["baseline_generate_ms"] = base
        result["wall_over_generate_plus_update"] = wall / (base + ms["update"])
        result["per_step_ms"] = [
            {**{p: 1000 * r.get(f"time/{p}", 0.0) for p in PHASES},
             "wall": 1000 * r["time/wall"], "baseline_generate": 1000 * r["time/baseline_generate"]}
            for r in steps if "time/wall" in r]
    return result


def table(result: dict) -> str:
    lines = ["| phase | what | ms / step (median) | share |", "|---|---|---|---|"]
    for p in PHASES:
        lines.append(f"| {p} | {WHY[p]} | {result['ms'][p]:.1f} | {100 * result['share'][p]:.1f}% |")
    lines.append(f"| total of phases | | {result['phases_total_ms']:.1f} | 100% |")
    if result["wall_ms_per_step"] is not None:
        lines.append(f"| wall time per step | | {result['wall_ms_per_step']:.1f} | "
                     f"(+{result['unaccounted_ms']:.1f} ms outside the phases) |")
    if result["baseline_generate_ms"] is not None:
        lines.append(f"| plain engine.generate of the same requests (baseline) | | "
                     f"{result['baseline_generate_ms']:.1f} | |")
        lines.append(f"\nwall / (baseline generate + update) = "
                     f"{result['wall_over_generate_plus_update']:.3f} (goal <= 1.1)")
    lines.append(f"\nslowest phase: {result['slowest_phase']} "
                 f"({result['slowest_over_next']:.2f}x the next slowest), "
                 f"median over {result['num_steps']} steps")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--metrics", type=Path, default=None,
                   help="analyse an existing metrics.jsonl instead of running GRPO")
    p.add_argument("--sft-dir", type=Path, default=REPO / "runs" / "demo" / "sft",
                   help="`ace sft` run directory (hf/, tokenizer/); made if absent")
    p.add_argument("--steps", type=int, default=6, help="GRPO steps to run")
    p.add_argument("--keep", type=Path, default=None, help="keep the GRPO run in this directory")
    p.add_argument("--out", type=Path, default=Path("bench_grpo_iteration.json"))
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    source = args.metrics
    with tempfile.TemporaryDirectory(prefix="ace-bench-grpo-") as tmp:
        work = args.keep or Path(tmp)
        if source is None:
            sft = args.sft_dir if (args.sft_dir / "hf" / "config.json").is_file() else None
            rows = run_grpo(sft, args.steps, work)
        else:
            rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    result = phase_breakdown(rows)
    result["source"] = str(args.metrics or "fresh `ace grpo` run")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(table(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
