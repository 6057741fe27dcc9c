"""RL prompts in every published layout and file format: math and code prompt sets load with
their answers / parsed tests, the reference solutions pass and wrong ones fail in the real
bubblewrap sandbox (a LeetCode-style solution written against the starter code included), and
rows without usable tests are errors naming file and row at load time, or skipped and counted."""

from __future__ import annotations

import json
import shutil

import pytest
from layout_fixtures import CODE_LAYOUTS, FORMATS, MATH_LAYOUTS, programs_for, write
from transformers import AutoTokenizer

from megatron_ace.data.tables import BadRowPolicy
from megatron_ace.train.grpo_config import Domain, PromptDataConfig
from megatron_ace.train.prompts import load_prompts


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from megatron_ace.data.tokenizer import save_qwen25_tokenizer

    path = save_qwen25_tokenizer(tmp_path_factory.mktemp("qwen25"))
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _folder(tmp_path, layouts, fmt):
    folder = tmp_path / fmt
    for name, rows in layouts.items():
        write(rows, fmt, folder, name)
    return folder


def _cfg(path, domain, **kw):
    return PromptDataConfig(train_path=str(path), domain=domain, max_prompt_tokens=4096, **kw)


@pytest.mark.parametrize("fmt", FORMATS)
def test_math_prompt_sets_load_in_every_format(tmp_path, qwen, fmt):
    folder = _folder(tmp_path, MATH_LAYOUTS, fmt)
    items = load_prompts(str(folder), _cfg(folder, Domain.MATH), qwen)
    want = sorted((r.get("problem") or r.get("Problem") or r["question"],
                   str(r.get("answer", r.get("Answer")))) for rows in MATH_LAYOUTS.values()
                  for r in rows)
    got = sorted((qwen.decode(it.prompt_ids).split("<|im_start|>user\n")[1].split("<|im_end|>")[0],
                  it.answer) for it in items)
    assert got == want


@pytest.fixture(scope="module")
def code_pool():
    from megatron_ace.rewards.code_reward import CodeRewardPool

    with CodeRewardPool() as pool:
        assert pool.sandboxed
        yield pool


def test_code_prompts_load_in_every_format_and_references_pass(tmp_path, qwen, code_pool):
    from megatron_ace.rewards.code_reward import CodeStatus, extract_program, task_for

    rows = sum(CODE_LAYOUTS.values(), [])
    tasks, expected = [], []
    for fmt in FORMATS:
        folder = _folder(tmp_path, CODE_LAYOUTS, fmt)
        items = load_prompts(str(folder), _cfg(folder, Domain.CODE), qwen)
        assert len(items) == len(rows) and all(it.tests.tests for it in items)
        for it in items:
            prompt = qwen.decode(it.prompt_ids)
            good, bad = programs_for(prompt)
            if fmt == "jsonl":  # the same items in every format: run the sandbox once
                tasks += [task_for(it.tests, extract_program(good)),
                          task_for(it.tests, extract_program(bad))]
                expected += [CodeStatus.PASSED, CodeStatus.WRONG_ANSWER]
            if "addToAll" in prompt:  # the LeetCode problem shows its starter code
                assert "class Solution:\n    def addToAll(self, nums: List[int], k: int)" in prompt
    results = code_pool.score(tasks)
    assert [r.status for r in results] == expected, [r.detail for r in results]
    # Private LiveCodeBench tests (compressed) were run too, not only the public one.
    assert max(r.num_tests for r in results) == 3


def test_taco_call_based_outputs_are_unwrapped_like_taco(code_pool):
    from megatron_ace.rewards.code_reward import CodeStatus, parse_row

    spec = json.dumps({"fn_name": "pair", "inputs": [[1], [2]], "outputs": [[[1, 1]], [[2, 2]]]})
    rows = [{"code": "def pair(x):\n    return [x, x]", "input_output": spec},
            {"code": "def pair(x):\n    return (x, x)", "input_output": spec},  # tuple == list
            {"code": "def pair(x):\n    return [x]", "input_output": spec}]
    got = [r.status for r in code_pool.score([parse_row(r) for r in rows])]
    assert got == [CodeStatus.PASSED, CodeStatus.PASSED, CodeStatus.WRONG_ANSWER]


def test_rows_without_usable_tests_are_named_or_skipped(tmp_path, qwen):
    rows = [CODE_LAYOUTS["taco"][0],
            {"question": "No tests here.", "input_output": json.dumps({"inputs": [], "outputs": []})},
            {"problem": "Bad JSON tests.", "tests": "[{"},
            CODE_LAYOUTS["deepcoder"][0]]
    path = write(rows, "jsonl", tmp_path, "code")
    with pytest.raises(ValueError, match=r"code\.jsonl: row 2: tests: no test cases.*on_bad_row"):
        load_prompts(str(path), _cfg(path, Domain.CODE), qwen)
    items = load_prompts(str(path), _cfg(path, Domain.CODE, on_bad_row=BadRowPolicy.SKIP), qwen)
    assert [it.index for it in items] == [1, 4]
    math = write([{"problem": "1+1", "answer": "2"}, {"problem": "no answer"}], "parquet",
                 tmp_path, "math")
    with pytest.raises(ValueError, match=r"math\.parquet: row 2: no known layout fits this row "
                                         r"\(its fields: problem\).*problem-answer"):
        load_prompts(str(math), _cfg(math, Domain.MATH), qwen)
    shutil.rmtree(tmp_path / "empty", ignore_errors=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no data file"):
        load_prompts(str(tmp_path / "empty"), _cfg(tmp_path, Domain.MATH), qwen)
