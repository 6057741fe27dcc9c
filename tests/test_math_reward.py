"""Math reward: answer extraction, grading against math-verify's own judgement, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from math_verify import parse, verify

from megatron_ace.rewards.math_reward import (
    BOXED_ONLY_POLICY,
    FULL_POLICY,
    AnswerSource,
    MathRewardConfig,
    MathRewardPool,
    MathStatus,
    cli_main,
    extract_answer,
    find_last_boxed,
    score_math,
)

REPO = Path(__file__).resolve().parents[1]

# (reference, predicted answer, mathematically equal?) - the truth column is mathematics, not
# this code; the test also checks that we agree with math-verify run directly on the same pair.
EQUIVALENCE_TABLE = [
    ("\\frac{1}{2}", "0.5", True),
    ("\\frac12", "1/2", True),
    ("\\dfrac{3}{4}", "0.75", True),
    ("\\frac{1}{3}", "0.333", False),
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("\\{1,2\\}", "\\{1,3\\}", False),
    ("[0,1)", "[0, 1)", True),
    ("(1,2)", "(1, 2)", True),
    ("1000", "1,000", True),
    ("\\infty", "\\infty", True),
    ("3", "4", False),
    ("-7", "-7.0", True),
    ("\\frac{\\pi}{2}", "\\pi/2", True),
    ("x^2+2x+1", "(x+1)^2", True),
    ("x^2+1", "(x+1)^2", False),
    ("\\sqrt{2}/2", "\\frac{1}{\\sqrt{2}}", True),
    ("10\\%", "10", True),
    ("2^{10}", "1024", True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", True),
]


@pytest.mark.parametrize("reference, answer, equal", EQUIVALENCE_TABLE)
def test_grading_agrees_with_math_verify_and_with_mathematics(reference, answer, equal):
    response = f"Some reasoning... so the result is \\boxed{{{answer}}}."
    # A generous verifier timeout: this test is about grading, and the first latex parse of a
    # process (sympy warm-up) can take seconds on a loaded machine.
    result = score_math(response, reference, MathRewardConfig(verify_timeout_s=60))
    direct = verify(parse(f"${reference}$"), parse(response))
    assert result.reward == float(direct)
    assert result.reward == float(equal)
    assert result.status is (MathStatus.CORRECT if equal else MathStatus.WRONG)
    assert result.extracted == answer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\fbox{7}", "7"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces do not close the box
        ("\\boxed{a_{b_{c}} + {d}}", "a_{b_{c}} + {d}"),
        ("\\boxed 5$", "5"),
        ("\\boxed{3} and then a truncated \\boxed{\\frac{1}{", "3"),  # unclosed last box skipped
        ("\\boxed{} \\boxed{ }", None),
        ("\\boxedx{2}", None),
        ("no box here", None),
    ],
)
def test_find_last_boxed(text, expected):
    assert find_last_boxed(text) == expected


@pytest.mark.parametrize(
    "response, answer, source",
    [
        ("We get \\boxed{12}.\nAnswer: 13", "12", AnswerSource.BOXED),  # policy order, not position
        ("Thus the final answer is $\\frac{3}{4}$.", "\\frac{3}{4}", AnswerSource.FINAL_ANSWER),
        ("The final answer is: 42.", "42", AnswerSource.FINAL_ANSWER),
        ("The final answer is 42. I hope it is correct.", "42", AnswerSource.FINAL_ANSWER),
        ("The final answer is 3.75 dollars", "3.75 dollars", AnswerSource.FINAL_ANSWER),
        ("## **Final Answer**: 5\n", "5", AnswerSource.ANSWER_LINE),
        ("so 3-2 = 1 and 5-7", "7", AnswerSource.LAST_NUMBER),  # binary minus is not a sign
        ("Final Answer: The final answer is \\boxed{9}. I hope", "9", AnswerSource.BOXED),
        ("work\n**Answer:** $x = 3$\n", "x = 3", AnswerSource.ANSWER_LINE),
        ("work\nAnswer: 17.\n", "17", AnswerSource.ANSWER_LINE),
        ("we have 1,000 apples and then -2.5 kg", "-2.5", AnswerSource.LAST_NUMBER),
        ("<think>maybe \\boxed{1}</think>So it is \\boxed{2}", "2", AnswerSource.BOXED),
        ("<think>maybe \\boxed{1}</think>I am not sure.", None, None),  # guesses in thoughts don't count
        ("nothing to see", None, None),
    ],
)
def test_extract_answer_full_policy(response, answer, source):
    got = extract_answer(response, FULL_POLICY)
    assert (got.answer, got.source) == (answer, source) if got else (answer, source) == (None, None)


def test_boxed_only_policy_ignores_fallbacks():
    assert extract_answer("Answer: 5", BOXED_ONLY_POLICY) is None
    assert extract_answer("the final answer is 5", (AnswerSource.LAST_NUMBER,)).answer == "5"


def test_statuses():
    assert score_math("I don't know", "3").status is MathStatus.NO_ANSWER
    assert score_math("\\boxed{4}", "3").status is MathStatus.WRONG
    assert score_math("\\boxed{3}", "\\boxed{3}").status is MathStatus.CORRECT  # boxed reference
    assert score_math("\\boxed{3}", "$3$").status is MathStatus.CORRECT
    bad_reference = score_math("\\boxed{3}", "")
    assert bad_reference.status is MathStatus.ERROR and bad_reference.reward == 0.0
    no_boxed = score_math("Answer: 3", "3", MathRewardConfig(policy=BOXED_ONLY_POLICY))
    assert no_boxed.status is MathStatus.NO_ANSWER


def test_math_verify_own_timeout_gives_timeout_status():
    start = time.monotonic()
    result = score_math("\\boxed{9^{9^{9^{9}}}}", "5", MathRewardConfig(verify_timeout_s=1))
    assert result.status is MathStatus.TIMEOUT and result.reward == 0.0
    assert time.monotonic() - start < 4


def test_verdict_cache_repeats_math_verify_and_never_keeps_timeouts():
    """Verdicts are cached per (reference, extracted answer, config): a repeat gives math-verify's
    judgement again (checked against math-verify called directly), a different response with
    the same final answer is served from the cache, and a timeout is retried, never cached."""
    from megatron_ace.rewards.math_reward import _verdict

    config = MathRewardConfig(verify_timeout_s=60)
    _verdict.cache_clear()
    pairs = [(reference, answer) for reference, answer, _ in EQUIVALENCE_TABLE]
    first = [score_math(f"So \\boxed{{{a}}}.", r, config) for r, a in pairs]
    misses = _verdict.cache_info().misses
    again = [score_math(f"Another way: it is \\boxed{{{a}}}", r, config) for r, a in pairs]
    assert _verdict.cache_info().misses == misses  # every repeat was a cache hit
    for (r, a), x, y in zip(pairs, first, again):
        direct = verify(parse(f"${r}$"), parse(f"\\boxed{{{a}}}"))
        assert x.reward == y.reward == float(direct), (r, a)
        assert x.status is y.status and x.extracted == y.extracted == a
    hostile = MathRewardConfig(verify_timeout_s=1)
    for _ in range(2):
        before = _verdict.cache_info().currsize
        result = score_math("\\boxed{9^{9^{9^{9}}}}", "5", hostile)
        assert result.status is MathStatus.TIMEOUT
        assert _verdict.cache_info().currsize == before


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(policy=()), "policy"),
        (dict(policy=(AnswerSource.BOXED, AnswerSource.BOXED)), "policy"),
        (dict(policy=("nonsense",)), "nonsense"),
        (dict(verify_timeout_s=-1), "verify_timeout_s"),
        (dict(verify_timeout_s=1.5), "verify_timeout_s"),
        (dict(float_rounding=-1), "float_rounding"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MathRewardConfig(**kwargs)


def test_math_reward_pool_scores_and_times_out_hostile_answers():
    responses = ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{\\frac{2}{4}}", "Answer: 7", "no idea"]
    references = ["5", "0.5", "8", "1"]
    with MathRewardPool(MathRewardConfig(verify_timeout_s=0), num_workers=2, timeout_s=2.0) as pool:
        results = pool.score(responses, references)
        assert pool.pool.num_killed == 1
    assert [r.status for r in results] == [MathStatus.TIMEOUT, MathStatus.CORRECT, MathStatus.WRONG, MathStatus.NO_ANSWER]
    assert results[0].extracted == "9^{9^{9^{9}}}"
    assert [r.reward for r in results] == [0.0, 1.0, 0.0, 0.0]


def _write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_cli_end_to_end(tmp_path, capsys):
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    rows = [
        {"id": 0, "response": "so \\boxed{\\frac{1}{2}}", "answer": "0.5"},
        {"id": 1, "response": "so \\boxed{3}", "answer": 4},
        {"id": 2, "response": "\\boxed{9^{9^{9^{9}}}}", "answer": "5"},
        {"id": 3, "response": "nothing", "answer": "1"},
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_jsonl(src, rows)
    argv = ["--input", str(src), "--output", str(dst), "--workers", "2", "--timeout", "2", "--verify-timeout", "0"]
    assert cli_main(argv) == 0
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["id"] for r in out] == [0, 1, 2, 3]
    assert [r["reward"] for r in out] == [1.0, 0.0, 0.0, 0.0]
    assert [r["status"] for r in out] == ["correct", "wrong", "timeout", "no_answer"]
    assert out[0]["response"] == rows[0]["response"]  # input fields kept
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 4 and summary["correct"] == 1 and summary["timeout"] == 1
    leftover = [p for p in psutil.Process().children(recursive=True)
                if p.pid not in children_before and "resource_tracker" not in " ".join(p.cmdline())]
    assert leftover == []


def test_cli_malformed_rows_error_or_skip(tmp_path, capsys):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_jsonl(src, [{"response": "\\boxed{1}", "answer": "1"}, "{not json", {"response": "x"}])
    with pytest.raises(SystemExit) as exc:
        cli_main(["--input", str(src), "--output", str(dst)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{src}:2" in err and "not valid JSON" in err
    assert not dst.exists()
    assert cli_main(["--input", str(src), "--output", str(dst), "--skip-malformed", "--workers", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["skipped_malformed"] == 2 and summary["rows"] == 1 and summary["correct"] == 1


def test_cli_through_the_ace_command(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_jsonl(src, [{"response": "The final answer is $\\sqrt{4}$.", "answer": "2"}])
    help_run = subprocess.run([sys.executable, "-m", "megatron_ace.cli", "reward", "math", "--help"],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
    assert help_run.returncode == 0 and "--skip-malformed" in help_run.stdout
    run = subprocess.run(
        [sys.executable, "-m", "megatron_ace.cli", "reward", "math", "--input", str(src), "--output", str(dst),
         "--workers", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(dst.read_text())["status"] == "correct"
