"""Prompt sets for RL, their sampler, and the reward pool per domain.

Prompt files are read in any format `data/tables.py` reads and any layout of `data/layouts.py`
for the run's domain: math `problem`/`answer` (nvidia/AceReason-Math, DeepScaleR's JSON array,
MATH-500, AIME sets; capitalised `Problem`/`Answer`; `question`/`answer`) or our own
`prompt`/`answer`; code LiveCodeBench, TACO/APPS, DeepCoder, HumanEval or our own `prompt` +
tests. Rows are validated up front, code tests included (parsed once here and kept with the
prompt): a malformed row is an error naming the file and row (or skipped and counted with
`data.on_bad_row=skip`), never a failure at the first reward step.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Any

from megatron_ace.data.chat import render_generation_prompt, system_prompt_text
from megatron_ace.data.layouts import CodeProblem, RecordKind, code_user_prompt, parse_record
from megatron_ace.data.packing import ResumableSampler
from megatron_ace.data.tables import (
    BadRowPolicy,
    RowError,
    expand_paths,
    iter_rows,
    open_table,
    row_error,
)
from megatron_ace.rewards.code_tests import CodeTests, parse_tests
from megatron_ace.train.grpo_config import Domain, PromptDataConfig
from megatron_ace.train.reward_stream import RewardOutcome, score_all
from megatron_ace.utils.logging import get_logger

log = get_logger(__name__)

_KIND = {Domain.MATH: RecordKind.MATH, Domain.CODE: RecordKind.CODE}


@dataclasses.dataclass(frozen=True)
class PromptItem:
    index: int
    """Row number in its file (from 1)."""
    prompt_ids: list[int]
    """Rendered ChatML prompt ending with `<|im_start|>assistant\\n`."""
    answer: str
    """Reference answer (math); "" for code."""
    tests: CodeTests | None = None
    """Parsed test cases (code)."""
    source: str = ""
    """The file the row came from."""


def load_tokenizer(path: str) -> Any:
    from megatron_ace.data.tokenizer import load_tokenizer as load

    if not path:
        raise ValueError("data.tokenizer: no tokenizer given (and model.hf_path is empty)")
    return load(path)


def load_prompts(path: str, cfg: PromptDataConfig, tokenizer: Any) -> list[PromptItem]:
    """Validated, tokenized prompts of a file or folder."""
    system = system_prompt_text(cfg.system_prompt, cfg.domain.value)
    items, skipped = [], 0
    for unit in expand_paths([path], what="prompt path"):
        table = open_table(unit)
        for number, row in iter_rows(table):
            if row is None:
                continue
            try:
                if isinstance(row, RowError):
                    raise row
                items.append(_item(number, row, cfg, tokenizer, system, table.source))
            except ValueError as exc:  # RowError is one
                message = row_error(table.source, number, str(exc))
                if cfg.on_bad_row is BadRowPolicy.ERROR:
                    raise ValueError(f"{message} (data.on_bad_row=skip skips such rows)") from None
                skipped += 1
                if skipped <= 5:
                    log.warning("skipped: %s", message)
    if skipped:
        log.warning("%s: skipped %d malformed row(s)", path, skipped)
    if not items:
        raise ValueError(f"{path}: no usable prompts")
    log.info("%s: %d prompts", path, len(items))
    return items


def _item(number: int, row: dict, cfg: PromptDataConfig, tokenizer: Any, system: str | None,
          source: str) -> PromptItem:
    record = parse_record(row, [_KIND[cfg.domain]], cfg.fields)
    if isinstance(record, CodeProblem):
        tests = parse_tests(record.test_fields)
        prompt, answer = code_user_prompt(record, tests.fn_name), ""
    else:
        tests, prompt, answer = None, record.problem, record.answer
    ids = render_generation_prompt(tokenizer, prompt,
                                   system=system if isinstance(prompt, str) else None)
    if len(ids) > cfg.max_prompt_tokens:
        raise ValueError(f"prompt has {len(ids)} tokens > data.max_prompt_tokens "
                         f"({cfg.max_prompt_tokens})")
    return PromptItem(index=number, prompt_ids=ids, answer=answer, tests=tests, source=source)


class PromptSampler(ResumableSampler):
    """Seeded prompt order over epochs (reshuffled each epoch), resumable from its state."""

    def __init__(self, num_items: int, *, seed: int) -> None:
        super().__init__(num_items, seed=seed, shuffle=True)


class MathRewards:
    """Math answers graded with math-verify in a pool of worker processes."""

    FAILED = ("timeout", "error")
    """Statuses that mean the grading failed (a hung or crashed worker), not a wrong answer."""

    def __init__(self, num_workers: int = 2, timeout_s: float = 10.0, nice: int = 10) -> None:
        from megatron_ace.rewards.math_reward import MathRewardPool

        # The workers score while the engine generates. Where they share cores with it (a CPU
        # run), at nice 10 they use the cycles the engine leaves idle instead of preempting its
        # threads mid-step (measured on 2 cores: +105-157 ms of generation per 256 rollouts at
        # nice 0, none at 10, for 30 ms more wait after the last rollout).
        self.pool = MathRewardPool(num_workers=num_workers, timeout_s=timeout_s, nice=nice)

    def submit(self, item: PromptItem, sample: Any) -> concurrent.futures.Future:
        return self.pool.submit(sample.response_text, item.answer)

    def submit_group(self, item: PromptItem, samples: list[Any]) -> list[concurrent.futures.Future]:
        """A prompt's samples in one worker round trip."""
        return self.pool.submit_many([s.response_text for s in samples], item.answer)

    def outcome(self, result: Any) -> RewardOutcome:
        return RewardOutcome(result.reward, result.status.value in self.FAILED)

    def score_samples(self, items: list[PromptItem], samples: list[Any]) -> list[float]:
        return score_all(self, items, [[s] for s in samples])[0]

    def close(self) -> None:
        self.pool.close()


class CodeRewards:
    """Programs run against the row's tests in the bubblewrap sandbox pool."""

    FAILED = ("sandbox_error",)
    """Statuses that mean the sandbox failed, not the program."""

    def __init__(self) -> None:
        from megatron_ace.rewards.code_reward import CodeRewardPool

        self.pool = CodeRewardPool()

    def submit(self, item: PromptItem, sample: Any) -> concurrent.futures.Future:
        from megatron_ace.rewards.code_reward import extract_program, task_for

        return self.pool.submit(task_for(item.tests, extract_program(sample.response_text)))

    def outcome(self, result: Any) -> RewardOutcome:
        return RewardOutcome(result.reward, result.status.value in self.FAILED)

    def score_samples(self, items: list[PromptItem], samples: list[Any]) -> list[float]:
        return score_all(self, items, [[s] for s in samples])[0]

    def close(self) -> None:
        self.pool.close()


REWARDS = {Domain.MATH: MathRewards, Domain.CODE: CodeRewards}


def build_reward_pool(domain: Domain):
    return REWARDS[domain]()
