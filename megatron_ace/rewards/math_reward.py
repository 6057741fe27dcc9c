"""Rule-based math reward: extract a response's final answer and check it with math-verify.

What it does: `extract_answer` finds the final answer in a model response by an explicit,
ordered policy of answer sources (last `\\boxed{}`/`\\fbox{}`, then "final answer is X", then an
"Answer: X" line, then the last number); `score_math` checks it against the reference answer with
math-verify 0.9.0 (`parse` + `verify`) and returns a `MathResult` (reward 1.0 or 0.0, an Enum
status, the extracted answer). The verdict depends only on the reference, the extracted answer
and the config, so it is cached per process (as is each reference's parse): the samples of a
prompt share a reference and often reach the same answer. Timeouts are never cached. `MathRewardPool` runs `score_math` in worker processes with a
hard per-item timeout (see `pool.py`), and `cli_main` is `ace reward math`.

What it does not do: it does not judge reasoning, only the final answer; it does not import
torch; and `score_math` must run in a main thread when math-verify's own (signal.alarm-based)
timeouts are on: call it through `MathRewardPool` from trainers and other threaded code.

If a response contains `</think>`, only the text after the last `</think>` is searched, so an
answer guessed inside the reasoning does not count (R1-style responses).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import enum
import functools
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from megatron_ace.rewards.pool import RewardPool
from megatron_ace.utils import console
from megatron_ace.utils.logging import get_logger

_log = get_logger(__name__)


class AnswerSource(enum.Enum):
    """Where in a response a final answer can come from (one step of the extraction policy)."""

    BOXED = "boxed"  # the last complete \boxed{...} or \fbox{...}
    FINAL_ANSWER = "final_answer"  # "... the final answer is X"
    ANSWER_LINE = "answer_line"  # a line "Answer: X" (or "**Answer:** X")
    LAST_NUMBER = "last_number"  # the last number in the text


class MathStatus(enum.Enum):
    CORRECT = "correct"
    WRONG = "wrong"
    NO_ANSWER = "no_answer"  # no policy step found an answer
    TIMEOUT = "timeout"  # math-verify's own timeout fired, or the pool killed the worker
    ERROR = "error"  # the reference could not be parsed, or scoring crashed


@dataclass(frozen=True)
class Extraction:
    answer: str
    """The answer text, without the \\boxed{} wrapper or surrounding $...$."""
    source: AnswerSource
    """The policy step that found it."""


@dataclass(frozen=True)
class MathResult:
    reward: float
    """1.0 if the answer matches the reference, else 0.0."""
    status: MathStatus
    """Why the reward is what it is."""
    extracted: str | None = None
    """The extracted final answer (None when there is none)."""
    source: AnswerSource | None = None
    """The policy step that found the answer."""
    detail: str = ""
    """A short reason for TIMEOUT / ERROR."""

    def to_dict(self) -> dict:
        return {
            "reward": self.reward,
            "status": self.status.value,
            "extracted": self.extracted,
            "source": None if self.source is None else self.source.value,
            "detail": self.detail,
        }


# ------------------------------------------------------------------------------- extraction
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_FINAL_ANSWER_RE = re.compile(r"final\s+answer\s*(?:is|:)\s*:?\s*(.+)", re.IGNORECASE)
_ANSWER_LINE_RE = re.compile(r"^[\s#>*_]*(?:final\s+)?answer[\s*_]*[:：][\s*_]*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)
# A minus sign counts only when it is not a binary minus ("3-2" gives 2, not -2).
_NUMBER_RE = re.compile(r"(?:(?<![\w)\]}])-)?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")


def _balanced_group(text: str, open_at: int) -> str | None:
    """Content of the {...} group opening at `text[open_at]`, or None if it never closes.

    A backslash escapes the next character, so `\\{` and `\\}` (literal set braces) do not count.
    """
    depth, i = 0, open_at
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
        i += 1
    return None


def find_last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` / `\\fbox{...}` (nested braces allowed).

    `\\boxed 5` (argument without braces) gives "5". An unclosed last box (a truncated response)
    is skipped in favour of the previous complete one. Empty boxes are ignored.
    """
    for match in reversed(list(_BOXED_RE.finditer(text))):
        rest = match.end()
        while rest < len(text) and text[rest] == " ":
            rest += 1
        if rest < len(text) and text[rest] == "{":
            content = _balanced_group(text, rest)
        elif rest > match.end():
            token = re.match(r"[^\s$]+", text[rest:])
            content = token.group(0) if token else None
        else:
            content = None
        if content is not None and content.strip():
            return content.strip()
    return None


def _clean_inline(answer: str) -> str:
    """Strip math delimiters, markdown emphasis and a trailing full stop around an answer."""
    answer = answer.strip().strip("*_").strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(left):
            end = answer.find(right, len(left))
            if end > 0:
                return answer[len(left) : end].strip()
    # Undelimited: the answer ends with its sentence ("42. I hope it is correct.").
    answer = re.split(r"\.(?:\s|$)", answer, maxsplit=1)[0]
    # "The answer is 42." ends a sentence; the full stop is not part of the answer.
    answer = answer.strip().rstrip(".,; ")
    return answer.strip()


def _from_boxed(text: str) -> str | None:
    return find_last_boxed(text)


def _from_final_answer(text: str) -> str | None:
    matches = list(_FINAL_ANSWER_RE.finditer(text))
    if not matches:
        return None
    line = matches[-1].group(1)
    boxed = find_last_boxed(line)
    return boxed if boxed is not None else (_clean_inline(line) or None)


def _from_answer_line(text: str) -> str | None:
    matches = list(_ANSWER_LINE_RE.finditer(text))
    if not matches:
        return None
    line = matches[-1].group(1)
    boxed = find_last_boxed(line)
    return boxed if boxed is not None else (_clean_inline(line) or None)


def _from_last_number(text: str) -> str | None:
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


EXTRACTORS: dict[AnswerSource, Callable[[str], str | None]] = {
    AnswerSource.BOXED: _from_boxed,
    AnswerSource.FINAL_ANSWER: _from_final_answer,
    AnswerSource.ANSWER_LINE: _from_answer_line,
    AnswerSource.LAST_NUMBER: _from_last_number,
}

# Policies: answer sources tried in order; the first that finds an answer wins.
FULL_POLICY: tuple[AnswerSource, ...] = (
    AnswerSource.BOXED,
    AnswerSource.FINAL_ANSWER,
    AnswerSource.ANSWER_LINE,
    AnswerSource.LAST_NUMBER,
)
BOXED_ONLY_POLICY: tuple[AnswerSource, ...] = (AnswerSource.BOXED,)


def final_section(response: str) -> str:
    """The part of a response after the last `</think>` (the whole response if none)."""
    _, sep, tail = response.rpartition("</think>")
    return tail if sep else response


def extract_answer(
    response: str, policy: tuple[AnswerSource, ...] = FULL_POLICY, *, after_think: bool = True
) -> Extraction | None:
    """The final answer of `response` by the first source in `policy` that finds one."""
    text = final_section(response) if after_think else response
    for source in policy:
        answer = EXTRACTORS[source](text)
        if answer:
            return Extraction(answer=answer, source=source)
    return None


# ------------------------------------------------------------------------------- scoring
@dataclass(frozen=True, kw_only=True)
class MathRewardConfig:
    policy: tuple[AnswerSource, ...] = FULL_POLICY
    """Answer sources tried in order (see AnswerSource); the first that finds an answer wins."""
    after_think: bool = True
    """Search only the text after the last `</think>` when the response has one."""
    verify_timeout_s: int = 3
    """math-verify's own timeout (signal.alarm, whole seconds) for each parse and comparison."""
    float_rounding: int = 6
    """math-verify: decimal places numbers are rounded to before comparing."""
    numeric_precision: int = 15
    """math-verify: significant digits used when evaluating expressions numerically."""

    def __post_init__(self) -> None:
        if not self.policy:
            raise ValueError("policy: needs at least one AnswerSource")
        object.__setattr__(self, "policy", tuple(AnswerSource(s) for s in self.policy))
        if len(set(self.policy)) != len(self.policy):
            raise ValueError(f"policy: repeated answer source in {self.policy}")
        if int(self.verify_timeout_s) != self.verify_timeout_s or self.verify_timeout_s < 0:
            raise ValueError(f"verify_timeout_s: whole seconds >= 0 (0 = off), got {self.verify_timeout_s!r}")
        if self.float_rounding < 0:
            raise ValueError(f"float_rounding: must be >= 0, got {self.float_rounding}")
        if self.numeric_precision < 1:
            raise ValueError(f"numeric_precision: must be >= 1, got {self.numeric_precision}")


def _reference_text(reference: str) -> str:
    """A reference answer as bare LaTeX (drops a \\boxed{} wrapper or $...$ delimiters)."""
    boxed = find_last_boxed(reference)
    return boxed if boxed is not None else _clean_inline(reference)


class _NotCached(Exception):
    """Carries a verdict that must not be cached (a timeout: a later try may finish)."""

    def __init__(self, verdict: tuple[float, MathStatus, str]) -> None:
        super().__init__(verdict[2])
        self.verdict = verdict


@functools.lru_cache(maxsize=4096)
def _parse_reference(gold_text: str, timeout: int | None) -> list:
    """math-verify's parse of a reference answer (its `_reference_text`); raises on a timeout or
    a parse error (neither is cached). References repeat within a step (one per prompt,
    `group_size` samples each)."""
    from math_verify import parse

    return parse("\\boxed{" + gold_text + "}", parsing_timeout=timeout, raise_on_error=True)


# An integer written the one canonical way (no sign on zero, no leading zeros, no separators).
_CANONICAL_INT_RE = re.compile(r"0|-?[1-9][0-9]*")


@functools.lru_cache(maxsize=1 << 16)
def _verdict(reference: str, answer: str, config: MathRewardConfig) -> tuple[float, MathStatus, str]:
    """(reward, status, detail) of an extracted answer against a reference. A pure function of
    its arguments, so verdicts are cached per worker: samples of one prompt often reach the same
    final answer. Timeouts raise `_NotCached` and are never cached.

    When the reference and the answer are both canonical integers, equal strings are equal
    numbers and different strings different ones: the verdict is math-verify's (it compares
    integers exactly, at any length), without its LaTeX parse (~1.3 ms an answer)."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    gold_text = _reference_text(reference)
    if _CANONICAL_INT_RE.fullmatch(gold_text) and _CANONICAL_INT_RE.fullmatch(answer):
        return (1.0, MathStatus.CORRECT, "") if gold_text == answer else (0.0, MathStatus.WRONG, "")
    timeout = config.verify_timeout_s or None
    try:
        gold = _parse_reference(gold_text, timeout)
    except TimeoutException:
        raise _NotCached((0.0, MathStatus.TIMEOUT, "reference parse timeout")) from None
    except Exception as exc:  # noqa: BLE001
        return 0.0, MathStatus.ERROR, f"reference: {exc}"[:500]
    if not gold:
        return 0.0, MathStatus.ERROR, "reference not parseable"
    try:
        pred = parse("\\boxed{" + answer + "}", parsing_timeout=timeout, raise_on_error=True)
    except TimeoutException:
        raise _NotCached((0.0, MathStatus.TIMEOUT, "math-verify parse timeout")) from None
    except Exception:  # noqa: BLE001 - math-verify's default: an unparseable answer parses to []
        pred = []
    timed_out = False
    # Pair by pair, exactly like verify(gold, pred) does internally, so that a timeout can be
    # told apart from a wrong answer (verify folds both into False).
    for g in gold:
        for p in pred:
            try:
                ok = verify(
                    g, p, float_rounding=config.float_rounding, numeric_precision=config.numeric_precision,
                    timeout_seconds=timeout, raise_on_error=True,
                )
            except TimeoutException:
                timed_out = True
                continue
            except Exception:  # noqa: BLE001 - math-verify's default: a failed comparison is False
                continue
            if ok:
                return 1.0, MathStatus.CORRECT, ""
    if timed_out:
        raise _NotCached((0.0, MathStatus.TIMEOUT, "math-verify timeout"))
    return 0.0, MathStatus.WRONG, ""


def score_math(response: str, reference: str, config: MathRewardConfig = MathRewardConfig()) -> MathResult:
    """Grade `response` against `reference` with math-verify (call from a main thread)."""
    extraction = extract_answer(response, config.policy, after_think=config.after_think)
    if extraction is None:
        return MathResult(reward=0.0, status=MathStatus.NO_ANSWER)
    try:
        reward, status, detail = _verdict(str(reference), extraction.answer, config)
    except _NotCached as exc:
        reward, status, detail = exc.verdict
    return MathResult(reward=reward, status=status, detail=detail, extracted=extraction.answer,
                      source=extraction.source)


def _score_pair(pair: tuple[str, str], *, config: MathRewardConfig) -> MathResult:
    return score_math(pair[0], pair[1], config)


def warm_up() -> None:
    """Load math-verify's parsers and sympy with one small verification (a worker's first call
    otherwise pays seconds of lazy imports inside its first item's timeout)."""
    score_math("\\boxed{\\frac{1}{2}}", "0.5")


def _timeout_result(pair: tuple[str, str], *, config: MathRewardConfig) -> MathResult:
    extraction = extract_answer(pair[0], config.policy, after_think=config.after_think)
    return MathResult(
        reward=0.0, status=MathStatus.TIMEOUT, detail="killed after the pool timeout",
        extracted=extraction.answer if extraction else None, source=extraction.source if extraction else None,
    )


def _error_result(pair: tuple[str, str], message: str) -> MathResult:
    return MathResult(reward=0.0, status=MathStatus.ERROR, detail=message.splitlines()[0][:500])


class MathRewardPool:
    """`score_math` in worker processes, each item killed after `timeout_s` (TIMEOUT result).

    `score(responses, references)` -> results in order; `submit(response, reference)` -> a
    Future of MathResult, to overlap scoring with generation. Use as a context manager.
    """

    def __init__(
        self, config: MathRewardConfig = MathRewardConfig(), *, num_workers: int = 2, timeout_s: float = 10.0,
        nice: int = 0,
    ) -> None:
        self.config = config
        self._pool: RewardPool[tuple[str, str], MathResult] = RewardPool(
            functools.partial(_score_pair, config=config), num_workers, timeout_s,
            on_timeout=functools.partial(_timeout_result, config=config), on_error=_error_result,
            initializer=warm_up, nice=nice,
        )

    @property
    def pool(self) -> RewardPool:
        return self._pool

    def submit(self, response: str, reference: str) -> concurrent.futures.Future:
        return self._pool.submit((response, str(reference)))

    def submit_many(self, responses: list[str], reference: str) -> list[concurrent.futures.Future]:
        """Responses to one problem, scored in one worker round trip (see RewardPool.submit_many)."""
        return self._pool.submit_many([(r, str(reference)) for r in responses])

    def score(self, responses: list[str], references: list[str]) -> list[MathResult]:
        if len(responses) != len(references):
            raise ValueError(f"references: {len(references)} given for {len(responses)} responses")
        return self._pool.map(list(zip(responses, map(str, references))))

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> MathRewardPool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._pool.__exit__(exc_type, exc, tb)


# ------------------------------------------------------------------------------- CLI
_CLI_DESCRIPTION = """\
Score a JSONL file of math responses with math-verify.

Each input row is a JSON object with a response and a reference answer (fields `response` and
`answer` by default). Each output row is the input row plus `reward` (1.0 or 0.0), `status`
(correct, wrong, no_answer, timeout, error), `extracted` (the final answer found) and
`answer_source`. Rows are written in input order. A malformed row stops the run with an error
naming the file and row, unless --skip-malformed is given (then it is skipped and counted).
A summary (row counts per status, accuracy) is printed as one JSON line at the end.

example:
  ace reward math --input rollouts.jsonl --output scored.jsonl --workers 8 --timeout 10
"""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ace reward math", description=_CLI_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, type=Path, help="JSONL file of rows to score")
    parser.add_argument("--output", required=True, type=Path, help="JSONL file to write (replaced)")
    parser.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                        help="worker processes (default: CPU count, at most 8)")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="hard wall-clock limit per row in seconds; the worker is killed and the row "
                             "scored 0 with status timeout (default: 10)")
    parser.add_argument("--verify-timeout", type=int, default=3,
                        help="math-verify's own timeout per parse/comparison, whole seconds (default: 3)")
    parser.add_argument("--policy", default=",".join(s.value for s in FULL_POLICY),
                        help="answer sources tried in order, comma-separated, from: "
                             + ", ".join(s.value for s in AnswerSource) + " (default: all, in that order)")
    parser.add_argument("--response-field", default="response", help="field holding the response")
    parser.add_argument("--answer-field", default="answer", help="field holding the reference answer")
    parser.add_argument("--skip-malformed", action="store_true",
                        help="skip and count malformed rows instead of stopping at the first one")
    return parser


def _read_rows(path: Path, response_field: str, answer_field: str, skip_malformed: bool) -> tuple[list[dict], int]:
    """Rows of a JSONL file, checked; raises ValueError naming file and row unless skipping."""
    rows, skipped = [], 0
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            problem = None
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problem = f"not valid JSON ({exc.msg})"
            else:
                if not isinstance(row, dict):
                    problem = f"expected a JSON object, got {type(row).__name__}"
                elif not isinstance(row.get(response_field), str):
                    problem = f"field {response_field!r} missing or not a string"
                elif not isinstance(row.get(answer_field), (str, int, float)) or isinstance(row.get(answer_field), bool):
                    problem = f"field {answer_field!r} missing or not a string/number"
            if problem is None:
                rows.append(row)
            elif skip_malformed:
                skipped += 1
                _log.warning("%s:%d: skipped: %s", path, line_no, problem)
            else:
                raise ValueError(f"{path}:{line_no}: {problem} (use --skip-malformed to skip such rows)")
    return rows, skipped


def cli_main(argv: list[str]) -> int:
    """`ace reward math --input F.jsonl --output O.jsonl [--workers N] [--timeout S] ...`."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        policy = tuple(AnswerSource(s.strip()) for s in args.policy.split(",") if s.strip())
        config = MathRewardConfig(policy=policy, verify_timeout_s=args.verify_timeout)
        if args.workers < 1:
            raise ValueError(f"--workers: must be >= 1, got {args.workers}")
        if not args.timeout > 0:
            raise ValueError(f"--timeout: must be > 0, got {args.timeout}")
        rows, skipped = _read_rows(args.input, args.response_field, args.answer_field, args.skip_malformed)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    counts: collections.Counter[str] = collections.Counter()
    start = last_log = time.monotonic()
    tmp = args.output.with_name(args.output.name + ".tmp")
    try:
        with MathRewardPool(config, num_workers=args.workers, timeout_s=args.timeout) as pool:
            futures = [pool.submit(row[args.response_field], str(row[args.answer_field])) for row in rows]
            with open(tmp, "w", encoding="utf-8") as out:
                for done, (row, future) in enumerate(zip(rows, futures), start=1):
                    result: MathResult = future.result()
                    counts[result.status.value] += 1
                    record = dict(row, reward=result.reward, status=result.status.value,
                                  extracted=result.extracted,
                                  answer_source=None if result.source is None else result.source.value)
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    if time.monotonic() - last_log > 5.0 or done == len(rows):
                        last_log = time.monotonic()
                        _log.info("scored %d/%d rows (%.1f rows/s)", done, len(rows), done / max(last_log - start, 1e-9))
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written output left behind
        raise
    os.replace(tmp, args.output)
    total = sum(counts.values())
    summary = {"rows": total, "skipped_malformed": skipped, "accuracy": counts["correct"] / total if total else 0.0,
               **{s.value: counts[s.value] for s in MathStatus}}
    _log.info("wrote %s: %s", args.output, json.dumps(summary))
    console.result(json.dumps(summary))
    return 0
