"""The generated arithmetic task: determinism, split hygiene, and grading by math-verify."""

from __future__ import annotations

import ast
import json
import operator

import pytest

from megatron_ace.data import arith_task as at

math_verify = pytest.importorskip("math_verify")

CFG = at.ArithTaskConfig(seed=3, min_operands=2, max_operands=5, max_operand=12)
OTHER_SEED = at.ArithTaskConfig(seed=99, min_operands=2, max_operands=5, max_operand=12)

_PY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _python_value(expression: str) -> int:
    """Evaluate with Python's own parser (an independent reference for precedence)."""

    def ev(node):
        if isinstance(node, ast.BinOp):
            return _PY_OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.Constant):
            return node.value
        raise AssertionError(f"unexpected node {node!r}")

    return ev(ast.parse(expression, mode="eval").body)


def test_deterministic_and_prefix_stable():
    a = at.generate_problems(CFG, at.Split.TRAIN, 300)
    b = at.generate_problems(CFG, at.Split.TRAIN, 300)
    assert a == b
    assert at.generate_problems(CFG, at.Split.TRAIN, 100) == a[:100]
    other_seed = at.generate_problems(OTHER_SEED, at.Split.TRAIN, 300)
    assert [p.expression for p in other_seed] != [p.expression for p in a]


def test_splits_disjoint_and_unique():
    train = at.generate_problems(CFG, at.Split.TRAIN, 2000)
    held = at.generate_problems(CFG, at.Split.HELDOUT, 300)
    train_x = {p.expression for p in train}
    held_x = {p.expression for p in held}
    assert len(train_x) == 2000 and len(held_x) == 300
    assert not train_x & held_x
    # Held-out membership depends on the text only: another seed's held-out rows are held out too.
    other = at.generate_problems(OTHER_SEED, at.Split.TRAIN, 2000)
    assert not {p.expression for p in other} & held_x


def test_heldout_fraction_roughly_respected():
    cfg = at.ArithTaskConfig(min_operands=2, max_operands=2, max_operand=30, heldout_fraction=0.2)
    exprs = [f"{a}{op}{b}" for a in range(31) for b in range(31) for op in cfg.operators]
    share = sum(at.split_of(e, 0.2) is at.Split.HELDOUT for e in exprs) / len(exprs)
    assert 0.17 < share < 0.23


def test_difficulty_knobs_respected():
    for p in at.generate_problems(CFG, at.Split.TRAIN, 500):
        numbers = [int(t) for t in p.expression.replace("+", " ").replace("-", " ").replace("*", " ").split()]
        assert 2 <= len(numbers) <= 5
        assert all(0 <= n <= 12 for n in numbers)
        assert len(p.steps) == len(numbers) - 1
    counts = {len(p.steps) + 1 for p in at.generate_problems(CFG, at.Split.TRAIN, 500)}
    assert counts == {2, 3, 4, 5}


def test_answers_and_every_step_match_python():
    for p in at.generate_problems(CFG, at.Split.TRAIN, 500):
        value = _python_value(p.expression)
        assert p.answer == value, p.expression
        # Each written step is itself an expression with the same value.
        for step in p.steps:
            assert _python_value(step) == value, (p.expression, step)
        assert p.steps[-1] == str(value)


def test_rows_shape():
    problems = at.generate_problems(CFG, at.Split.HELDOUT, 5)
    for row, p in zip(at.prompt_rows(problems), problems):
        assert row == {"prompt": f"Compute {p.expression}.", "answer": str(p.answer)}
    for row in at.sft_rows(problems):
        assert set(row) == {"prompt", "response"}
        assert row["response"].endswith("}") and "\\boxed{" in row["response"]


@pytest.mark.parametrize("split", list(at.Split))
def test_math_verify_grades_reference_responses(split):
    problems = at.generate_problems(CFG, split, 150)
    for p, prompt_row, sft_row in zip(problems, at.prompt_rows(problems), at.sft_rows(problems)):
        gold = math_verify.parse(prompt_row["answer"])
        assert math_verify.verify(gold, math_verify.parse(sft_row["response"])), sft_row
        wrong = sft_row["response"].replace(f"\\boxed{{{p.answer}}}", f"\\boxed{{{p.answer + 1}}}")
        assert not math_verify.verify(gold, math_verify.parse(wrong)), wrong


def test_write_jsonl_and_task_files(tmp_path):
    paths = at.write_task_files(CFG, tmp_path / "task", num_sft=50, num_rl=20, num_heldout=10)
    rows = {k: [json.loads(line) for line in v.read_text().splitlines()] for k, v in paths.items()}
    assert [len(rows[k]) for k in ("sft", "rl", "heldout")] == [50, 20, 10]
    assert set(rows["rl"][0]) == {"prompt", "answer"} and set(rows["sft"][0]) == {"prompt", "response"}
    assert not {r["prompt"] for r in rows["heldout"]} & {r["prompt"] for r in rows["sft"]}


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"min_operands": 1}, "min_operands"),
        ({"min_operands": 4, "max_operands": 3}, "max_operands"),
        ({"min_operand": -1}, "min_operand"),
        ({"min_operand": 5, "max_operand": 4}, "max_operand"),
        ({"operators": ("/",)}, "operators"),
        ({"operators": ()}, "operators"),
        ({"heldout_fraction": 0.0}, "heldout_fraction"),
        ({"heldout_fraction": 1.0}, "heldout_fraction"),
        ({"slip_fraction": -0.1}, "slip_fraction"),
    ],
)
def test_config_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        at.ArithTaskConfig(**kwargs)


def test_too_many_rows_is_a_clear_error():
    tiny = at.ArithTaskConfig(min_operands=2, max_operands=2, max_operand=2, operators=("+",))
    with pytest.raises(ValueError, match="num_problems"):
        at.generate_problems(tiny, at.Split.TRAIN, 100)


def test_slipped_responses_are_wrong_and_counted():
    problems = at.generate_problems(CFG, at.Split.TRAIN, 1000)
    rows = at.sft_rows(problems, slip_fraction=0.3, seed=7)
    assert rows == at.sft_rows(problems, slip_fraction=0.3, seed=7)
    num_wrong = 0
    for p, row in zip(problems, rows):
        gold = math_verify.parse(str(p.answer))
        correct = math_verify.verify(gold, math_verify.parse(row["response"]))
        assert correct == (row["response"] == p.response), row
        num_wrong += not correct
        if not correct:
            # The slip is carried on: the steps after it agree with the (wrong) boxed answer.
            lines = row["response"].split("\n")
            boxed = int(lines[-1][len("\\boxed{") : -1])
            assert _python_value(lines[-2][1:]) == boxed and 1 <= abs(boxed - p.answer)
    assert 250 <= num_wrong <= 350
    assert at.sft_rows(problems) == at.sft_rows(problems, slip_fraction=0.0, seed=7)
    with pytest.raises(ValueError, match="slip_fraction"):
        at.sft_rows(problems, slip_fraction=1.0)
