"""Trainer configuration: one tree of keyword-only dataclasses, and the SFT recipes.

`SFTConfig` is the whole run: model, parallel layout, data, batching, optimizer, schedule,
checkpointing, logging. `OptimConfig`, `ScheduleConfig`, `CheckpointConfig` and
`LoggingConfig` are shared with the GRPO trainer. Recipes are functions returning an
`SFTConfig`, all derived from `base_sft_config()`; `RECIPES` maps the CLI name to the function.
Command-line overrides (`optim.lr=1e-5`) are applied on top by `megatron_ace.config.base`.

Strings of the form `{out}` in data paths are replaced with the run's output directory
(the tiny recipe generates its data and tokenizer there).

This module only describes runs; it imports no torch and no megatron-core.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable

from megatron_ace.data.arith_task import ArithTaskConfig
from megatron_ace.data.packing import AttentionFormat, BatchingConfig, BatchMode
from megatron_ace.data.chat import SystemPrompt
from megatron_ace.data.sft_dataset import OverlongPolicy, SFTDataConfig
from megatron_ace.model.config import Qwen2Config, preset
from megatron_ace.model.parallel import ParallelConfig

OUT_PLACEHOLDER = "{out}"


class LRDecay(enum.Enum):
    """Shape of the learning rate after warmup."""

    CONSTANT = "constant"
    COSINE = "cosine"
    LINEAR = "linear"


class OptimBackend(enum.Enum):
    """Which optimizer implementation runs AdamW (see optim.py)."""

    AUTO = "auto"
    """MCORE when CUDA is present, TORCH otherwise."""
    MCORE = "mcore"
    """megatron-core DDP + get_megatron_optimizer (DistributedOptimizer when `distributed`)."""
    TORCH = "torch"
    """torch.optim.AdamW with explicit DP all-reduce and TP/PP-aware clipping (CPU, float32)."""


class Precision(enum.Enum):
    AUTO = "auto"
    """bf16 on GPU, fp32 on CPU."""
    FP32 = "fp32"
    BF16 = "bf16"


class ResumeMode(enum.Enum):
    AUTO = "auto"
    """Resume from the latest complete checkpoint under `<out>/checkpoints` if there is one."""
    NEVER = "never"
    """Start fresh (refuses to run if checkpoints exist, so nothing is overwritten by mistake)."""


@dataclasses.dataclass(kw_only=True)
class ModelSection:
    preset: str = "tiny"
    """Named model shape (megatron_ace.model.config.PRESETS); ignored when `hf_path` is set."""
    hf_path: str = ""
    """HF model directory to start from (config.json + safetensors); "" = random init of `preset`."""
    vocab_size: int = 0
    """Override the vocabulary size (0 keeps the preset's / checkpoint's)."""
    rope_theta: float = 0.0
    """Override the rotary base (0 keeps it). AceReason raises Qwen2.5-Math-7B's 1e4 to 1e6."""
    max_position_embeddings: int = 0
    """Override the context length the model is configured for (0 keeps it)."""
    eos_token_id: int = -1
    """Written into the exported HF config (-1 keeps the preset's)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_position_embeddings"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        if self.rope_theta < 0:
            raise ValueError(f"model.rope_theta must be >= 0, got {self.rope_theta}")

    def resolve(self) -> Qwen2Config:
        """The Qwen2Config this section describes (reads `hf_path`/config.json when set)."""
        overrides: dict = {}
        if self.vocab_size:
            overrides["vocab_size"] = self.vocab_size
        if self.rope_theta:
            overrides["rope_theta"] = self.rope_theta
        if self.max_position_embeddings:
            overrides["max_position_embeddings"] = self.max_position_embeddings
        if self.eos_token_id >= 0:
            overrides["eos_token_id"] = self.eos_token_id
        if self.hf_path:
            return Qwen2Config.from_hf_config(self.hf_path, **overrides)
        return preset(self.preset, **overrides)


@dataclasses.dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate (after warmup)."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    decay: LRDecay = LRDecay.COSINE
    """Decay after warmup: constant, cosine or linear down to `min_lr`."""
    warmup_steps: int | None = None
    """Linear warmup length in optimizer steps; None uses `warmup_fraction`."""
    warmup_fraction: float = 0.0
    """Warmup as a fraction of the planned optimizer steps (when `warmup_steps` is None)."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay; biases and norms never decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient L2 norm to this value (0 disables clipping)."""
    backend: OptimBackend = OptimBackend.AUTO
    """Optimizer implementation (AUTO: megatron-core with CUDA, torch AdamW on CPU)."""
    distributed: bool = True
    """Shard optimizer state over DP (megatron-core DistributedOptimizer; MCORE backend only)."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"optim.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.adam_eps <= 0:
            raise ValueError(f"optim.adam_eps must be > 0, got {self.adam_eps}")
        if self.clip_grad < 0:
            raise ValueError(f"optim.clip_grad must be >= 0, got {self.clip_grad}")


@dataclasses.dataclass(kw_only=True)
class ScheduleConfig:
    global_batch_size: int = 8
    """Micro-batch rows per optimizer step over all DP ranks (a row is one packed sequence)."""
    num_epochs: int = 1
    """Passes over the data (reshuffled each epoch); the run length unless `max_steps` is set."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run `num_epochs`)."""
    seed: int = 1234
    """Seed of weight init, data order and every RNG."""
    precision: Precision = Precision.AUTO
    """bf16 on GPU and fp32 on CPU by default."""

    def __post_init__(self) -> None:
        if self.global_batch_size < 1:
            raise ValueError(f"schedule.global_batch_size must be >= 1, got {self.global_batch_size}")
        if self.num_epochs < 1:
            raise ValueError(f"schedule.num_epochs must be >= 1, got {self.num_epochs}")
        if self.max_steps < 0:
            raise ValueError(f"schedule.max_steps must be >= 0, got {self.max_steps}")


@dataclasses.dataclass(kw_only=True)
class CheckpointConfig:
    save_interval: int = 0
    """Save every N optimizer steps (0: only at the end)."""
    keep_last: int = 2
    """Complete checkpoints to keep (older ones are deleted after a new one is committed)."""
    resume: ResumeMode = ResumeMode.AUTO
    """AUTO resumes from the latest complete checkpoint in `<out>/checkpoints`."""
    save_at_end: bool = True
    """Save a checkpoint after the last step."""
    export_hf: bool = True
    """Write an HF model directory to `<out>/hf` at the end."""

    def __post_init__(self) -> None:
        if self.save_interval < 0:
            raise ValueError(f"checkpoint.save_interval must be >= 0, got {self.save_interval}")
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


@dataclasses.dataclass(kw_only=True)
class LoggingConfig:
    progress_bar: bool = True
    """Show a tqdm progress bar (loss, tokens/s, lr) on rank 0."""
    tensorboard: bool = True
    """Write TensorBoard scalars to `<out>/tensorboard`."""
    wandb: bool = False
    """Log to Weights & Biases too (needs `wandb` installed; offline unless configured)."""
    wandb_project: str = "megatron-ace"
    """wandb project name."""
    log_interval: int = 1
    """Write a log line every N steps (metrics.jsonl gets every step regardless)."""

    def __post_init__(self) -> None:
        if self.log_interval < 1:
            raise ValueError(f"logging.log_interval must be >= 1, got {self.log_interval}")


@dataclasses.dataclass(kw_only=True)
class ArithDataSection:
    task: ArithTaskConfig = dataclasses.field(default_factory=ArithTaskConfig)
    """Difficulty of the generated arithmetic problems."""
    num_samples: int = 2000
    """SFT rows written to `<out>/data/sft.jsonl` before training."""

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"arith.num_samples must be >= 1, got {self.num_samples}")


@dataclasses.dataclass(kw_only=True)
class SFTConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    """Model shape and initial weights."""
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    """TP / PP layout (DP is what remains of the world size)."""
    data: SFTDataConfig
    """SFT files, tokenizer and sample rules."""
    batching: BatchingConfig
    """Packing into rows and micro-batch size."""
    arith: ArithDataSection | None = None
    """When set, generate the arithmetic task and the tiny tokenizer under `<out>` first."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    """Batch size, epochs, seed, precision."""
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    """Saving, resuming, HF export."""
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    """Progress bar, TensorBoard, wandb."""

    def __post_init__(self) -> None:
        if self.batching.mode is not BatchMode.PACKED and self.parallel.pp > 1:
            raise ValueError("batching.mode must be packed when parallel.pp > 1 (fixed shapes "
                             "between pipeline stages)")
        per_step = self.batching.micro_batch_size
        if self.schedule.global_batch_size % per_step:
            raise ValueError(
                f"schedule.global_batch_size ({self.schedule.global_batch_size}) must be a "
                f"multiple of batching.micro_batch_size ({per_step}) times the DP size")


def base_sft_config() -> SFTConfig:
    """What every recipe starts from: a placeholder data path and defaults elsewhere."""
    return SFTConfig(
        data=SFTDataConfig(paths=[f"{OUT_PLACEHOLDER}/data/sft.jsonl"]),
        batching=BatchingConfig(seq_length=1024, micro_batch_size=1),
    )


def sft_tiny() -> SFTConfig:
    """Tiny Qwen2 from scratch on the generated arithmetic task; about a minute on 2 CPU cores."""
    from megatron_ace.data import tiny_tokenizer as tt

    cfg = base_sft_config()
    cfg.model = ModelSection(preset="tiny", vocab_size=tt.VOCAB_SIZE, eos_token_id=tt.IM_END_ID)
    cfg.arith = ArithDataSection(num_samples=4000)
    cfg.data = SFTDataConfig(paths=[f"{OUT_PLACEHOLDER}/data/sft.jsonl"],
                             tokenizer=f"{OUT_PLACEHOLDER}/tokenizer",
                             system_prompt=SystemPrompt.NONE, max_seq_len=256)
    cfg.batching = BatchingConfig(seq_length=256, micro_batch_size=4, seed=1234)
    cfg.optim = OptimConfig(lr=3e-3, min_lr=3e-4, decay=LRDecay.COSINE, warmup_steps=10,
                            weight_decay=0.01, clip_grad=1.0)
    cfg.schedule = ScheduleConfig(global_batch_size=8, num_epochs=6, seed=1234)
    cfg.checkpoint = CheckpointConfig(save_interval=50, keep_last=2)
    return cfg


def acereason_sft_7b() -> SFTConfig:
    """AceReason-Nemotron 1.1 SFT of Qwen2.5-Math-7B (arXiv 2506.13284).

    Facts and their sources:
    - base Qwen2.5-Math-7B, rope_theta raised 1e4 -> 1e6 for long context (paper);
    - max_position_embeddings raised to 32K (second-hand: reference configs of other
      frameworks for the same base use 16K-32K);
    - 383K prompts (247K math, 136K code) with several R1 responses each, ChatML, 5-6 epochs
      (paper; the number of epochs second-hand from reviews);
    - lr ~5e-6 with cosine decay (second-hand, not checked against the paper's appendix);
    - global batch: NOT verified against the paper; 256 packed 32K rows is our choice for
      8 nodes x 8 GPUs (tp=4, pp=2 -> dp=8). Check and set `schedule.global_batch_size`.
    Point `data.paths` and `model.hf_path` at local copies before running.
    """
    cfg = base_sft_config()
    # A relative directory on purpose: a missing base model fails loudly ("no HF config.json")
    # instead of silently training a randomly initialised 7B.
    cfg.model = ModelSection(preset="qwen2.5-math-7b", hf_path="Qwen2.5-Math-7B", rope_theta=1e6,
                             max_position_embeddings=32768)
    cfg.parallel = ParallelConfig(tp=4, pp=2)
    cfg.data = SFTDataConfig(paths=[f"{OUT_PLACEHOLDER}/data/acereason_sft.jsonl"],
                             tokenizer="qwen2.5", system_prompt=SystemPrompt.AUTO,
                             max_seq_len=32768, overlong=OverlongPolicy.DROP, num_proc=16)
    # Packed rows reach the attention as THD (cu_seqlens): TE on GPU, SDPA with the local spec.
    cfg.batching = BatchingConfig(seq_length=32768, micro_batch_size=1,
                                  attention=AttentionFormat.THD)
    cfg.optim = OptimConfig(lr=5e-6, min_lr=5e-7, decay=LRDecay.COSINE, warmup_fraction=0.03,
                            weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, clip_grad=1.0)
    cfg.schedule = ScheduleConfig(global_batch_size=256, num_epochs=5)
    cfg.checkpoint = CheckpointConfig(save_interval=500, keep_last=3)
    cfg.logging = LoggingConfig(wandb=True)
    return cfg


RECIPES: dict[str, tuple[Callable[[], SFTConfig], str]] = {
    "sft-tiny": (sft_tiny, "tiny Qwen2 from scratch on the arithmetic task (CPU, ~1 min)"),
    "acereason-sft-7b": (acereason_sft_7b, "AceReason-Nemotron 1.1 SFT of Qwen2.5-Math-7B, 32K"),
}


def recipe(name: str) -> SFTConfig:
    """The config of recipe `name`; ValueError listing the known recipes otherwise."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    return RECIPES[name][0]()
