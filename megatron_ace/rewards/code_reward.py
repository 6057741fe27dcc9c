"""Rule-based code reward: run a model's program against test cases in the bubblewrap sandbox.

What it does: `parse_row` turns a data row into a `CodeTask` (program + tests); the tests are
read by `code_tests.parse_tests` from the forms LiveCodeBench, TACO/APPS, DeepCoder and
HumanEval store them in (HumanEval's optional `prompt` is prepended to the program); loaders
parse them once when prompts load and build tasks with `task_for`. `extract_program` takes the
last fenced python block of a response. `CodeRewardPool` runs tasks on long-lived sandboxed
workers (see `code_sandbox.py`: one fork per test, hard wall-clock kills, a dead worker is
replaced) from background threads, so `submit(row) -> Future[CodeResult]` never blocks the
trainer; `score(rows)` is the batch form. The reward is 1.0 only if every test passes.
Outputs of stdin and call-based tests are compared here, outside the sandbox, so expected
outputs never reach the program. `cli_main` is `ace reward code`.

What it does not do: it does not judge code quality, partial credit or efficiency beyond the
per-test limits; it does not import torch; and it inherits the limits of the sandbox listed in
`code_sandbox.py` (HumanEval `check` programs run in the candidate's interpreter).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import enum
import json
import math
import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from megatron_ace.rewards import code_sandbox as sb
from megatron_ace.rewards.code_sandbox import (
    SandboxConfig,
    SandboxDiedError,
    SandboxTimeoutError,
    SandboxWorker,
)
from megatron_ace.rewards.code_tests import CodeTests, TestCase, TestKind, parse_tests
from megatron_ace.utils import console
from megatron_ace.utils.logging import get_logger

_log = get_logger(__name__)


class CodeStatus(enum.Enum):
    PASSED = "passed"
    WRONG_ANSWER = "wrong_answer"
    RUNTIME_ERROR = "runtime_error"  # exception, non-zero exit, signal, output over the limit
    TIMEOUT = "timeout"  # wall-clock or CPU-time limit
    MEMORY_LIMIT = "memory_limit"
    COMPILE_ERROR = "compile_error"  # syntax error, or no program found in the response
    SANDBOX_ERROR = "sandbox_error"  # the sandbox failed (or the program killed its worker)


# Sandbox outcome -> status. OK is decided by the comparison, not by the sandbox.
_OUTCOME_STATUS = {
    sb.COMPILE_ERROR: CodeStatus.COMPILE_ERROR, sb.RUNTIME_ERROR: CodeStatus.RUNTIME_ERROR,
    sb.TIMEOUT: CodeStatus.TIMEOUT, sb.MEMORY_LIMIT: CodeStatus.MEMORY_LIMIT,
    sb.OUTPUT_LIMIT: CodeStatus.RUNTIME_ERROR, sb.SANDBOX_ERROR: CodeStatus.SANDBOX_ERROR,
}
_KIND_MODE = {TestKind.STDIN: sb.MODE_STDIN, TestKind.FUNCTIONAL: sb.MODE_CALL, TestKind.HUMANEVAL: sb.MODE_SCRIPT}


@dataclass(frozen=True)
class CodeTask:
    program: str | None
    """The candidate program; None when no program was found in the response."""
    tests: tuple[TestCase, ...]
    fn_name: str | None = None
    """Function or `Solution` method called by FUNCTIONAL tests."""


@dataclass(frozen=True)
class TestResult:
    __test__ = False  # not a pytest test class
    index: int
    status: CodeStatus
    time_s: float = 0.0
    detail: str = ""

    def to_dict(self) -> dict:
        return {"index": self.index, "status": self.status.value, "time_s": self.time_s, "detail": self.detail}


@dataclass(frozen=True)
class CodeResult:
    reward: float
    """1.0 if every test passed, else 0.0."""
    status: CodeStatus
    """PASSED, or the status of the first test that did not pass."""
    tests: tuple[TestResult, ...] = ()
    """Per-test outcomes, in order; tests after the first failure are absent when stopping early."""
    num_tests: int = 0
    """Number of tests of the task (run or not)."""
    detail: str = ""

    def to_dict(self) -> dict:
        return {"reward": self.reward, "status": self.status.value, "num_tests": self.num_tests,
                "tests": [t.to_dict() for t in self.tests], "detail": self.detail}


@dataclass(frozen=True, kw_only=True)
class CodeRewardConfig:
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    """Isolation and per-test limits."""
    num_workers: int = 2
    """Long-lived sandboxes run in parallel (one thread each in this process)."""
    stop_on_first_failure: bool = True
    """Skip the remaining tests of a task once one fails (the reward is 0 anyway)."""
    max_tests: int | None = None
    """Run at most this many tests per task (None = all)."""

    def __post_init__(self) -> None:
        if int(self.num_workers) != self.num_workers or self.num_workers < 1:
            raise ValueError(f"num_workers: must be an integer >= 1, got {self.num_workers!r}")
        if self.sandbox.uid - (self.num_workers - 1) < 1000:
            raise ValueError(f"num_workers: workers use uids sandbox.uid - i, {self.num_workers} would go below 1000")
        if self.max_tests is not None and self.max_tests < 1:
            raise ValueError(f"max_tests: must be >= 1 or None, got {self.max_tests!r}")


# ----------------------------------------------------------------------------- rows -> tasks
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_program(response: str) -> str | None:
    """The last ```python (or ```py/```python3) block; else the last untagged block; else None."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(response)]
    for wanted in (("python", "py", "python3"), ("",)):
        found = [body for lang, body in blocks if lang in wanted]
        if found:
            return found[-1]
    return None


def parse_row(row: dict, *, response_field: str = "response", code_field: str = "code") -> CodeTask:
    """A data row -> CodeTask. Raises ValueError naming the offending field."""
    if isinstance(row.get(code_field), str):
        program = row[code_field]
    elif isinstance(row.get(response_field), str):
        program = extract_program(row[response_field])
    else:
        raise ValueError(f"{response_field!r} or {code_field!r}: missing or not a string")
    found = parse_tests(row)
    if program is not None and found.tests[0].kind is TestKind.HUMANEVAL \
            and isinstance(row.get("prompt"), str):
        program = row["prompt"] + program  # completions continue the prompt
    return task_for(found, program)


def task_for(tests: CodeTests, program: str | None) -> CodeTask:
    """The task of running `program` against already parsed `tests`."""
    return CodeTask(program, tests.tests, fn_name=tests.fn_name)


# ----------------------------------------------------------------------------- comparison
def _tokens_match(got: str, want: str) -> bool:
    if got == want:
        return True
    try:
        return Decimal(got) == Decimal(want)
    except (InvalidOperation, ValueError):
        return False


def stdout_matches(got: str, expected: str) -> bool:
    """LiveCodeBench-style: lines compared after stripping, trailing blank lines ignored,
    and tokens that are both decimals compared as numbers (1.0 == 1.00)."""
    got_lines, want_lines = got.strip().split("\n"), expected.strip().split("\n")
    if len(got_lines) != len(want_lines):
        return False
    for g, w in zip(got_lines, want_lines):
        g, w = g.strip(), w.strip()
        if g == w:
            continue
        gt, wt = g.split(), w.split()
        if len(gt) != len(wt) or not all(_tokens_match(a, b) for a, b in zip(gt, wt)):
            return False
    return True


def value_matches(got: Any, expected: Any) -> bool:
    """Return values after a JSON round trip (tuples are lists); floats within 1e-9 relative."""
    if isinstance(got, float) or isinstance(expected, float):
        return isinstance(got, (int, float)) and isinstance(expected, (int, float)) and \
            not isinstance(got, bool) and math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(got, list) and isinstance(expected, list):
        return len(got) == len(expected) and all(value_matches(g, e) for g, e in zip(got, expected))
    return got == expected and type(got) is type(expected)


# ----------------------------------------------------------------------------- running
def _limits(config: SandboxConfig) -> dict:
    return {"timeout_s": config.timeout_s, "cpu_s": math.ceil(config.timeout_s), "memory_mb": config.memory_mb,
            "max_output_bytes": config.max_output_bytes, "max_open_files": config.max_open_files,
            "max_processes": config.max_processes}


def _request(task: CodeTask, test: TestCase, limits: dict) -> dict:
    request = {"mode": _KIND_MODE[test.kind], "source": task.program + test.script_suffix, "limits": limits}
    if test.kind is TestKind.STDIN:
        request["input"] = test.input
    elif test.kind is TestKind.FUNCTIONAL:
        request["fn_name"], request["args"] = task.fn_name, list(test.args)
    return request


def _judge(test: TestCase, reply: dict) -> tuple[CodeStatus, str]:
    outcome = reply.get("outcome")
    if outcome != sb.OK:
        return _OUTCOME_STATUS.get(outcome, CodeStatus.SANDBOX_ERROR), str(reply.get("message", ""))[-500:]
    if test.kind is TestKind.STDIN and not stdout_matches(reply.get("stdout", ""), test.expected):
        return CodeStatus.WRONG_ANSWER, f"stdout differs from the expected output: {reply.get('stdout', '')[:200]!r}"
    if test.kind is TestKind.FUNCTIONAL:
        got = json.loads(reply["value_json"]) if "value_json" in reply else None
        wanted = (test.expected, *test.also_expected)
        if reply.get("value_is_repr") or not any(value_matches(got, w) for w in wanted):
            return CodeStatus.WRONG_ANSWER, f"returned {str(got)[:200]}"
    return CodeStatus.PASSED, ""


def run_task(worker: SandboxWorker, task: CodeTask, config: CodeRewardConfig) -> CodeResult:
    """Run `task`'s tests on `worker` (restarted when it dies or hangs)."""
    if task.program is None:
        return CodeResult(0.0, CodeStatus.COMPILE_ERROR, num_tests=len(task.tests), detail="no python code block found")
    tests = task.tests[: config.max_tests] if config.max_tests else task.tests
    limits, results = _limits(config.sandbox), []
    for index, test in enumerate(tests):
        start = time.monotonic()
        try:
            reply = worker.run(_request(task, test, limits))
            status, detail = _judge(test, reply)
            if not reply.get("clean", True):
                worker.restart()  # something outlived the test's sweep: start from a fresh sandbox
        except SandboxTimeoutError as exc:
            status, detail = CodeStatus.TIMEOUT, f"outer kill: {exc}"
            worker.restart()
        except SandboxDiedError as exc:
            status, detail = CodeStatus.SANDBOX_ERROR, str(exc)
            worker.restart()
        results.append(TestResult(index, status, round(time.monotonic() - start, 4), detail))
        if status is not CodeStatus.PASSED and config.stop_on_first_failure:
            break
    failed = next((r for r in results if r.status is not CodeStatus.PASSED), None)
    if failed is None and len(results) == len(tests):
        return CodeResult(1.0, CodeStatus.PASSED, tuple(results), len(task.tests))
    return CodeResult(0.0, failed.status, tuple(results), len(task.tests), detail=f"test {failed.index}: {failed.detail}")


class CodeRewardPool:
    """Score code rows on `config.num_workers` long-lived sandboxes, from background threads.

    `submit(row)` -> Future[CodeResult] (returns at once); `score(rows)` -> results in order.
    A row that cannot be parsed resolves to a ValueError naming the field. Use as a context
    manager or call `close()`: every sandbox is killed on close.
    """

    def __init__(self, config: CodeRewardConfig = CodeRewardConfig()) -> None:
        self.config = config
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        # Start one sandbox first so that a missing bwrap fails here, loudly, not in a thread.
        self._workers = [SandboxWorker(config.sandbox, index=0)]
        try:
            self._workers += [SandboxWorker(config.sandbox, index=i) for i in range(1, config.num_workers)]
        except BaseException:
            self.close()
            raise
        self._threads = [threading.Thread(target=self._loop, args=(w,), name=f"code-reward-{w.index}", daemon=True)
                         for w in self._workers]
        for thread in self._threads:
            thread.start()

    @property
    def sandboxed(self) -> bool:
        return all(w.sandboxed for w in self._workers)

    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._workers if w.pid is not None]

    def submit(self, row: dict | CodeTask) -> concurrent.futures.Future:
        if self._closed:
            raise RuntimeError("submit: the code reward pool is closed")
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            task = row if isinstance(row, CodeTask) else parse_row(row)
        except ValueError as exc:
            future.set_exception(exc)
            return future
        self._queue.put((task, future))
        return future

    def score(self, rows: list[dict | CodeTask]) -> list[CodeResult]:
        return [f.result() for f in [self.submit(r) for r in rows]]

    def _loop(self, worker: SandboxWorker) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            task, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(run_task(worker, task, self.config))
            except BaseException as exc:  # noqa: BLE001 - e.g. a sandbox that cannot restart
                _log.error("code reward worker %d failed: %s", worker.index, exc)
                future.set_exception(exc)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for _ in getattr(self, "_threads", []):
            self._queue.put(None)
        for thread in getattr(self, "_threads", []):
            thread.join()
        for worker in self._workers:
            worker.close()

    def __enter__(self) -> "CodeRewardPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


# ----------------------------------------------------------------------------- CLI
_CLI_DESCRIPTION = """\
Run model-written Python programs against their tests in a bubblewrap sandbox.

Each input row is a JSON object with the program, as `response` (the last ```python block is
taken) or `code` (used as is), and its tests in one of these layouts:
  LiveCodeBench  `public_test_cases` / `private_test_cases` ([{input, output, testtype:
                 stdin|functional}], JSON or LiveCodeBench's compressed string) with
                 `metadata.func_name` for functional tests;
  TACO / APPS    `input_output` (JSON: inputs, outputs, optional fn_name; call-based
                 outputs wrapped in one-element lists);
  DeepCoder      `tests` (JSON: TACO's object, or a list of {input, output} cases typed
                 testtype stdin|functional or type stdin_stdout|function_call);
  HumanEval      `test` (defines check(candidate)) + `entry_point`, optional `prompt`
                 (prepended to the program).
Each output row is the input row plus `reward` (1.0 only if every test passed), `status`
(passed, wrong_answer, runtime_error, timeout, memory_limit, compile_error, sandbox_error) and
`tests` (per-test status and time). A malformed row stops the run with an error naming the row,
unless --skip-malformed is given. A summary is printed as one JSON line at the end.

Without bubblewrap (Debian package `bubblewrap`) the command refuses to run, unless
--allow-unsandboxed is given: then programs run WITHOUT isolation (rlimits and timeouts only).

example:
  ace reward code --input rollouts.jsonl --output scored.jsonl --workers 4 --timeout 6
"""


def _build_parser() -> argparse.ArgumentParser:
    defaults = SandboxConfig()
    parser = argparse.ArgumentParser(
        prog="ace reward code", description=_CLI_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, type=Path, help="JSONL file of rows to score")
    parser.add_argument("--output", required=True, type=Path, help="JSONL file to write (replaced)")
    parser.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                        help="sandboxes run in parallel (default: CPU count, at most 8)")
    parser.add_argument("--timeout", type=float, default=defaults.timeout_s,
                        help=f"wall-clock seconds per test; CPU time is limited to the same (default: {defaults.timeout_s:g})")
    parser.add_argument("--memory-mb", type=int, default=defaults.memory_mb,
                        help=f"address-space limit per test in MiB (default: {defaults.memory_mb})")
    parser.add_argument("--max-tests", type=int, default=None, help="run at most this many tests per row")
    parser.add_argument("--all-tests", action="store_true",
                        help="run every test even after one fails (default: stop at the first failure)")
    parser.add_argument("--response-field", default="response", help="field holding the response (default: response)")
    parser.add_argument("--code-field", default="code", help="field holding a bare program (default: code)")
    parser.add_argument("--skip-malformed", action="store_true",
                        help="skip and count malformed rows instead of stopping at the first one")
    parser.add_argument("--allow-unsandboxed", action="store_true",
                        help="if bubblewrap is missing, run programs WITHOUT isolation (dangerous)")
    return parser


def _read_tasks(args: argparse.Namespace) -> tuple[list[tuple[dict, CodeTask]], int]:
    rows, skipped = [], 0
    with open(args.input, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
                rows.append((row, parse_row(row, response_field=args.response_field, code_field=args.code_field)))
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                if not args.skip_malformed:
                    raise ValueError(f"{args.input}:{line_no}: {exc} (use --skip-malformed to skip such rows)") from exc
                skipped += 1
                _log.warning("%s:%d: skipped: %s", args.input, line_no, exc)
    return rows, skipped


def cli_main(argv: list[str]) -> int:
    """`ace reward code --input F.jsonl --output O.jsonl [--workers N] [--timeout S] ...`."""
    args = _build_parser().parse_args(argv)
    try:
        config = CodeRewardConfig(
            sandbox=SandboxConfig(timeout_s=args.timeout, memory_mb=args.memory_mb,
                                  allow_unsandboxed=args.allow_unsandboxed),
            num_workers=args.workers, stop_on_first_failure=not args.all_tests, max_tests=args.max_tests,
        )
        rows, skipped = _read_tasks(args)
    except (ValueError, OSError) as exc:
        console.error(f"ace reward code: error: {exc}")
        return 2
    try:
        pool = CodeRewardPool(config)
    except sb.SandboxUnavailableError as exc:
        console.error(f"ace reward code: error: {exc}")
        return 2
    counts: collections.Counter = collections.Counter()
    start = time.monotonic()
    with pool, open(args.output, "w", encoding="utf-8") as out:
        futures = [pool.submit(task) for _, task in rows]
        for i, ((row, _), future) in enumerate(zip(rows, futures), start=1):
            result = future.result()
            counts[result.status.value] += 1
            out.write(json.dumps({**row, "reward": result.reward, "status": result.status.value,
                                  "tests": [t.to_dict() for t in result.tests], "num_tests": result.num_tests,
                                  "detail": result.detail}) + "\n")
            if i % 50 == 0 or i == len(rows):
                _log.info("scored %d/%d rows (%.1f rows/s)", i, len(rows), i / max(time.monotonic() - start, 1e-9))
    summary = {"rows": len(rows), "skipped_malformed": skipped, "passed": counts.get("passed", 0),
               "pass_rate": counts.get("passed", 0) / len(rows) if rows else 0.0, "status_counts": dict(counts),
               "sandboxed": pool.sandboxed, "seconds": round(time.monotonic() - start, 2)}
    console.result(json.dumps(summary))
    return 0
