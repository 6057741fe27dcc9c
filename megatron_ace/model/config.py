"""Qwen2 / Qwen2.5 model configuration: one dataclass, HF config.json in and out, named presets.

`Qwen2Config` holds exactly what the Megatron-Core model and the HF <-> Megatron mapping need.
It is built from any Qwen2/Qwen2.5 HF `config.json` (`from_hf_config`) or from a named preset
(`preset("qwen2.5-math-7b")`), and written back as an HF config (`to_hf_config`) on export.

Preset values follow the published config.json of each model. AceReason-Nemotron 1.1 starts from
Qwen2.5-Math-7B with rope_theta raised from 1e4 to 1e6 for long context; that is the
`rope_theta` override of the recipe, not of the preset.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

HF_ARCHITECTURES = ("Qwen2ForCausalLM",)
HF_MODEL_TYPES = ("qwen2",)


@dataclasses.dataclass(kw_only=True, frozen=True)
class Qwen2Config:
    vocab_size: int
    """Vocabulary size as in HF (un-padded); Megatron pads it for TP, export un-pads it."""
    hidden_size: int
    """Model width."""
    intermediate_size: int
    """SwiGLU inner width (size of the gate and of the up projection each)."""
    num_layers: int
    """Number of transformer blocks (HF `num_hidden_layers`)."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: int
    """Key/value heads (grouped-query attention; HF `num_key_value_heads`)."""
    max_position_embeddings: int = 32768
    """Longest sequence the rotary embedding is sized for."""
    rope_theta: float = 1_000_000.0
    """Rotary base. AceReason raises Qwen2.5-Math-7B's from 1e4 to 1e6."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output layer (Qwen2.5-0.5B/1.5B/3B do)."""
    head_dim: int | None = None
    """Per-head width; defaults to hidden_size // num_attention_heads."""
    bos_token_id: int | None = None
    """Kept for the exported HF config only."""
    eos_token_id: int | list[int] | None = None
    """Kept for the exported HF config only."""
    torch_dtype: str = "bfloat16"
    """dtype named in the exported HF config."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_attention_heads", "num_query_groups", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Qwen2Config.{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"Qwen2Config.num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_query_groups ({self.num_query_groups})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"Qwen2Config.hidden_size ({self.hidden_size}) is not divisible by "
                f"num_attention_heads ({self.num_attention_heads}); set head_dim"
            )
        if self.rope_theta <= 0:
            raise ValueError(f"Qwen2Config.rope_theta must be positive, got {self.rope_theta}")

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def replace(self, **changes: Any) -> "Qwen2Config":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count of the HF model (un-padded vocabulary)."""
        h, f, d = self.hidden_size, self.intermediate_size, self.kv_channels
        q, kv = self.num_attention_heads * d, self.num_query_groups * d
        attn = h * q + q + 2 * (h * kv + kv) + q * h
        layer = attn + 3 * h * f + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + h

    # ---- HF config.json -------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any] | str | Path, **overrides: Any) -> "Qwen2Config":
        """Build from an HF config dict, a config.json path or a model directory."""
        source = "config"
        if not isinstance(hf, dict):
            path = Path(hf)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"no HF config.json at {path}")
            source = str(path)
            hf = json.loads(path.read_text())
        archs = hf.get("architectures") or []
        if hf.get("model_type") not in HF_MODEL_TYPES or (archs and archs[0] not in HF_ARCHITECTURES):
            raise ValueError(
                f"{source}: unsupported architecture {archs or hf.get('model_type')!r}; "
                f"expected {HF_ARCHITECTURES[0]} (model_type 'qwen2')"
            )
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in hf]
        if missing:
            raise ValueError(f"{source}: missing field(s) {', '.join(missing)}")
        rope_theta = hf.get("rope_theta")
        if rope_theta is None:  # transformers >= 5 nests it under rope_parameters
            rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_query_groups=hf.get("num_key_value_heads", hf["num_attention_heads"]),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            rope_theta=float(rope_theta),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            head_dim=hf.get("head_dim"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"),
        )
        if fields["head_dim"] == fields["hidden_size"] // fields["num_attention_heads"]:
            fields["head_dim"] = None
        fields.update(overrides)
        return cls(**fields)

    def to_hf_config(self) -> dict[str, Any]:
        """An HF `config.json` dict that transformers and vLLM load as Qwen2ForCausalLM."""
        return {
            "architectures": list(HF_ARCHITECTURES),
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_query_groups,
            "head_dim": self.kv_channels,
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.num_layers,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "use_sliding_window": False,
            "sliding_window": None,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.torch_dtype,
        }


def _p(**kw: Any) -> Qwen2Config:
    return Qwen2Config(**kw)


# Published Qwen2.5 shapes (config.json of each model). Vocabulary 151936 for <= 3B, 152064 above.
PRESETS: dict[str, Qwen2Config] = {
    "qwen2.5-0.5b": _p(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                       num_attention_heads=14, num_query_groups=2, tie_word_embeddings=True,
                       bos_token_id=151643, eos_token_id=151643),
    "qwen2.5-1.5b": _p(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                       num_attention_heads=12, num_query_groups=2, tie_word_embeddings=True,
                       bos_token_id=151643, eos_token_id=151643),
    "qwen2.5-3b": _p(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
                     num_attention_heads=16, num_query_groups=2, tie_word_embeddings=True,
                     bos_token_id=151643, eos_token_id=151643),
    "qwen2.5-7b": _p(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                     num_attention_heads=28, num_query_groups=4, max_position_embeddings=131072,
                     bos_token_id=151643, eos_token_id=151643),
    "qwen2.5-14b": _p(vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_layers=48,
                      num_attention_heads=40, num_query_groups=8, max_position_embeddings=131072,
                      rms_norm_eps=1e-5, bos_token_id=151643, eos_token_id=151643),
    "qwen2.5-32b": _p(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_layers=64,
                      num_attention_heads=40, num_query_groups=8, max_position_embeddings=131072,
                      rms_norm_eps=1e-5, bos_token_id=151643, eos_token_id=151643),
    # The Math models ship a 4K context and rope_theta 1e4.
    "qwen2.5-math-1.5b": _p(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                            num_layers=28, num_attention_heads=12, num_query_groups=2,
                            tie_word_embeddings=True, max_position_embeddings=4096,
                            rope_theta=10000.0, bos_token_id=151643, eos_token_id=151643),
    "qwen2.5-math-7b": _p(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                          num_layers=28, num_attention_heads=28, num_query_groups=4,
                          max_position_embeddings=4096, rope_theta=10000.0,
                          bos_token_id=151643, eos_token_id=151643),
    # Tiny shapes for tests and the CPU demo. head_dim 32 is the smallest vLLM's CPU attention
    # accepts; a vocabulary that is not a multiple of 128 exercises the TP padding.
    "tiny": _p(vocab_size=1000, hidden_size=128, intermediate_size=256, num_layers=2,
               num_attention_heads=4, num_query_groups=2, max_position_embeddings=1024,
               rope_theta=10000.0),
    "tiny-tied": _p(vocab_size=1000, hidden_size=128, intermediate_size=256, num_layers=2,
                    num_attention_heads=4, num_query_groups=2, max_position_embeddings=1024,
                    rope_theta=10000.0, tie_word_embeddings=True),
    "tiny-4l": _p(vocab_size=1000, hidden_size=128, intermediate_size=352, num_layers=4,
                  num_attention_heads=4, num_query_groups=2, max_position_embeddings=1024),
}


def preset(name: str, **overrides: Any) -> Qwen2Config:
    """A named preset, optionally with field overrides (e.g. rope_theta=1e6)."""
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[key].replace(**overrides) if overrides else PRESETS[key]
