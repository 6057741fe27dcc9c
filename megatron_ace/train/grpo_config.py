"""GRPO configuration: a tree of small keyword-only dataclasses, and the recipes built on it.

Recipes are functions deriving from `base_grpo_config()`; command-line overrides
(`grpo.loss.clip_high=0.28`) apply on top and are saved with the run (`<out>/config.json`).
Facts from the AceReason-Nemotron 1.1 paper (arXiv 2506.13284) and its reviews are marked;
the second-hand ones say so.
"""

from __future__ import annotations

import dataclasses
import enum

from megatron_ace.algorithms.grpo import AdvantageEstimator, PolicyLossConfig
from megatron_ace.algorithms.temperature import TemperatureConfig, TemperaturePolicyKind
from megatron_ace.data.chat import SystemPrompt
from megatron_ace.data.layouts import FieldMap
from megatron_ace.data.packing import BatchMode
from megatron_ace.data.tables import BadRowPolicy
from megatron_ace.model.parallel import ParallelConfig
from megatron_ace.rollout.weight_sync import TransportChoice
from megatron_ace.train.config import (CheckpointConfig, LoggingConfig, LRDecay, ModelSection,
                                       OptimConfig, Precision)

OUT = "{out}"


class Domain(enum.Enum):
    """Which reward scores a prompt set."""

    MATH = "math"
    CODE = "code"


@dataclasses.dataclass(kw_only=True)
class PromptDataConfig:
    train_path: str
    """Prompt file or folder (.jsonl, JSON array, parquet, `datasets` Arrow) in a published
    layout: math `problem`/`answer` (AceReason-Math, DeepScaleR, MATH-500...), code
    LiveCodeBench / TACO / APPS / DeepCoder, or our own `prompt` + `answer` / tests."""
    heldout_path: str = ""
    """Held-out prompts for the evaluation hook ("" = none)."""
    tokenizer: str = ""
    """HF tokenizer directory, or "qwen2.5" for the bundled Qwen2.5 vocabulary."""
    domain: Domain = Domain.MATH
    """Reward used for these prompts."""
    system_prompt: SystemPrompt = SystemPrompt.NONE
    """System message added to every prompt."""
    max_prompt_tokens: int = 1024
    """Prompts longer than this are an error naming the row (or skipped, see on_bad_row)."""
    on_bad_row: BadRowPolicy = BadRowPolicy.ERROR
    """ERROR: a malformed row (no answer, no usable tests...) stops loading, naming file and
    row; SKIP: it is skipped and counted."""
    fields: FieldMap = dataclasses.field(default_factory=FieldMap)
    """Column mapping for other layouts (`data.fields.prompt=statement`)."""

    def __post_init__(self) -> None:
        if not self.train_path:
            raise ValueError("data.train_path is required")
        if self.max_prompt_tokens < 1:
            raise ValueError(f"data.max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")


@dataclasses.dataclass(kw_only=True)
class RolloutConfig:
    group_size: int = 8
    """Rollouts per prompt (AceReason: 8 or 16)."""
    prompts_per_step: int = 128
    """Prompts per RL step (AceReason: 128)."""
    max_response_tokens: int = 8192
    """Length budget of a response; longer ones are TRUNCATED (AceReason stage 1: 8K)."""
    top_p: float = 1.0
    """Nucleus sampling for rollouts."""
    temperature: TemperatureConfig = dataclasses.field(default_factory=lambda: TemperatureConfig(
        policy=TemperaturePolicyKind.ENTROPY_TARGET, initial_temperature=0.6, target_entropy=0.3))
    """Sampling temperature policy (AceReason: keep temperature-adjusted entropy near 0.3)."""
    seed: int = 1234
    """Base seed; each request's seed derives from it, the step and the prompt."""
    kv_cache_gib: int = 1
    """KV-cache memory of the CPU engine (VLLM_CPU_KVCACHE_SPACE)."""
    gpu_memory_utilization: float = 0.5
    """Share of GPU memory the engine may take (GPU only)."""
    bucket_mb: int = 256
    """Weight-sync bucket size."""
    weight_sync_transport: TransportChoice = TransportChoice.AUTO
    """How weights reach the engine: auto (shared memory on CPU, CUDA IPC on GPU), bytes,
    shared_memory or cuda_ipc. nccl needs an engine on GPUs of its own, which `ace grpo`
    does not start."""
    check_parity: bool = True
    """Compare trainer and engine logprobs of the sampled tokens every step (a metric)."""

    def __post_init__(self) -> None:
        for name in ("group_size", "prompts_per_step", "max_response_tokens", "bucket_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.weight_sync_transport, TransportChoice):
            raise TypeError(f"rollout.weight_sync_transport must be a TransportChoice, got "
                            f"{self.weight_sync_transport!r}")
        if self.weight_sync_transport is TransportChoice.NCCL:
            raise ValueError("rollout.weight_sync_transport: 'nccl' needs an engine on GPUs of "
                             "its own; `ace grpo` runs the engine on the trainer's rank 0 (use "
                             "'auto' or 'cuda_ipc')")


class FilteredEntropy(enum.Enum):
    """How `grpo.measure_filtered_rollouts` measures the rollouts that are not trained on."""

    FORWARD = "forward"
    """A forward-only pass of the trainer over them: their exact temperature-adjusted entropy,
    and the trainer-vs-engine mismatch metrics cover them too."""
    SAMPLED = "sampled"
    """No forward: the mean of -log p of their sampled tokens, from the engine's logprobs. The
    tokens were drawn from the very distribution the entropy is of (softmax(logits / T), with
    rollout.top_p = 1 and the engine's processed logprobs), so E[-log p(token)] is exactly
    that entropy: an unbiased estimate, noisier per token than the forward's and free. The
    mismatch metrics then cover the trained rollouts only."""


@dataclasses.dataclass(kw_only=True)
class AlgoConfig:
    loss: PolicyLossConfig = dataclasses.field(default_factory=PolicyLossConfig)
    """Clipped surrogate: clip_low / clip_high (0.28 = clip-higher), kl_coef (0: no KL)."""
    advantage: AdvantageEstimator = AdvantageEstimator.GRPO
    """Group-normalised advantages, with or without std normalisation."""
    overlong_filter: bool = True
    """Mask truncated responses out of the loss (AceReason: on at 8K/16K, off at 24K/32K)."""
    drop_zero_variance_groups: bool = True
    """Skip groups whose rollouts all got the same reward (they carry no gradient)."""
    num_updates: int = 1
    """Policy updates (mini-batches) per rollout batch; 1 = strictly on-policy (AceReason)."""
    fuse_old_logprobs: bool = True
    """With num_updates == 1, the update's own forward supplies the old logprobs (ratio exactly
    1), the entropy and the mismatch metrics: no separate logprob pass."""
    measure_filtered_rollouts: bool = False
    """Entropy (for the temperature policy) and mismatch metrics also over the rollouts that are
    not trained on (zero-variance groups), at the cost of a forward-only pass over them; by
    default they cover the trained rollouts (every rollout when none is trained on)."""
    filtered_entropy: FilteredEntropy = FilteredEntropy.FORWARD
    """How the rollouts that are not trained on are measured (see FilteredEntropy): forward
    (exact, costs a forward over them) or sampled (an unbiased estimate from the engine's
    logprobs of the sampled tokens, no forward; needs rollout.top_p = 1)."""
    batching: BatchMode = BatchMode.PACKED
    """PACKED: rollouts back to back in micro-batches of at most max_tokens_per_micro_batch
    positions, balanced over DP ranks. PADDED: micro_batch_size rollouts per micro-batch, each
    padded to the step's longest (for comparison)."""
    max_tokens_per_micro_batch: int = 16384
    """PACKED: token budget (prompt + response positions) of one micro-batch; a longer rollout
    gets a micro-batch of its own. Size it to what one forward/backward fits in memory."""
    micro_batch_size: int = 8
    """PADDED: rollouts per forward/backward micro-batch."""

    def __post_init__(self) -> None:
        for name in ("num_updates", "micro_batch_size", "max_tokens_per_micro_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"grpo.{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(kw_only=True)
class EvalConfig:
    every_steps: int = 0
    """Evaluate on data.heldout_path every N steps (0: only before and after training)."""
    max_problems: int = 0
    """Evaluate on the first N held-out problems (0: all)."""
    num_samples: int = 1
    """Samples per problem."""
    temperature: float = 0.0
    """Sampling temperature of the evaluation (0: greedy)."""
    max_response_tokens: int = 0
    """Length budget (0: the rollout budget)."""
    at_start: bool = True
    """Evaluate the initial policy before the first step."""


@dataclasses.dataclass(kw_only=True)
class GRPOConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    """Policy shape and initial weights (`model.hf_path`)."""
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    """Trainer layout; the rollout engine runs on global rank 0."""
    data: PromptDataConfig
    """Prompt sets."""
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    """Generation."""
    grpo: AlgoConfig = dataclasses.field(default_factory=AlgoConfig)
    """Loss, advantages, filters."""
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(
        lr=1e-6, min_lr=1e-6, decay=LRDecay.CONSTANT, warmup_steps=0, weight_decay=0.0,
        clip_grad=1.0))
    """AdamW; lr 1e-6 constant as reference configs for Qwen2.5-Math-7B use (second-hand)."""
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    """Held-out evaluation hook."""
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    """Progress and metrics sinks."""
    steps: int = 100
    """RL steps to run."""
    seed: int = 1234
    """Trainer seed."""
    precision: Precision = Precision.AUTO
    """bf16 on GPU, fp32 on CPU by default."""

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.grpo.filtered_entropy is FilteredEntropy.SAMPLED and self.rollout.top_p < 1:
            raise ValueError(
                f"grpo.filtered_entropy=sampled estimates the entropy of softmax(logits / T) from "
                f"the sampled tokens, which rollout.top_p={self.rollout.top_p} truncates: use "
                f"rollout.top_p=1 or grpo.filtered_entropy=forward")


def base_grpo_config() -> GRPOConfig:
    return GRPOConfig(data=PromptDataConfig(train_path=f"{OUT}/data/prompts.jsonl"))


def grpo_tiny() -> GRPOConfig:
    """Tiny policy on the arithmetic task (CPU). Needs `model.hf_path` (an SFT export)."""
    cfg = base_grpo_config()
    cfg.data = PromptDataConfig(train_path=f"{OUT}/data/grpo_prompts.jsonl",
                                heldout_path=f"{OUT}/data/heldout.jsonl",
                                tokenizer=f"{OUT}/tokenizer", max_prompt_tokens=128)
    cfg.rollout = RolloutConfig(group_size=8, prompts_per_step=16, max_response_tokens=96,
                                temperature=TemperatureConfig(
                                    policy=TemperaturePolicyKind.FIXED, initial_temperature=1.0))
    cfg.grpo = AlgoConfig(loss=PolicyLossConfig(clip_low=0.2, clip_high=0.28),
                          max_tokens_per_micro_batch=8192, micro_batch_size=32)
    cfg.optim = OptimConfig(lr=1e-4, min_lr=1e-4, decay=LRDecay.CONSTANT, warmup_steps=0,
                            weight_decay=0.0, clip_grad=1.0)
    cfg.eval = EvalConfig(every_steps=0, max_problems=200, max_response_tokens=96)
    cfg.checkpoint = CheckpointConfig(save_interval=0, export_hf=True)
    cfg.steps = 20
    return cfg


def acereason_math_8k() -> GRPOConfig:
    """AceReason-Nemotron 1.1 math RL stage 1 (8K) on an SFT'd Qwen2.5-Math-7B.

    128 prompts x 8 rollouts per step, one update per rollout batch, token-level loss, no KL,
    overlong filtering on (paper). Clip 0.2/0.28 and lr 1e-6 follow reference configs of
    other frameworks for the same base (second-hand). Point `model.hf_path` and
    `data.train_path` at local copies.
    """
    cfg = base_grpo_config()
    cfg.model = ModelSection(preset="qwen2.5-math-7b", rope_theta=1e6,
                             max_position_embeddings=32768)
    cfg.parallel = ParallelConfig(tp=4, pp=1)
    cfg.data = PromptDataConfig(train_path=f"{OUT}/data/math_prompts.jsonl", tokenizer="qwen2.5",
                                system_prompt=SystemPrompt.MATH, max_prompt_tokens=2048)
    cfg.rollout = RolloutConfig(group_size=8, prompts_per_step=128, max_response_tokens=8192)
    cfg.grpo = AlgoConfig(loss=PolicyLossConfig(clip_low=0.2, clip_high=0.28),
                          overlong_filter=True, micro_batch_size=1)
    cfg.checkpoint = CheckpointConfig(save_interval=10, keep_last=3)
    cfg.steps = 400
    return cfg


RECIPES = {
    "grpo-tiny": (grpo_tiny, "tiny policy on the arithmetic task (CPU, minutes)"),
    "acereason-math-8k": (acereason_math_8k, "AceReason 1.1 math stage 1, Qwen2.5-Math-7B, 8K"),
}


def recipe(name: str) -> GRPOConfig:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    return RECIPES[name][0]()
