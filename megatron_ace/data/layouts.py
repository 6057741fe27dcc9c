"""What a row means: the public dataset layouts every loader reads, in one registry.

What it does:
- `Layout` + `LAYOUTS`: each layout names the fields that identify it, the datasets published
  in it, and a parser from a row to a typed record of one `RecordKind`:
  - CONVERSATION (SFT: prompt messages + responses + domain): nvidia/AceReason-1.1-SFT
    (`category`, `source`, `input`, `output`; one row per response), OpenAI `messages` (string
    content or typed text parts), ShareGPT `conversations` (`from`/`value`), TRL
    `prompt`/`completion`, `problem`/`solution`, and our own `prompt` + `response(s)`;
  - MATH (problem + reference answer): `problem`/`answer` (AceReason-Math, DeepScaleR,
    MATH-500, AIME 2024/2025 sets), capitalised `Problem`/`Answer` (Maxwell-Jia/AIME_2024),
    `question`/`answer` (opencompass AIME2025), and our own `prompt`/`answer`;
  - CODE (problem + test fields): LiveCodeBench code_generation(_lite), TACO/APPS, DeepCoder,
    HumanEval, and our own `prompt` + tests. Test fields are handed on as stored; the code
    reward parses and checks them (`rewards/code_reward.py: parse_tests`).
- `detect` picks the first layout of the wanted kinds whose identifying fields are present;
  `parse_record` parses a row with it. A row no layout fits is an error listing the row's
  fields and every layout understood; a row that fits a layout but is malformed is an error
  naming the field.
- `FieldMap` (`data.fields.*`): for any other layout, names the columns that hold the prompt,
  response, answer, domain, tests...; a mapped row is read as our own layout of its kind.
  Example: rows `{"instruction": ..., "output": ...}` train with
  `data.fields.prompt=instruction data.fields.response=output`.
- `code_user_prompt`: the user message of a code problem. Like LiveCodeBench's own prompts, it
  carries the starter code and says how to answer (complete the given class/function, or read
  standard input and write standard output); the wording is ours.

What it does not do: read files (`tables.py`), tokenize (`sft_dataset.py`), run tests.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from megatron_ace.data.tables import RowError


class RecordKind(enum.Enum):
    CONVERSATION = "conversation"
    """SFT: a prompt (chat messages) and one or more responses."""
    MATH = "math"
    """A problem and its reference answer (RL prompts, math benchmarks)."""
    CODE = "code"
    """A problem and its test cases (RL prompts, code benchmarks)."""


class Layout(enum.Enum):
    ACEREASON_SFT = "acereason-sft"
    MESSAGES = "messages"
    SHAREGPT = "sharegpt"
    PROMPT_COMPLETION = "prompt-completion"
    PROMPT_RESPONSE = "prompt-response"
    PROBLEM_SOLUTION = "problem-solution"
    PROBLEM_ANSWER = "problem-answer"
    PROBLEM_ANSWER_CAPITALISED = "Problem-Answer"
    QUESTION_ANSWER = "question-answer"
    PROMPT_ANSWER = "prompt-answer"
    LIVECODEBENCH = "livecodebench"
    TACO_APPS = "taco-apps"
    DEEPCODER = "deepcoder"
    HUMANEVAL = "humaneval"
    PROMPT_TESTS = "prompt-tests"


@dataclasses.dataclass(kw_only=True)
class FieldMap:
    """Columns of a layout not listed in `Layout`, mapped onto our own layout of each kind."""

    prompt: str = ""
    """Column holding the prompt: the user message, or a list of chat messages."""
    response: str = ""
    """Column holding the response (a string) or the responses (a list of strings), for SFT."""
    answer: str = ""
    """Column holding the reference answer (math)."""
    domain: str = ""
    """Column holding 'math' or 'code' per row (for the 'auto' system prompt)."""
    tests: str = ""
    """Column holding the test cases (code), in any form the code reward reads."""
    starter_code: str = ""
    """Column holding the starter code that a code answer must complete."""
    id: str = ""
    """Column holding a problem id (evaluation records)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if not isinstance(getattr(self, f.name), str):
                raise ValueError(f"fields.{f.name} must be a column name (a string)")

    def is_set(self) -> bool:
        return any(getattr(self, f.name) for f in dataclasses.fields(self))

    def apply(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """`row` with the mapped columns copied to our own field names."""
        out = dict(row)
        for f in dataclasses.fields(self):
            column = getattr(self, f.name)
            if not column:
                continue
            if row.get(column) is None:
                raise RowError(f"{column} (data.fields.{f.name}): missing")
            name = f.name
            if f.name == "response":
                out.pop("response", None)
                out.pop("responses", None)
                name = "responses" if isinstance(row[column], list) else "response"
            out[name] = row[column]
        return out


# ---- records ---------------------------------------------------------------------------------
Messages = list[dict[str, str]]


@dataclasses.dataclass(frozen=True)
class Conversation:
    layout: Layout
    prompt: Messages
    """Chat messages ending with a user turn (a system turn first if the row has one)."""
    responses: list[str]
    domain: str | None = None
    """'math' / 'code' when the row says so (`category`, `domain`)."""

    def prompt_key(self) -> str:
        """Identifies the prompt across rows (rows of one prompt share it)."""
        text = json.dumps(self.prompt, sort_keys=True, ensure_ascii=False)
        return hashlib.sha1(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class MathProblem:
    layout: Layout
    problem: str | Messages
    answer: str
    id: str = ""


@dataclasses.dataclass(frozen=True)
class CodeProblem:
    layout: Layout
    question: str | Messages
    test_fields: dict[str, Any]
    """The row's test fields as stored (parsed by `code_reward.parse_tests`)."""
    starter_code: str = ""
    id: str = ""
    contest_date: str = ""
    """Release date (LiveCodeBench), ISO format as stored."""
    golden: str = ""
    """A reference program from the row (`solutions`, `solution`, `canonical_solution`)."""


Record = Conversation | MathProblem | CodeProblem


# ---- field helpers ---------------------------------------------------------------------------
def _text(row: Mapping[str, Any], field: str) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise RowError(f"{field}: must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError(f"{field}: is empty")
    return value


def _optional_text(row: Mapping[str, Any], field: str) -> str:
    value = row.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(f"{field}: must be a string, got {type(value).__name__}")
    return value


def _content(value: Any, where: str) -> str:
    """Message content: a string, or OpenAI-style typed parts of which only text is allowed."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, list):
        pieces = []
        for j, part in enumerate(value):
            if not isinstance(part, Mapping) or part.get("type") != "text" or \
                    not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise RowError(f"{where}[{j}]: only text parts ({{type: text, text}}) are "
                               f"supported, got {kind!r}")
            pieces.append(part["text"])
        text = "".join(pieces)  # parts of one message are concatenated, as chat templates do
    else:
        raise RowError(f"{where}: must be a string or a list of text parts, got "
                       f"{type(value).__name__}")
    if not text.strip():
        raise RowError(f"{where}: is empty")
    return text


_ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant"}


def _messages(value: Any, field: str, *, role_key: str = "role", content_key: str = "content",
              roles: Mapping[str, str] | None = None) -> Messages:
    roles = roles or {r: r for r in _ROLES}
    if not isinstance(value, list) or not value:
        raise RowError(f"{field}: must be a non-empty list of messages")
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, Mapping) or m.get(role_key) not in roles:
            raise RowError(f"{field}[{k}].{role_key}: must be one of {', '.join(roles)}, got "
                           f"{m.get(role_key) if isinstance(m, Mapping) else m!r}")
        out.append({"role": roles[m[role_key]],
                    "content": _content(m.get(content_key), f"{field}[{k}].{content_key}")})
    return out


def _prompt_messages(value: Any, field: str) -> Messages:
    """A prompt given as a string (one user turn) or as messages ending with a user turn."""
    if isinstance(value, str):
        return [{"role": "user", "content": _content(value, field)}]
    messages = _messages(value, field)
    if messages[-1]["role"] != "user":
        raise RowError(f"{field}: the last message must be a user turn")
    return messages


def _split_response(messages: Messages, field: str) -> tuple[Messages, list[str]]:
    """(prompt, [final assistant content]) of a conversation that ends with the response."""
    if messages[-1]["role"] != "assistant":
        raise RowError(f"{field}: the last message must be the assistant's response")
    prompt = messages[:-1]
    if not prompt or prompt[-1]["role"] != "user":
        raise RowError(f"{field}: the response must follow a user turn")
    return prompt, [messages[-1]["content"]]


def _responses(row: Mapping[str, Any]) -> list[str]:
    if row.get("response") is not None and row.get("responses") is not None:
        raise RowError("response/responses: has both; use one")
    if row.get("responses") is not None:
        if not isinstance(row["responses"], list) or not row["responses"]:
            raise RowError("responses: must be a non-empty list of strings")
        return [_content(r, f"responses[{k}]") for k, r in enumerate(row["responses"])]
    return [_text(row, "response")]


def _domain(row: Mapping[str, Any], field: str = "domain") -> str | None:
    value = row.get(field)
    return value if isinstance(value, str) else None


def _answer(row: Mapping[str, Any], field: str) -> str:
    value = row.get(field)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowError(f"{field}: must be a string or a number, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise RowError(f"{field}: is empty")
    return text


def _id(row: Mapping[str, Any], *fields: str) -> str:
    for f in fields:
        if row.get(f) is not None and str(row[f]).strip():
            return str(row[f])
    return ""


# ---- parsers, one per layout -----------------------------------------------------------------
def _acereason_sft(row: Mapping[str, Any]) -> Conversation:
    return Conversation(Layout.ACEREASON_SFT, _prompt_messages(row["input"], "input"),
                        [_text(row, "output")], _domain(row, "category") or _domain(row))


def _openai_messages(row: Mapping[str, Any]) -> Conversation:
    messages = _messages(row["messages"], "messages")
    if row.get("response") is None and row.get("responses") is None:
        prompt, responses = _split_response(messages, "messages")
    else:
        prompt, responses = messages, _responses(row)
        if prompt[-1]["role"] != "user":
            raise RowError("messages: must end with a user turn (the response is separate)")
    return Conversation(Layout.MESSAGES, prompt, responses, _domain(row))


def _sharegpt(row: Mapping[str, Any]) -> Conversation:
    messages = _messages(row["conversations"], "conversations", role_key="from",
                         content_key="value", roles=_SHAREGPT_ROLES)
    prompt, responses = _split_response(messages, "conversations")
    return Conversation(Layout.SHAREGPT, prompt, responses, _domain(row))


def _prompt_completion(row: Mapping[str, Any]) -> Conversation:
    prompt = _prompt_messages(row["prompt"], "prompt")
    completion = row["completion"]
    if isinstance(completion, list):
        turns = _messages(completion, "completion")
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise RowError("completion: must be one assistant message")
        completion = turns[0]["content"]
    return Conversation(Layout.PROMPT_COMPLETION, prompt, [_content(completion, "completion")],
                        _domain(row))


def _prompt_response(row: Mapping[str, Any]) -> Conversation:
    return Conversation(Layout.PROMPT_RESPONSE, _prompt_messages(row["prompt"], "prompt"),
                        _responses(row), _domain(row))


def _problem_solution(row: Mapping[str, Any]) -> Conversation:
    return Conversation(Layout.PROBLEM_SOLUTION, _prompt_messages(_text(row, "problem"), "problem"),
                        [_text(row, "solution")], _domain(row))


def _math(layout: Layout, problem: str, answer: str, ids: tuple[str, ...]
          ) -> Callable[[Mapping[str, Any]], MathProblem]:
    def parse(row: Mapping[str, Any]) -> MathProblem:
        text: str | Messages = (_prompt_messages(row[problem], problem)
                                if layout is Layout.PROMPT_ANSWER and not isinstance(row[problem], str)
                                else _text(row, problem))
        return MathProblem(layout, text, _answer(row, answer), _id(row, *ids))
    return parse


_TEST_FIELDS = ("public_test_cases", "private_test_cases", "metadata", "input_output", "tests",
                "fn_name", "test", "entry_point")


def _golden(row: Mapping[str, Any]) -> str:
    """First reference program of the row, fenced as a response would be ("" if none)."""
    value = next((row[f] for f in ("solutions", "solution", "canonical_solution")
                  if row.get(f) is not None), None)
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if isinstance(value, list):
        value = next((v for v in value if isinstance(v, str) and v.strip()), None)
    if not isinstance(value, str) or not value.strip():
        return ""
    return value if "```" in value else f"```python\n{value}\n```"


def _code(layout: Layout, question: str) -> Callable[[Mapping[str, Any]], CodeProblem]:
    def parse(row: Mapping[str, Any]) -> CodeProblem:
        if layout is Layout.PROMPT_TESTS and not isinstance(row[question], str):
            text: str | Messages = _prompt_messages(row[question], question)
        else:
            text = _text(row, question)
        golden = _golden(row)
        if layout is Layout.HUMANEVAL and golden:
            golden = f"```python\n{row['prompt']}{row['canonical_solution']}```"
        return CodeProblem(
            layout, text, {k: row[k] for k in _TEST_FIELDS if row.get(k) is not None},
            starter_code=_optional_text(row, "starter_code"),
            id=_id(row, "question_id", "task_id", "id", "problem_id"),
            contest_date=str(row.get("contest_date") or ""), golden=golden)
    return parse


@dataclasses.dataclass(frozen=True)
class LayoutSpec:
    layout: Layout
    kind: RecordKind
    keys: tuple[str | tuple[str, ...], ...]
    """Fields that identify the layout, all present (a tuple inside: any one of its fields)."""
    shipped_as: str
    """Published datasets in this layout."""
    parse: Callable[[Mapping[str, Any]], Record]

    def matches(self, row: Mapping[str, Any]) -> bool:
        def present(key: str | tuple[str, ...]) -> bool:
            names = (key,) if isinstance(key, str) else key
            return any(row.get(n) is not None for n in names)
        return all(present(k) for k in self.keys)

    def describe(self) -> str:
        keys = ", ".join(k if isinstance(k, str) else "|".join(k) for k in self.keys)
        return f"{self.layout.value} [{keys}] ({self.shipped_as})"


_C, _M, _X = RecordKind.CONVERSATION, RecordKind.MATH, RecordKind.CODE
_TESTS_ANY = ("tests", "input_output", "public_test_cases", "private_test_cases")
LAYOUTS: dict[Layout, LayoutSpec] = {s.layout: s for s in (
    LayoutSpec(Layout.ACEREASON_SFT, _C, ("input", "output"),
               "nvidia/AceReason-1.1-SFT: category, source, input, output", _acereason_sft),
    LayoutSpec(Layout.MESSAGES, _C, ("messages",), "OpenAI chat messages", _openai_messages),
    LayoutSpec(Layout.SHAREGPT, _C, ("conversations",), "ShareGPT from/value", _sharegpt),
    LayoutSpec(Layout.PROMPT_COMPLETION, _C, ("prompt", "completion"), "TRL prompt/completion",
               _prompt_completion),
    LayoutSpec(Layout.PROMPT_RESPONSE, _C, ("prompt", ("response", "responses")),
               "our own", _prompt_response),
    LayoutSpec(Layout.PROBLEM_SOLUTION, _C, ("problem", "solution"),
               "problem/solution sets", _problem_solution),
    LayoutSpec(Layout.PROBLEM_ANSWER, _M, ("problem", "answer"),
               "AceReason-Math, DeepScaleR, MATH-500, HuggingFaceH4/aime_2024, "
               "AI-MO/aimo-validation-aime, math-ai/aime25, yentinglin/aime_2025",
               _math(Layout.PROBLEM_ANSWER, "problem", "answer", ("id", "unique_id"))),
    LayoutSpec(Layout.PROBLEM_ANSWER_CAPITALISED, _M, ("Problem", "Answer"),
               "Maxwell-Jia/AIME_2024",
               _math(Layout.PROBLEM_ANSWER_CAPITALISED, "Problem", "Answer", ("ID", "id"))),
    LayoutSpec(Layout.QUESTION_ANSWER, _M, ("question", "answer"), "opencompass AIME2025",
               _math(Layout.QUESTION_ANSWER, "question", "answer", ("id",))),
    LayoutSpec(Layout.PROMPT_ANSWER, _M, ("prompt", "answer"), "our own",
               _math(Layout.PROMPT_ANSWER, "prompt", "answer", ("id",))),
    LayoutSpec(Layout.LIVECODEBENCH, _X, ("question_content",),
               "LiveCodeBench code_generation(_lite)", _code(Layout.LIVECODEBENCH,
                                                            "question_content")),
    LayoutSpec(Layout.TACO_APPS, _X, ("question", "input_output"), "TACO, APPS",
               _code(Layout.TACO_APPS, "question")),
    LayoutSpec(Layout.DEEPCODER, _X, ("problem", "tests"), "DeepCoder",
               _code(Layout.DEEPCODER, "problem")),
    LayoutSpec(Layout.HUMANEVAL, _X, ("prompt", "test", "entry_point"), "HumanEval",
               _code(Layout.HUMANEVAL, "prompt")),
    LayoutSpec(Layout.PROMPT_TESTS, _X, ("prompt", _TESTS_ANY), "our own",
               _code(Layout.PROMPT_TESTS, "prompt")),
)}
NATIVE: dict[RecordKind, Layout] = {_C: Layout.PROMPT_RESPONSE, _M: Layout.PROMPT_ANSWER,
                                    _X: Layout.PROMPT_TESTS}
"""Our own layout of each kind; rows mapped with `FieldMap` are read as this."""


def understood(kinds: Sequence[RecordKind]) -> str:
    """The layouts of `kinds`, for error messages."""
    return "; ".join(s.describe() for k in kinds for s in LAYOUTS.values() if s.kind is k)


def detect(row: Mapping[str, Any], kinds: Sequence[RecordKind], *, mapped: bool = False
           ) -> LayoutSpec:
    """The first layout of `kinds` (in order) that `row` fits; RowError listing them if none."""
    for kind in kinds:
        candidates = [LAYOUTS[NATIVE[kind]]] if mapped else \
            [s for s in LAYOUTS.values() if s.kind is kind]
        for spec in candidates:
            if spec.matches(row):
                return spec
    present = ", ".join(sorted(k for k, v in row.items() if v is not None)) or "none"
    hint = " (data.fields maps onto our own layouts)" if mapped else ""
    raise RowError(f"no known layout fits this row (its fields: {present}){hint}; "
                   f"understood layouts: {understood(kinds)}")


def parse_record(row: Any, kinds: Sequence[RecordKind], fields: FieldMap | None = None
                 ) -> Record:
    """The record of `row` in the first layout of `kinds` it fits; RowError if malformed."""
    if not isinstance(row, Mapping):
        raise RowError(f"expected an object, got {type(row).__name__}")
    mapped = fields is not None and fields.is_set()
    if mapped:
        row = fields.apply(row)
    return detect(row, kinds, mapped=mapped).parse(row)


def prompt_text(prompt: str | Messages) -> str:
    """The text of a prompt (every message's content, one per line)."""
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def record_texts(record: Record) -> tuple[str, list[str]]:
    """(prompt text, response texts) of a record, as decontamination compares them."""
    if isinstance(record, Conversation):
        return prompt_text(record.prompt), list(record.responses)
    if isinstance(record, MathProblem):
        return prompt_text(record.problem), []
    return prompt_text(record.question), []


# ---- code prompts ----------------------------------------------------------------------------
_ANSWER_FORMAT = "Put the complete solution in a single ```python code block."


def code_user_prompt(problem: CodeProblem, fn_name: str | None) -> str | Messages:
    """The user message of a code problem: the statement plus how to answer.

    With starter code (LeetCode-style), the answer completes it and keeps its names, because
    the tests call that class/method; a call-based problem without starter code names the
    function the tests call; otherwise the program reads standard input and writes standard
    output. Our own layout's prompt is used as written.
    """
    if problem.layout is Layout.PROMPT_TESTS or not isinstance(problem.question, str):
        return problem.question
    if problem.layout is Layout.HUMANEVAL:
        return ("Complete the following Python function. " + _ANSWER_FORMAT +
                f"\n\n```python\n{problem.question}```")
    if problem.starter_code.strip():
        how = ("Write your solution by completing the starter code below: keep its class, "
               "function names and signatures, since the tests call them. " + _ANSWER_FORMAT +
               f"\n\n```python\n{problem.starter_code.rstrip()}\n```")
    elif fn_name:
        how = (f"Write a Python function named `{fn_name}`; the tests call it with the "
               "arguments directly (no standard input). " + _ANSWER_FORMAT)
    else:
        how = ("Write a Python program that reads the input from standard input and writes the "
               "answer to standard output (do not just print the sample outputs). " +
               _ANSWER_FORMAT)
    return f"{problem.question.rstrip()}\n\n{how}"
