"""A generated multi-step arithmetic task for the from-scratch demo (SFT then GRPO on a CPU).

A problem is an integer expression such as `7+5*3-2`; the prompt is `Compute 7+5*3-2.` and the
reference response reduces the expression one operation at a time, `*` before `+`/`-`, left to
right, writing the whole reduced expression on each line, then the answer in `\\boxed{}`:

    =7+15-2
    =22-2
    =20
    \\boxed{20}

Writing the full expression after each step keeps all state in the text, which is what lets a
model of a few hundred thousand parameters learn the task in minutes.

With `slip_fraction` > 0 a share of the SFT responses carries one arithmetic slip through to a
wrong boxed answer, like distilled teacher data that is not always right. The SFT model then
slips at about that rate when sampling, which a rule-based reward can see and GRPO can remove:
this is what gives the demo a measurable RL gain in minutes.

Everything is deterministic from the config: the same config gives the same rows, in the same
order, on every machine. Whether an expression is held out depends only on its text (a SHA-256
of it against `heldout_fraction`), never on the seed or on how many rows are asked for, so the
train and held-out splits can never share an expression, and the held-out split of two runs
with different seeds draws from the same pool.

This module makes rows and writes JSONL; it does not tokenize, apply a chat template or grade.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

PROMPT_PREFIX = "Compute "
PROMPT_SUFFIX = "."
_OPERATORS = ("+", "-", "*")
# Generation gives up after this many draws per requested row: the pool is then too small.
_MAX_DRAWS_PER_ROW = 50


class Split(enum.Enum):
    """Which side of the train / held-out split a problem belongs to."""

    TRAIN = "train"
    HELDOUT = "heldout"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArithTaskConfig:
    """Difficulty and size of the generated arithmetic task."""

    seed: int = 0
    """Seed for drawing problems; a split's rows depend on (seed, split) only."""
    min_operands: int = 3
    """Fewest numbers in an expression (at least 2)."""
    max_operands: int = 3
    """Most numbers in an expression; the count is drawn uniformly in [min, max]."""
    min_operand: int = 0
    """Smallest operand value (non-negative)."""
    max_operand: int = 9
    """Largest operand value."""
    operators: tuple[str, ...] = _OPERATORS
    """Operators to draw from, a subset of `+`, `-`, `*`."""
    heldout_fraction: float = 0.1
    """Share of all possible expressions reserved for the held-out split, by hash of the text."""
    slip_fraction: float = 0.0
    """Share of SFT responses given one arithmetic slip (a step result off by 1 or 2, carried
    through to a wrong boxed answer), like imperfect teacher data; prompt rows are unaffected."""

    def __post_init__(self) -> None:
        if self.min_operands < 2:
            raise ValueError(f"min_operands must be >= 2, got {self.min_operands}")
        if self.max_operands < self.min_operands:
            raise ValueError(
                f"max_operands ({self.max_operands}) must be >= min_operands ({self.min_operands})"
            )
        if self.min_operand < 0:
            raise ValueError(f"min_operand must be >= 0, got {self.min_operand}")
        if self.max_operand < self.min_operand:
            raise ValueError(
                f"max_operand ({self.max_operand}) must be >= min_operand ({self.min_operand})"
            )
        if not self.operators or any(op not in _OPERATORS for op in self.operators):
            raise ValueError(
                f"operators must be a non-empty subset of {_OPERATORS}, got {self.operators}"
            )
        if len(set(self.operators)) != len(self.operators):
            raise ValueError(f"operators must not repeat, got {self.operators}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if not 0.0 <= self.slip_fraction < 1.0:
            raise ValueError(f"slip_fraction must be in [0, 1), got {self.slip_fraction}")

    def num_possible_expressions(self) -> int:
        """How many distinct expressions the config can produce (both splits together)."""
        num_values = self.max_operand - self.min_operand + 1
        num_ops = len(self.operators)
        counts = range(self.min_operands, self.max_operands + 1)
        return sum(num_values**n * num_ops ** (n - 1) for n in counts)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArithProblem:
    """One expression with its worked solution."""

    expression: str
    """The expression as shown in the prompt, e.g. `7+5*3-2`."""
    values: tuple[int, ...]
    """The N operands, left to right."""
    ops: tuple[str, ...]
    """The N-1 operators between them."""
    steps: tuple[str, ...]
    """The reduced expression after each operation; the last one is the answer."""
    answer: int
    """The exact integer value of the expression."""

    @property
    def prompt(self) -> str:
        return f"{PROMPT_PREFIX}{self.expression}{PROMPT_SUFFIX}"

    @property
    def response(self) -> str:
        return _format_response(self.steps, self.answer)


def _format_response(steps: Sequence[str], answer: int) -> str:
    lines = [f"={step}" for step in steps]
    lines.append(f"\\boxed{{{answer}}}")
    return "\n".join(lines)


def _render(values_N: Sequence[int], ops: Sequence[str]) -> str:
    """Interleave N values and N-1 operators into text; negative values keep their sign."""
    parts = [str(values_N[0])]
    for op, value in zip(ops, values_N[1:]):
        parts.append(f"{op}{value}")
    return "".join(parts)


def _pick_step(ops: Sequence[str]) -> int:
    """Index of the next operation: the first `*`, else the first operator."""
    return ops.index("*") if "*" in ops else 0


def solve(
    values_N: Sequence[int], ops: Sequence[str], *, slip_step: int = -1, slip_delta: int = 0
) -> tuple[tuple[str, ...], int]:
    """Reduce `values_N` joined by `ops` one operation at a time; return (steps, value).

    With `slip_step` >= 0 the result of that step is off by `slip_delta` and later steps carry
    the error on, as a careless solver would.
    """
    if len(ops) != len(values_N) - 1:
        raise ValueError(f"need len(ops) == len(values) - 1, got {len(ops)} and {len(values_N)}")
    vals, rest = list(values_N), list(ops)
    steps: list[str] = []
    while rest:
        i = _pick_step(rest)
        a, b, op = vals[i], vals[i + 1], rest[i]
        result = a * b if op == "*" else a + b if op == "+" else a - b
        if len(steps) == slip_step:
            result += slip_delta
        vals[i : i + 2] = [result]
        del rest[i]
        steps.append(_render(vals, rest))
    return tuple(steps), vals[0]


def split_of(expression: str, heldout_fraction: float) -> Split:
    """The split an expression belongs to: a function of its text alone."""
    digest = hashlib.sha256(expression.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return Split.HELDOUT if u < heldout_fraction else Split.TRAIN


def _draw(rng: random.Random, cfg: ArithTaskConfig) -> tuple[list[int], list[str]]:
    n = rng.randint(cfg.min_operands, cfg.max_operands)
    values = [rng.randint(cfg.min_operand, cfg.max_operand) for _ in range(n)]
    ops = [rng.choice(cfg.operators) for _ in range(n - 1)]
    return values, ops


def generate_problems(cfg: ArithTaskConfig, split: Split, num_problems: int) -> list[ArithProblem]:
    """`num_problems` distinct problems of `split`, deterministic in (cfg, split).

    Asking for fewer rows gives a prefix of the longer list. Raises ValueError when the split
    cannot hold that many distinct expressions.
    """
    if num_problems < 0:
        raise ValueError(f"num_problems must be >= 0, got {num_problems}")
    expected_pool = cfg.num_possible_expressions() * (
        cfg.heldout_fraction if split is Split.HELDOUT else 1.0 - cfg.heldout_fraction
    )
    if num_problems > expected_pool:
        raise ValueError(
            f"num_problems={num_problems} exceeds the ~{int(expected_pool)} distinct {split.value} "
            "expressions this config allows; widen max_operand / max_operands"
        )
    # A string seed is hashed by `random` with SHA-512: stable across runs and platforms.
    rng = random.Random(f"arith:{cfg.seed}:{split.value}")
    seen: set[str] = set()
    problems: list[ArithProblem] = []
    for _ in range(max(1, num_problems) * _MAX_DRAWS_PER_ROW):
        if len(problems) == num_problems:
            break
        values, ops = _draw(rng, cfg)
        expression = _render(values, ops)
        if expression in seen or split_of(expression, cfg.heldout_fraction) is not split:
            continue
        seen.add(expression)
        steps, answer = solve(values, ops)
        problems.append(
            ArithProblem(
                expression=expression, values=tuple(values), ops=tuple(ops), steps=steps, answer=answer
            )
        )
    if len(problems) < num_problems:
        raise ValueError(
            f"found only {len(problems)} distinct {split.value} expressions of {num_problems} "
            "requested; widen max_operand / max_operands"
        )
    return problems


def prompt_rows(problems: Iterable[ArithProblem]) -> list[dict[str, str]]:
    """Rows for GRPO and evaluation: `{"prompt", "answer"}` (the answer as text)."""
    return [{"prompt": p.prompt, "answer": str(p.answer)} for p in problems]


def slipped_response(problem: ArithProblem, seed: int) -> str:
    """A worked solution with one slip, chosen deterministically from (expression, seed)."""
    rng = random.Random(f"slip:{seed}:{problem.expression}")
    candidates = [(i, d) for i in range(len(problem.ops)) for d in (-2, -1, 1, 2)]
    rng.shuffle(candidates)
    for slip_step, slip_delta in candidates:
        steps, value = solve(problem.values, problem.ops, slip_step=slip_step, slip_delta=slip_delta)
        # An early slip can vanish (e.g. multiplied by 0); only a wrong answer teaches anything.
        if value != problem.answer:
            return _format_response(steps, value)
    raise AssertionError("a slip in the last step always changes the answer")


def sft_rows(
    problems: Iterable[ArithProblem], *, slip_fraction: float = 0.0, seed: int = 0
) -> list[dict[str, str]]:
    """Rows for SFT: `{"prompt", "response"}`, the response ending in `\\boxed{answer}`.

    A share `slip_fraction` of rows (chosen by hash of (seed, expression), so the same problem
    is always treated alike) gets a response with one arithmetic slip and a wrong answer.
    """
    if not 0.0 <= slip_fraction < 1.0:
        raise ValueError(f"slip_fraction must be in [0, 1), got {slip_fraction}")
    rows = []
    for p in problems:
        slipped = random.Random(f"slip?:{seed}:{p.expression}").random() < slip_fraction
        response = slipped_response(p, seed) if slipped else p.response
        rows.append({"prompt": p.prompt, "response": response})
    return rows


def write_jsonl(rows: Iterable[dict[str, str]], path: str | Path) -> Path:
    """Write one JSON object per line (parent folders created); return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def write_task_files(
    cfg: ArithTaskConfig, out_dir: str | Path, *, num_sft: int, num_rl: int, num_heldout: int
) -> dict[str, Path]:
    """Write `sft.jsonl`, `rl_prompts.jsonl` (train split) and `heldout.jsonl` to `out_dir`.

    SFT and RL prompts are drawn from the train split; RL prompts are the first `num_rl` of the
    same list the SFT rows come from, so GRPO trains on prompts the SFT model has seen, and the
    held-out rows test generalisation on expressions neither phase saw.
    """
    train = generate_problems(cfg, Split.TRAIN, max(num_sft, num_rl))
    heldout = generate_problems(cfg, Split.HELDOUT, num_heldout)
    out = Path(out_dir)
    return {
        "sft": write_jsonl(
            sft_rows(train[:num_sft], slip_fraction=cfg.slip_fraction, seed=cfg.seed), out / "sft.jsonl"
        ),
        "rl": write_jsonl(prompt_rows(train[:num_rl]), out / "rl_prompts.jsonl"),
        "heldout": write_jsonl(prompt_rows(heldout), out / "heldout.jsonl"),
    }
