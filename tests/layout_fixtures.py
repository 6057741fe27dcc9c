"""Rows in the published layouts of the datasets this recipe uses, written by us (a few rows
each), and writers for every file format the loaders read.

Field names and encodings follow the published datasets: nvidia/AceReason-1.1-SFT (category,
source, input, output with the <think> trace inside output; one row per response), OpenAI
messages, ShareGPT, TRL prompt/completion, problem/solution; AceReason-Math, DeepScaleR,
MATH-500, the AIME 2024 / 2025 sets; LiveCodeBench code_generation_lite (JSON strings for
public tests and metadata, private tests as base64(zlib(pickle(JSON string))) like its later
releases), TACO/APPS (input_output with call-based outputs wrapped in one-element lists) and
DeepCoder (tests in its stdin and functional forms). Every code problem has a reference
solution that passes and a wrong one that fails.
"""

from __future__ import annotations

import base64
import json
import pickle
import shutil
import zlib
from pathlib import Path

FORMATS = ("jsonl", "json", "parquet", "save_to_disk", "arrow_shards")


def lcb_private(cases: list[dict]) -> str:
    """LiveCodeBench's compressed private tests: base64(zlib(pickle(json string)))."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()


def write(rows: list[dict], fmt: str, folder: Path, name: str) -> Path:
    """Write `rows` as `fmt` under `folder`; returns the file or directory to read."""
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    if fmt not in ("jsonl", "json"):
        # Columnar files hold every column in every row (absent values are null).
        columns = list(dict.fromkeys(k for r in rows for k in r))
        rows = [{c: r.get(c) for c in columns} for r in rows]
    if fmt == "jsonl":
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path = folder / f"{name}.json"
        path.write_text(json.dumps(rows, indent=1))
    elif fmt == "parquet":
        path = folder / f"{name}.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif fmt == "save_to_disk":
        path = folder / name
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    elif fmt == "arrow_shards":
        # The layout of `datasets`' own cache: shards and dataset_info.json, no state.json.
        staged = folder / f".{name}.staged"
        datasets.Dataset.from_list(rows).save_to_disk(str(staged),
                                                      num_shards=min(2, len(rows)))
        path = folder / name
        path.mkdir()
        for shard in sorted(staged.glob("*.arrow")):
            shutil.copy(shard, path / f"{name}-train-{shard.name.split('-', 1)[1]}")
        shutil.copy(staged / "dataset_info.json", path / "dataset_info.json")
        shutil.rmtree(staged)
    else:
        raise ValueError(fmt)
    return path


# ---- SFT ---------------------------------------------------------------------------------
AIME_PLANTED = ("Let $S$ be the set of positive integers $n$ less than $1000$ such that the "
                "decimal digits of $n$ are strictly increasing from left to right and $n$ is "
                "divisible by $7$. Find the number of elements of $S$.")
"""An AIME-style problem that appears both in the AIME fixture and inside the SFT file."""

ODD_SUM = "What is the sum of the first 10 positive odd integers?"
A_PLUS_B = "Read two integers on one line and print their sum."
A_PLUS_B_CODE = "a, b = map(int, input().split())\nprint(a + b)"

ACEREASON_SFT = [
    {"category": "math", "source": "aops", "input": ODD_SUM,
     "output": "<think>\nThe first n odd numbers add up to n^2.\n</think>\nThe sum is \\boxed{100}."},
    {"category": "math", "source": "aops", "input": ODD_SUM,
     "output": "<think>\n1+3+5+...+19, pair them: 10 pairs of 20 halves.\n</think>\n\\boxed{100}"},
    {"category": "math", "source": "aops", "input": ODD_SUM,
     "output": "<think>\nSquare of ten.\n</think>\nSo the answer is \\boxed{100}."},
    {"category": "code", "source": "codeforces", "input": A_PLUS_B,
     "output": f"<think>\nSplit the line, convert, add.\n</think>\n```python\n{A_PLUS_B_CODE}\n```"},
    {"category": "code", "source": "codeforces", "input": A_PLUS_B,
     "output": "<think>\nOne line, two numbers.\n</think>\n```python\nprint(sum(map(int, "
               "input().split())))\n```"},
    {"category": "math", "source": "aime", "input": AIME_PLANTED,
     "output": "<think>\nCount increasing-digit multiples of 7.\n</think>\n\\boxed{22}"},
]

SFT_LAYOUTS = {
    "acereason_sft": ACEREASON_SFT,
    "messages": [{"messages": [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Name a prime."},
                               {"role": "assistant", "content": "7 is prime."}]}],
    "messages_parts": [{"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Add 2 "},
                                     {"type": "text", "text": "and 3."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The sum is 5."}]}]}],
    "sharegpt": [{"conversations": [{"from": "human", "value": "Capital of France?"},
                                    {"from": "gpt", "value": "Paris."}]}],
    "trl_prompt_completion": [{"prompt": "Double 21.", "completion": "It is 42."}],
    "trl_conversational": [{"prompt": [{"role": "user", "content": "Halve 42."}],
                            "completion": [{"role": "assistant", "content": "It is 21."}]}],
    "problem_solution": [{"problem": "Compute 3*4.", "solution": "3*4 = \\boxed{12}."}],
}
"""name -> rows; each prompt's expected (messages, response) follow from the rows."""

SFT_EXPECTED = {  # name -> [(prompt messages, response)] in row order
    "messages": [([{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "Name a prime."}], "7 is prime.")],
    "messages_parts": [([{"role": "user", "content": "Add 2 and 3."}], "The sum is 5.")],
    "sharegpt": [([{"role": "user", "content": "Capital of France?"}], "Paris.")],
    "trl_prompt_completion": [([{"role": "user", "content": "Double 21."}], "It is 42.")],
    "trl_conversational": [([{"role": "user", "content": "Halve 42."}], "It is 21.")],
    "problem_solution": [([{"role": "user", "content": "Compute 3*4."}], "3*4 = \\boxed{12}.")],
}

# ---- math prompts and benchmarks -----------------------------------------------------------
MATH_LAYOUTS = {
    "acereason_math": [{"problem": "Compute $7 \\cdot 8$.", "answer": "56"},
                       {"problem": "What is $2^{10}$?", "answer": "1024"}],
    "deepscaler": [{"problem": "Find $x$ if $2x + 3 = 11$.", "answer": "4",
                    "solution": "Subtract 3 and halve: $x = 4$."},
                   {"problem": "Simplify $\\frac{6}{8}$.", "answer": "\\frac{3}{4}",
                    "solution": "Divide by 2."}],
    "math500": [{"problem": "What is $\\sqrt{49}$?", "solution": "$7$.", "answer": "7",
                 "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"},
                {"problem": "Evaluate $3!$.", "solution": "$6$.", "answer": "6",
                 "subject": "Counting & Probability", "level": 1,
                 "unique_id": "test/counting_and_probability/2.json"}],
    "aime24_h4": [{"id": 60, "problem": "Find the remainder when $2^{10}$ is divided by $1000$.",
                   "solution": "$1024 - 1000$.", "answer": "24", "url": "https://x/1",
                   "year": "2024"},
                  {"id": 61, "problem": AIME_PLANTED, "solution": "Count them.", "answer": "22",
                   "url": "https://x/2", "year": "2024"}],
    "aimo_validation_aime": [{"id": 0, "problem": "Compute $11^2$.", "solution": "121.",
                              "answer": 121, "url": "https://x/3"}],
    "aime24_maxwell": [{"ID": "2024-I-1", "Problem": "Compute $12 \\cdot 12$.",
                        "Solution": "144.", "Answer": 144},
                       {"ID": "2024-I-2", "Problem": "Compute $5^3$.", "Solution": "125.",
                        "Answer": 125}],
    "aime25_mathai": [{"problem": "Compute $9 \\cdot 9$.", "answer": "81", "id": "0"}],
    "aime25_opencompass": [{"question": "Compute $6 \\cdot 7$.", "answer": "42"}],
    "aime25_yentinglin": [{"id": 1, "problem": "Compute $13 + 29$.", "answer": "42",
                           "url": "https://x/4", "year": "2025"}],
}

# ---- code -----------------------------------------------------------------------------------
ADD_TO_ALL_STARTER = ("class Solution:\n    def addToAll(self, nums: List[int], k: int) -> "
                      "List[int]:\n        ")
REFERENCE: dict[str, str] = {}
"""marker (a substring of exactly one problem statement) -> a correct program, fenced."""
WRONG: dict[str, str] = {}
"""marker -> a wrong program, fenced."""


def programs_for(prompt: str) -> tuple[str, str]:
    """(correct, wrong) response for the code problem whose statement is inside `prompt`."""
    found = [m for m in REFERENCE if m in prompt]
    assert len(found) == 1, (found, prompt[:200])
    return REFERENCE[found[0]], WRONG[found[0]]


def _programs(pid: str, good: str, bad: str) -> None:
    REFERENCE[pid] = f"```python\n{good}\n```"
    WRONG[pid] = f"```python\n{bad}\n```"


def lcb_stdin_row(qid: str, date: str) -> dict:
    return {
        "question_title": f"Sum {qid}", "platform": "atcoder", "question_id": qid,
        "question_content": f"[{qid}] You are given two integers A and B on one line. Print A+B.",
        "contest_id": qid.split("_")[0], "contest_date": date, "starter_code": "",
        "difficulty": "easy",
        "public_test_cases": json.dumps([{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]),
        "private_test_cases": lcb_private([
            {"input": "10 -4\n", "output": "6\n", "testtype": "stdin"},
            {"input": "1000000000 1000000000\n", "output": "2000000000\n", "testtype": "stdin"}]),
        "metadata": "{}",
    }


LCB_LEETCODE = {
    "question_title": "add-to-all", "platform": "leetcode", "question_id": "3900",
    "question_content": "Given an integer array nums and an integer k, return the array with k "
                        "added to every element.\n\nExample 1:\nInput: nums = [1,2,3], k = 2\n"
                        "Output: [3,4,5]",
    "contest_id": "weekly-contest-435", "contest_date": "2025-02-01T00:00:00",
    "starter_code": ADD_TO_ALL_STARTER, "difficulty": "easy",
    "public_test_cases": json.dumps([{"input": "[1, 2, 3]\n2", "output": "[3, 4, 5]",
                                      "testtype": "functional"}]),
    "private_test_cases": lcb_private([
        {"input": "[]\n5", "output": "[]", "testtype": "functional"},
        {"input": "[-1, 7]\n1", "output": "[0, 8]", "testtype": "functional"}]),
    "metadata": json.dumps({"func_name": "addToAll"}),
}
LIVECODEBENCH = [lcb_stdin_row("abc400_a", "2024-08-01T00:00:00"), LCB_LEETCODE]
_programs("[abc400_a]", A_PLUS_B_CODE, "print(0)")
_programs("k added to every element", ADD_TO_ALL_STARTER + "return [x + k for x in nums]",
          ADD_TO_ALL_STARTER + "return [x - k for x in nums]")

LCB_WINDOW_DATES = {  # question_id -> contest_date, around the v5 / v6 boundaries
    "w1_a": "2024-07-31T23:59:59", "w2_a": "2024-08-01T00:00:00", "w3_a": "2025-01-31T18:00:00",
    "w4_a": "2025-02-01T00:00:00", "w5_a": "2025-02-01T12:30:00", "w6_a": "2025-05-01T00:00:00",
    "w7_a": "2025-05-02T00:00:00",
}

TACO = [
    {"question": "Write a function add_lists(a, b) that returns the element-wise sum of two "
                 "lists of equal length.", "starter_code": "def add_lists(a, b):\n\t",
     "input_output": json.dumps({"fn_name": "add_lists", "inputs": [[[1, 2], [3, 4]], [[0], [5]]],
                                 "outputs": [[[4, 6]], [[5]]]}),
     "solutions": json.dumps(["def add_lists(a, b):\n    return [x + y for x, y in zip(a, b)]"]),
     "difficulty": "EASY", "source": "codewars", "url": "https://x/taco1", "name": "add lists"},
    {"question": "The first line holds n, the second n integers. Print their sum.",
     "starter_code": "", "input_output": json.dumps({"inputs": ["3\n1 2 3\n", "1\n-5\n"],
                                                     "outputs": ["6\n", "-5\n"]}),
     "solutions": json.dumps(["n = int(input())\nprint(sum(map(int, input().split())))"]),
     "difficulty": "EASY", "source": "codeforces", "url": "https://x/taco2", "name": "sum"},
]
_programs("add_lists(a, b)", "def add_lists(a, b):\n    return [x + y for x, y in zip(a, b)]",
          "def add_lists(a, b):\n    return [x - y for x, y in zip(a, b)]")
_programs("Print their sum.", "n = int(input())\nprint(sum(map(int, input().split())))", "print(6)")

DEEPCODER = [
    {"problem": "Read two integers and print their product.",
     "tests": json.dumps([{"type": "stdin_stdout", "input": "2 3\n", "output": "6\n"},
                          {"type": "stdin_stdout", "input": "-4 5\n", "output": "-20\n"}]),
     "solutions": ["a, b = map(int, input().split())\nprint(a * b)"]},
    {"problem": "Write a function square(n) returning n squared.",
     "tests": json.dumps([{"type": "function_call", "fn_name": "square", "input": [4],
                           "output": [16]},
                          {"type": "function_call", "fn_name": "square", "input": [-3],
                           "output": [9]}]),
     "solutions": ["def square(n):\n    return n * n"]},
    {"problem": "Given an integer array nums, return it sorted in non-decreasing order.",
     "tests": json.dumps([{"input": "[3, 1, 2]", "output": "[1, 2, 3]", "testtype": "functional"},
                          {"input": "[5, -5]", "output": "[-5, 5]", "testtype": "functional"}]),
     "metadata": {"func_name": "sortIt"},
     "solutions": ["class Solution:\n    def sortIt(self, nums):\n        return sorted(nums)"]},
    {"problem": "Write a function add(a, b) returning a + b.",
     "tests": json.dumps({"inputs": [[2, 3], [-1, 1]], "outputs": [[5], [0]], "fn_name": "add"}),
     "solutions": ["def add(a, b):\n    return a + b"]},
]
_programs("their product", "a, b = map(int, input().split())\nprint(a * b)", "print(6)")
_programs("square(n)", "def square(n):\n    return n * n", "def square(n):\n    return 2 * n")
_programs("non-decreasing", "class Solution:\n    def sortIt(self, nums):\n        return sorted(nums)",
          "class Solution:\n    def sortIt(self, nums):\n        return nums")
_programs("add(a, b) returning", "def add(a, b):\n    return a + b", "def add(a, b):\n    return a - b")

CODE_LAYOUTS = {"livecodebench": LIVECODEBENCH, "taco": TACO, "deepcoder": DEEPCODER}
