"""Prompt sets for RL and evaluation, their sampler, and the reward pool per domain.

A prompt row is `{"prompt": str | [messages], "answer": ...}` (math) or a prompt plus test
cases in a layout the code reward reads (code). Rows are validated up front: a malformed row is
an error naming the file and row (or skipped and counted with `data.skip_bad_rows`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from pathlib import Path
from typing import Any

from megatron_ace.data.chat import render_generation_prompt, system_prompt_text
from megatron_ace.data.packing import ResumableSampler
from megatron_ace.train.grpo_config import Domain, PromptDataConfig
from megatron_ace.train.reward_stream import RewardOutcome, score_all
from megatron_ace.utils.logging import get_logger

log = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class PromptItem:
    index: int
    """Row number in its file (0-based)."""
    prompt_ids: list[int]
    """Rendered ChatML prompt ending with `<|im_start|>assistant\\n`."""
    answer: str
    """Reference answer (math); "" for code."""
    row: dict[str, Any]
    """The original row (code tests live here)."""


def load_tokenizer(path: str) -> Any:
    from megatron_ace.data.tokenizer import load_tokenizer as load

    if not path:
        raise ValueError("data.tokenizer: no tokenizer given (and model.hf_path is empty)")
    return load(path)


def _read_rows(path: str) -> list[dict[str, Any]]:
    import datasets

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    kind = "parquet" if file.suffix == ".parquet" else "json"
    ds = datasets.load_dataset(kind, data_files=str(file), split="train")
    return [dict(r) for r in ds]


def load_prompts(path: str, cfg: PromptDataConfig, tokenizer: Any) -> list[PromptItem]:
    """Validated, tokenized prompts of one file."""
    system = system_prompt_text(cfg.system_prompt, cfg.domain.value)
    items, skipped = [], 0
    for i, row in enumerate(_read_rows(path)):
        try:
            items.append(_item(i, row, cfg, tokenizer, system))
        except ValueError as exc:
            if not cfg.skip_bad_rows:
                raise ValueError(f"{path}: row {i}: {exc}") from None
            skipped += 1
    if skipped:
        log.warning("%s: skipped %d malformed row(s)", path, skipped)
    if not items:
        raise ValueError(f"{path}: no usable prompts")
    log.info("%s: %d prompts", path, len(items))
    return items


def _item(i: int, row: dict, cfg: PromptDataConfig, tokenizer: Any, system: str | None
          ) -> PromptItem:
    prompt = row.get("prompt", row.get("problem", row.get("question")))
    if not isinstance(prompt, (str, list)) or not prompt:
        raise ValueError("missing or empty 'prompt'")
    answer = row.get("answer")
    if cfg.domain is Domain.MATH and (answer is None or str(answer).strip() == ""):
        raise ValueError("missing 'answer'")
    ids = render_generation_prompt(tokenizer, prompt, system=system if isinstance(prompt, str)
                                   else None)
    if len(ids) > cfg.max_prompt_tokens:
        raise ValueError(f"prompt has {len(ids)} tokens > data.max_prompt_tokens "
                         f"({cfg.max_prompt_tokens})")
    return PromptItem(index=i, prompt_ids=ids, answer="" if answer is None else str(answer),
                      row=row)


class PromptSampler(ResumableSampler):
    """Seeded prompt order over epochs (reshuffled each epoch), resumable from its state."""

    def __init__(self, num_items: int, *, seed: int) -> None:
        super().__init__(num_items, seed=seed, shuffle=True)


class MathRewards:
    """Math answers graded with math-verify in a pool of worker processes."""

    FAILED = ("timeout", "error")
    """Statuses that mean the grading failed (a hung or crashed worker), not a wrong answer."""

    def __init__(self, num_workers: int = 2, timeout_s: float = 10.0) -> None:
        from megatron_ace.rewards.math_reward import MathRewardPool

        self.pool = MathRewardPool(num_workers=num_workers, timeout_s=timeout_s)

    def submit(self, item: PromptItem, sample: Any) -> concurrent.futures.Future:
        return self.pool.submit(sample.response_text, item.answer)

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
        return self.pool.submit({**item.row, "response": sample.response_text})

    def outcome(self, result: Any) -> RewardOutcome:
        return RewardOutcome(result.reward, result.status.value in self.FAILED)

    def score_samples(self, items: list[PromptItem], samples: list[Any]) -> list[float]:
        return score_all(self, items, [[s] for s in samples])[0]

    def close(self) -> None:
        self.pool.close()


REWARDS = {Domain.MATH: MathRewards, Domain.CODE: CodeRewards}


def build_reward_pool(domain: Domain):
    return REWARDS[domain]()
