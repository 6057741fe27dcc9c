"""Published layouts: every file format reads the rows as written, each layout is recognised and
parsed into the fields its dataset means, malformed rows name file, row and field and list the
layouts understood, and a column mapping reads anything else."""

from __future__ import annotations

import json

import pytest
from layout_fixtures import (
    CODE_LAYOUTS,
    FORMATS,
    LCB_LEETCODE,
    MATH_LAYOUTS,
    SFT_EXPECTED,
    SFT_LAYOUTS,
    lcb_private,
    write,
)

from megatron_ace.data.layouts import (
    CodeProblem,
    Conversation,
    FieldMap,
    Layout,
    MathProblem,
    RecordKind,
    code_user_prompt,
    parse_record,
)
from megatron_ace.data.tables import RowError, expand_paths, iter_rows, open_table

KINDS = (RecordKind.CONVERSATION, RecordKind.MATH, RecordKind.CODE)
EXPECTED_LAYOUT = {
    "acereason_sft": Layout.ACEREASON_SFT, "messages": Layout.MESSAGES,
    "messages_parts": Layout.MESSAGES, "sharegpt": Layout.SHAREGPT,
    "trl_prompt_completion": Layout.PROMPT_COMPLETION,
    "trl_conversational": Layout.PROMPT_COMPLETION, "problem_solution": Layout.PROBLEM_SOLUTION,
    "acereason_math": Layout.PROBLEM_ANSWER, "deepscaler": Layout.PROBLEM_ANSWER,
    "math500": Layout.PROBLEM_ANSWER, "aime24_h4": Layout.PROBLEM_ANSWER,
    "aimo_validation_aime": Layout.PROBLEM_ANSWER,
    "aime24_maxwell": Layout.PROBLEM_ANSWER_CAPITALISED, "aime25_mathai": Layout.PROBLEM_ANSWER,
    "aime25_opencompass": Layout.QUESTION_ANSWER, "aime25_yentinglin": Layout.PROBLEM_ANSWER,
    "livecodebench": Layout.LIVECODEBENCH, "taco": Layout.TACO_APPS,
    "deepcoder": Layout.DEEPCODER,
}


def _kind(name: str) -> list[RecordKind]:
    if name in SFT_LAYOUTS:
        return [RecordKind.CONVERSATION]
    return [RecordKind.MATH] if name in MATH_LAYOUTS else [RecordKind.CODE]


def _read_all(path) -> list:
    return [row for unit in expand_paths([str(path)]) for _, row in iter_rows(open_table(unit))]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_rows_as_written(tmp_path, fmt):
    for name, rows in {"aime24_h4": MATH_LAYOUTS["aime24_h4"], "livecodebench": CODE_LAYOUTS[
            "livecodebench"], "messages_parts": SFT_LAYOUTS["messages_parts"]}.items():
        got = _read_all(write(rows, fmt, tmp_path, name))
        # Columnar files hold every column in every row; absent values read back as null.
        assert [{k: v for k, v in r.items() if v is not None} for r in got] == rows


def test_json_rows_keep_types_that_change_between_rows(tmp_path):
    rows = [{"problem": "a", "answer": 3}, {"problem": "b", "answer": "\\frac{1}{2}"},
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant",
                                                             "content": [{"type": "text", "text": "y"}]}]}]
    for fmt in ("jsonl", "json"):
        assert _read_all(write(rows, fmt, tmp_path, f"mixed_{fmt}")) == rows
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"problem": "a", "answer": "1"}\n\n{"problem": "b",\n')
    assert [(n, r if not isinstance(r, RowError) else "error") for n, r in
            iter_rows(open_table(path))] == [(1, rows[0] | {"answer": "1"}), (2, None), (3, "error")]


@pytest.mark.parametrize("name", list(EXPECTED_LAYOUT))
def test_each_published_layout_is_recognised(name):
    rows = {**SFT_LAYOUTS, **MATH_LAYOUTS, **CODE_LAYOUTS}[name]
    for row in rows:
        assert parse_record(row, _kind(name)).layout is EXPECTED_LAYOUT[name]


def test_conversations_carry_prompt_response_and_domain():
    for name, expected in SFT_EXPECTED.items():
        got = [parse_record(r, [RecordKind.CONVERSATION]) for r in SFT_LAYOUTS[name]]
        assert [(c.prompt, c.responses[0]) for c in got] == expected
    ace = [parse_record(r, [RecordKind.CONVERSATION]) for r in SFT_LAYOUTS["acereason_sft"]]
    assert all(isinstance(c, Conversation) for c in ace)
    assert [c.domain for c in ace] == [r["category"] for r in SFT_LAYOUTS["acereason_sft"]]
    assert all(c.responses == [r["output"]] and "<think>" in c.responses[0]
               for c, r in zip(ace, SFT_LAYOUTS["acereason_sft"]))
    # One prompt over several rows shares one key; different prompts do not.
    assert len({c.prompt_key() for c in ace}) == 3


def test_math_records_read_answers_of_every_type():
    got = {name: [parse_record(r, [RecordKind.MATH]) for r in rows]
           for name, rows in MATH_LAYOUTS.items()}
    assert all(isinstance(p, MathProblem) for ps in got.values() for p in ps)
    assert [(p.problem, p.answer, p.id) for p in got["aime24_maxwell"]] == [
        ("Compute $12 \\cdot 12$.", "144", "2024-I-1"), ("Compute $5^3$.", "125", "2024-I-2")]
    assert got["aimo_validation_aime"][0].answer == "121"
    assert got["aime25_opencompass"][0].problem == "Compute $6 \\cdot 7$."
    assert got["math500"][0].id == "test/prealgebra/1.json"


def test_code_prompt_carries_starter_code_and_how_to_answer():
    leetcode = parse_record(LCB_LEETCODE, [RecordKind.CODE])
    assert isinstance(leetcode, CodeProblem) and leetcode.contest_date == "2025-02-01T00:00:00"
    prompt = code_user_prompt(leetcode, "addToAll")
    assert LCB_LEETCODE["question_content"] in prompt
    assert f"```python\n{LCB_LEETCODE['starter_code'].rstrip()}\n```" in prompt
    assert "starter code" in prompt and "standard input" not in prompt
    stdin = code_user_prompt(parse_record(CODE_LAYOUTS["livecodebench"][0], [RecordKind.CODE]), None)
    assert "standard input" in stdin and "standard output" in stdin
    taco_call = parse_record(CODE_LAYOUTS["deepcoder"][1], [RecordKind.CODE])
    assert "function named `square`" in code_user_prompt(taco_call, "square")


@pytest.mark.parametrize("row, kinds, message", [
    ({"text": "hi"}, [RecordKind.CONVERSATION], r"no known layout fits this row \(its fields: "
     r"text\); understood layouts: acereason-sft \[input, output\].*messages.*sharegpt.*"
     r"prompt-completion.*prompt-response.*problem-solution"),
    ({"category": "code", "input": "Q", "output": "  "}, [RecordKind.CONVERSATION],
     r"^output: is empty"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
                   {"role": "assistant", "content": "a"}]}, [RecordKind.CONVERSATION],
     r"messages\[0\]\.content\[0\]: only text parts"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, [RecordKind.CONVERSATION],
     r"conversations\[0\]\.from: must be one of system, human, user, gpt, assistant"),
    ({"messages": [{"role": "user", "content": "q"}]}, [RecordKind.CONVERSATION],
     r"messages: the last message must be the assistant's response"),
    ({"Problem": "x", "Answer": None, "ID": 1}, [RecordKind.MATH],
     r"no known layout.*problem-answer \[problem, answer\].*Problem-Answer"),
    ({"problem": "x", "answer": ["1"]}, [RecordKind.MATH], r"^answer: must be a string or a number"),
    ({"question_content": 7}, [RecordKind.CODE], r"^question_content: must be a string"),
])
def test_malformed_rows_name_the_field(row, kinds, message):
    with pytest.raises(RowError, match=message):
        parse_record(row, kinds)


def test_field_map_reads_other_layouts():
    fields = FieldMap(prompt="instruction", response="target", domain="kind")
    row = {"instruction": "Say hi.", "target": "Hi!", "kind": "code", "prompt": "ignored"}
    got = parse_record(row, [RecordKind.CONVERSATION], fields)
    assert (got.layout, got.prompt, got.responses, got.domain) == (
        Layout.PROMPT_RESPONSE, [{"role": "user", "content": "Say hi."}], ["Hi!"], "code")
    math = parse_record({"q": "1+1", "a": 2}, [RecordKind.MATH], FieldMap(prompt="q", answer="a"))
    assert (math.problem, math.answer) == ("1+1", "2")
    code = parse_record({"statement": "Echo.", "cases": json.dumps([{"input": "x\n",
                                                                      "output": "x\n"}])},
                        [RecordKind.CODE], FieldMap(prompt="statement", tests="cases"))
    assert code.layout is Layout.PROMPT_TESTS and "tests" in code.test_fields
    with pytest.raises(RowError, match=r"instruction \(data\.fields\.prompt\): missing"):
        parse_record({"target": "x"}, [RecordKind.CONVERSATION], fields)


def test_field_map_is_a_config_override():
    from megatron_ace.config.base import apply_overrides
    from megatron_ace.train.config import recipe
    from megatron_ace.train.grpo_config import recipe as grpo_recipe

    cfg = apply_overrides(recipe("acereason-sft-7b"), ["data.fields.prompt=input",
                                                       "data.fields.response=output"])
    assert (cfg.data.fields.prompt, cfg.data.fields.response) == ("input", "output")
    grpo = apply_overrides(grpo_recipe("grpo-tiny"), ["data.fields.answer=target",
                                                      "data.on_bad_row=skip"])
    assert grpo.data.fields.answer == "target" and grpo.data.on_bad_row.value == "skip"


def test_livecodebench_private_tests_decode_like_the_runner():
    from megatron_ace.rewards.code_tests import TestKind, parse_tests

    cases = [{"input": "[]\n5", "output": "[]", "testtype": "functional"}]
    blob = lcb_private(cases)
    # The runner's decoding of the published field, step by step.
    import base64
    import pickle
    import zlib
    assert json.loads(pickle.loads(zlib.decompress(base64.b64decode(blob.encode())))) == cases
    tests = parse_tests({"public_test_cases": "[]", "private_test_cases": blob,
                         "metadata": json.dumps({"func_name": "f"})})
    assert tests.fn_name == "f" and [(t.kind, t.args, t.expected) for t in tests.tests] == [
        (TestKind.FUNCTIONAL, ([], 5), [])]


@pytest.mark.parametrize("fields, message", [
    ({"question_content": "q", "public_test_cases": "[]", "metadata": "{}"}, r"tests: no test cases"),
    ({"public_test_cases": json.dumps([{"input": "1", "output": "2", "testtype": "functional"}]),
      "metadata": "{}"}, r"functional test but no metadata\.func_name"),
    ({"input_output": json.dumps({"inputs": ["1"], "outputs": []})}, r"input_output: 1 inputs but 0"),
    ({"tests": "[{broken"}, r"tests: not valid JSON"),
    ({"tests": json.dumps([{"type": "interactive", "input": "", "output": ""}])},
     r"unknown test type 'interactive'"),
    ({"private_test_cases": "bm90IGpzb24="}, r"private_test_cases: neither JSON nor"),
])
def test_unusable_tests_are_named(fields, message):
    from megatron_ace.rewards.code_tests import parse_tests

    with pytest.raises(ValueError, match=message):
        parse_tests(fields)
