"""Stage-wise GRPO curricula: stage configs, stop rules, and the recipes built from one base.

A curriculum is a base `GRPOConfig` (model, optimizer, seeds, evaluation, checkpointing) plus a
list of `StageConfig`s. Each stage changes only the few fields the AceReason recipe varies
between stages (domain and prompt file, response budget, group size, prompts per step,
overlong filtering, clip values, temperature policy, how long it runs); `stage_grpo_config`
derives the GRPOConfig of one stage from the base. Recipes are plain functions.

Sources. "Paper" marks facts stated in AceReason-Nemotron 1.1 (arXiv 2506.13284); "second-hand"
marks values taken from reviews of the paper or from reference configs of other frameworks for
the same base model; "ours" marks choices of this code (e.g. step counts of the tiny run).

What it does not do: run anything (see `curriculum.py`), or check data files exist.
"""

from __future__ import annotations

import dataclasses
import enum

from megatron_ace.algorithms.grpo import PolicyLossConfig
from megatron_ace.algorithms.temperature import TemperatureConfig, TemperaturePolicyKind
from megatron_ace.train.grpo_config import (
    Domain,
    GRPOConfig,
    acereason_math_8k,
    grpo_tiny,
)


class OptimizerCarry(enum.Enum):
    """What happens to the AdamW moments when a stage starts."""

    KEEP = "keep"
    RESET = "reset"


@dataclasses.dataclass(kw_only=True)
class StopRule:
    """How long a stage runs: `max_steps`, or earlier once `plateau_metric` stops improving."""

    max_steps: int
    """Hard cap on the stage's steps (also its length when no plateau metric is set)."""
    plateau_metric: str = ""
    """Metric key of the step record to watch (e.g. "reward/mean"); "" = run max_steps."""
    patience: int = 0
    """Stop after this many consecutive steps without an improvement of the smoothed metric."""
    min_delta: float = 0.0
    """An improvement must exceed the best smoothed value so far by more than this."""
    window: int = 1
    """Moving-average window (steps) applied to the metric before comparing."""
    min_steps: int = 1
    """Never stop on a plateau before this many steps (a stage always runs at least one)."""

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"stop.max_steps must be >= 1, got {self.max_steps}")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"stop.min_steps must be in [1, max_steps={self.max_steps}], "
                             f"got {self.min_steps}")
        if self.window < 1 or self.patience < 0 or self.min_delta < 0:
            raise ValueError("stop.window must be >= 1, stop.patience and stop.min_delta >= 0")
        if self.plateau_metric and self.patience < 1:
            raise ValueError("stop.patience must be >= 1 when stop.plateau_metric is set")

    def describe(self) -> str:
        if not self.plateau_metric:
            return f"{self.max_steps} steps"
        return (f"plateau({self.plateau_metric}, patience {self.patience}, "
                f"min_delta {self.min_delta:g}) <= {self.max_steps} steps")


def run_steps(steps: int) -> StopRule:
    """Run exactly `steps` steps."""
    return StopRule(max_steps=steps)


def until_plateau(metric: str, patience: int, min_delta: float, *, max_steps: int,
                  window: int = 1, min_steps: int = 1) -> StopRule:
    """Run until the moving average of `metric` has not improved by `min_delta` for
    `patience` steps (at most `max_steps`)."""
    return StopRule(max_steps=max_steps, plateau_metric=metric, patience=patience,
                    min_delta=min_delta, window=window, min_steps=min_steps)


@dataclasses.dataclass(kw_only=True)
class StageConfig:
    name: str
    """Short unique name, used in logs and metrics (`stage_name`)."""
    domain: Domain
    """Reward for this stage's prompts (math verifier or code sandbox)."""
    train_path: str = ""
    """Prompt file of the stage ("" = the base config's data.train_path)."""
    max_response_tokens: int
    """Response budget; longer responses are TRUNCATED."""
    group_size: int
    """Rollouts per prompt."""
    prompts_per_step: int
    """Prompts per RL step."""
    overlong_filter: bool
    """Mask truncated responses out of the loss."""
    clip_low: float = 0.2
    """Lower clip of the importance ratio."""
    clip_high: float = 0.28
    """Upper clip of the importance ratio (0.28 = clip-higher)."""
    temperature: TemperatureConfig
    """Rollout temperature policy of the stage (fixed, or steered to a target entropy)."""
    carry_temperature: bool = True
    """With an entropy-target policy, start from the previous stage's last temperature."""
    stop: StopRule
    """How long the stage runs."""
    optimizer: OptimizerCarry = OptimizerCarry.KEEP
    """Keep the AdamW moments of the previous stage, or start them from zero."""
    drop_solved_prompts: bool = False
    """After each epoch over the prompts, drop those whose rollouts were all correct."""
    solved_min_accuracy: float = 1.0
    """A prompt counts as solved when its group's mean reward reaches this (1.0 = all correct)."""

    def __post_init__(self) -> None:
        self.domain = Domain(self.domain)
        self.optimizer = OptimizerCarry(self.optimizer)
        if not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"stage.name must be non-empty without spaces, got {self.name!r}")
        for field in ("max_response_tokens", "group_size", "prompts_per_step"):
            if getattr(self, field) < 1:
                raise ValueError(f"stage {self.name}: {field} must be >= 1, got {getattr(self, field)}")
        if not 0.0 < self.solved_min_accuracy <= 1.0:
            raise ValueError(f"stage {self.name}: solved_min_accuracy must be in (0, 1], "
                             f"got {self.solved_min_accuracy}")
        PolicyLossConfig(clip_low=self.clip_low, clip_high=self.clip_high)  # validates both


@dataclasses.dataclass(kw_only=True)
class CurriculumConfig:
    base: GRPOConfig
    """Everything the stages share: model, optimizer, seeds, evaluation, checkpoints."""
    stages: list[StageConfig]
    """Stages in order; each starts from the previous stage's final weights."""
    eval_after_each_stage: bool = True
    """Evaluate on base.data.heldout_path when a stage ends (logged with its last step)."""

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("stages: a curriculum needs at least one stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stages: names must be unique, got {names}")
        if self.base.checkpoint.keep_last < 2:
            # The previous checkpoint is the fallback when the newest one is unreadable.
            raise ValueError("base.checkpoint.keep_last must be >= 2 for a curriculum")

    @property
    def max_total_steps(self) -> int:
        return sum(s.stop.max_steps for s in self.stages)


def stage_grpo_config(base: GRPOConfig, stage: StageConfig) -> GRPOConfig:
    """The GRPOConfig one stage trains with: the base plus the stage's fields."""
    data = dataclasses.replace(base.data, domain=stage.domain,
                               train_path=stage.train_path or base.data.train_path)
    rollout = dataclasses.replace(base.rollout, max_response_tokens=stage.max_response_tokens,
                                  group_size=stage.group_size,
                                  prompts_per_step=stage.prompts_per_step,
                                  temperature=stage.temperature)
    loss = dataclasses.replace(base.grpo.loss, clip_low=stage.clip_low, clip_high=stage.clip_high)
    grpo = dataclasses.replace(base.grpo, loss=loss, overlong_filter=stage.overlong_filter)
    return dataclasses.replace(base, data=data, rollout=rollout, grpo=grpo,
                               steps=stage.stop.max_steps)


# ---- the AceReason-Nemotron 1.1 recipe (Qwen2.5-Math-7B after SFT) ----------------------------
def _entropy_target(target: float = 0.3, initial: float = 0.6) -> TemperatureConfig:
    # Paper: temperature chosen so that temperature-adjusted entropy stays near 0.3. The
    # closed-loop controller automates that choice (ours); the paper sets it per stage by hand.
    return TemperatureConfig(policy=TemperaturePolicyKind.ENTROPY_TARGET,
                             initial_temperature=initial, target_entropy=target)


def _stage(name: str, domain: Domain, length_k: int, *, group: int, steps: int,
           path: str, temperature: TemperatureConfig | None = None) -> StageConfig:
    return StageConfig(
        name=name, domain=domain, train_path=path, max_response_tokens=length_k * 1024,
        group_size=group,
        prompts_per_step=128,  # paper
        # Paper: overlong filtering helps at 8K/16K and hurts from 24K on, so it is off there.
        overlong_filter=length_k <= 16,
        clip_low=0.2, clip_high=0.28,  # second-hand (reference configs; clip-higher)
        temperature=temperature or _entropy_target(),
        stop=run_steps(steps),  # second-hand / ours: the paper reports curves, not exact counts
        # Paper: code RL drops prompts whose rollouts were all correct, after each epoch.
        drop_solved_prompts=domain is Domain.CODE)


MATH_PROMPTS = "{out}/data/math_prompts.jsonl"
CODE_PROMPTS = "{out}/data/code_prompts.jsonl"


def acereason_stages(math: str = MATH_PROMPTS, code: str = CODE_PROMPTS) -> list[StageConfig]:
    """Math 8K -> 16K -> 24K -> 32K, code 24K -> 32K, math 32K (paper: the stage order and
    lengths). Group size 8 at 8K and 16 later (second-hand: "8 or 16 rollouts")."""
    return [
        _stage("math-8k", Domain.MATH, 8, group=8, steps=400, path=math),
        _stage("math-16k", Domain.MATH, 16, group=16, steps=400, path=math),
        _stage("math-24k", Domain.MATH, 24, group=16, steps=300, path=math),
        _stage("math-32k", Domain.MATH, 32, group=16, steps=200, path=math),
        _stage("code-24k", Domain.CODE, 24, group=8, steps=300, path=code),
        _stage("code-32k", Domain.CODE, 32, group=8, steps=200, path=code),
        # Ours: the final stage runs until the math reward stops improving (capped).
        dataclasses.replace(_stage("math-32k-final", Domain.MATH, 32, group=16, steps=200, path=math),
                            stop=until_plateau("reward/mean", patience=20, min_delta=0.002,
                                               max_steps=200, window=10, min_steps=40)),
    ]


def _acereason_base() -> GRPOConfig:
    base = acereason_math_8k()
    # Paper: Qwen2.5-Math-7B with rope_theta 1e6; second-hand: max positions raised to 32K.
    base.model = dataclasses.replace(base.model, max_position_embeddings=32768 + 2048)
    base.checkpoint = dataclasses.replace(base.checkpoint, save_interval=10, keep_last=3)
    return base


def acereason_7b() -> CurriculumConfig:
    return CurriculumConfig(base=_acereason_base(), stages=acereason_stages())


def acereason_7b_skip_stage1() -> CurriculumConfig:
    """Ablation (paper): start at 16K, skipping the 8K stage."""
    cfg = acereason_7b()
    cfg.stages = cfg.stages[1:]
    return cfg


def acereason_7b_overlong_32k() -> CurriculumConfig:
    """Ablation (paper): keep overlong filtering on in the 24K/32K stages too."""
    cfg = acereason_7b()
    cfg.stages = [dataclasses.replace(s, overlong_filter=True) for s in cfg.stages]
    return cfg


def acereason_7b_entropy(target: float) -> CurriculumConfig:
    """Ablation (paper: temperature sweep): every stage steers to `target` entropy."""
    cfg = acereason_7b()
    cfg.stages = [dataclasses.replace(s, temperature=_entropy_target(target)) for s in cfg.stages]
    return cfg


# ---- the tiny curriculum of the same shape (CPU, minutes) ------------------------------------
def tiny_curriculum() -> CurriculumConfig:
    """math short -> math longer -> code-style stage -> final math, on the arithmetic task.

    Ours, all of it: the shape of the AceReason curriculum at CPU size. The "code" stage keeps
    the code-stage behaviour (no overlong filter, all-correct prompts dropped after each
    epoch, reset optimizer moments) on the arithmetic prompts with the math reward, since the
    tiny policy never writes programs; `stage.code.domain=code` with a code prompt file runs
    the real sandboxed code reward instead. Needs `model.hf_path`, `data.tokenizer`,
    `data.train_path` (and `data.heldout_path`) like `grpo-tiny`.
    """
    base = grpo_tiny()
    base.eval = dataclasses.replace(base.eval, max_problems=16, at_start=False)
    base.checkpoint = dataclasses.replace(base.checkpoint, save_interval=2, keep_last=2)
    base.rollout = dataclasses.replace(base.rollout, prompts_per_step=8)
    fixed = TemperatureConfig(policy=TemperaturePolicyKind.FIXED, initial_temperature=1.0)
    steer = TemperatureConfig(policy=TemperaturePolicyKind.ENTROPY_TARGET, initial_temperature=1.0,
                              target_entropy=0.3, min_temperature=0.1, max_temperature=1.5)
    common = {"domain": Domain.MATH, "prompts_per_step": 8, "clip_low": 0.2, "clip_high": 0.28}
    return CurriculumConfig(base=base, stages=[
        StageConfig(name="math-short", max_response_tokens=32, group_size=4, overlong_filter=True,
                    temperature=fixed, stop=run_steps(3), **common),
        StageConfig(name="math-long", max_response_tokens=64, group_size=4, overlong_filter=True,
                    temperature=steer, stop=run_steps(3), **common),
        StageConfig(name="code", max_response_tokens=64, group_size=4, overlong_filter=False,
                    temperature=steer, stop=run_steps(3), optimizer=OptimizerCarry.RESET,
                    drop_solved_prompts=True, **common),
        StageConfig(name="math-final", max_response_tokens=96, group_size=4,
                    overlong_filter=False, temperature=steer,
                    stop=until_plateau("reward/mean", patience=2, min_delta=0.0, max_steps=4,
                                       min_steps=2), **common),
    ])


CURRICULA = {
    "acereason-7b": (acereason_7b, "AceReason 1.1: math 8K/16K/24K/32K, code 24K/32K, math 32K"),
    "acereason-7b-skip-8k": (acereason_7b_skip_stage1, "ablation: start at 16K (no 8K stage)"),
    "acereason-7b-overlong-on": (acereason_7b_overlong_32k,
                                 "ablation: overlong filtering kept on at 24K/32K"),
    "acereason-7b-entropy-0.2": (lambda: acereason_7b_entropy(0.2), "ablation: entropy target 0.2"),
    "acereason-7b-entropy-0.3": (lambda: acereason_7b_entropy(0.3), "ablation: entropy target 0.3"),
    "acereason-7b-entropy-0.4": (lambda: acereason_7b_entropy(0.4), "ablation: entropy target 0.4"),
    "tiny-curriculum": (tiny_curriculum, "4 tiny stages on the arithmetic task (CPU, minutes)"),
}


def curriculum_recipe(name: str) -> CurriculumConfig:
    if name not in CURRICULA:
        raise ValueError(f"unknown curriculum recipe {name!r}; known: {', '.join(sorted(CURRICULA))}")
    return CURRICULA[name][0]()


def stage_table(cfg: CurriculumConfig) -> str:
    """One line per stage: the fields that change between stages."""
    head = (f"{'#':>2} {'stage':<15}{'domain':<7}{'max_len':>8}{'n':>4}{'prompts':>8}"
            f"{'overlong':>9}{'clip':>11}  {'temperature':<24}{'optimizer':<10}{'drop':<5} run")
    rows = [head, "-" * len(head)]
    for i, s in enumerate(cfg.stages):
        t = s.temperature
        temp = (f"fixed {t.initial_temperature:g}" if t.policy is TemperaturePolicyKind.FIXED
                else f"entropy->{t.target_entropy:g} (T0 {t.initial_temperature:g})")
        rows.append(f"{i:>2} {s.name:<15}{s.domain.value:<7}{s.max_response_tokens:>8}"
                    f"{s.group_size:>4}{s.prompts_per_step:>8}"
                    f"{'on' if s.overlong_filter else 'off':>9}"
                    f"{f'{s.clip_low:g}/{s.clip_high:g}':>11}  {temp:<24}{s.optimizer.value:<10}"
                    f"{'yes' if s.drop_solved_prompts else 'no':<5} {s.stop.describe()}")
    return "\n".join(rows)
