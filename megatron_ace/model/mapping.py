"""The HF <-> Megatron-Core name/shape mapping for Qwen2, as ONE declarative table.

Used by the checkpoint converter and by weight sync alike, so the two can never disagree.
Each `Rule` names a Megatron-Core parameter (full, un-sharded, global layer index), the HF
tensors it is made of, how they combine (`Merge`), and how the Megatron tensor is split across
tensor-parallel ranks (`tp_dim`).

Layouts worth knowing (they are what the parity tests guard):
- `linear_qkv` holds, per query group, that group's q heads, then its k head, then its v head
  ([g0: q.. k v][g1: q.. k v]...). Concatenating all of q, then k, then v is WRONG and shows up
  as a large logit error. Splitting that tensor into TP chunks along dim 0 hands each rank whole
  query groups, which is why num_query_groups must divide by TP.
- `linear_fc1` is gate on top of up ([gate; up]); under TP each half is split separately and a
  rank holds [gate_r; up_r].
- Vocabulary rows (embedding, output layer) are padded for TP to a multiple of
  `make_vocab_size_divisible_by * tp` and un-padded on export.
- With the Transformer Engine spec the two pre-norms live inside the fused linear layers
  (`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`); with the local spec they are
  separate modules. `Spec` picks the names; everything else is shared.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterator

import torch

from megatron_ace.model.config import Qwen2Config

LAYER = "{layer}"


class Merge(enum.Enum):
    """How the HF tensors of a rule combine into one Megatron tensor."""

    COPY = "copy"  # one HF tensor, same layout
    QKV = "qkv"  # q, k, v interleaved per query group
    GATE_UP = "gate_up"  # [gate; up]


class Spec(enum.Enum):
    """Which Megatron-Core layer spec the names follow."""

    LOCAL = "local"
    TE = "te"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    mcore: str
    """Megatron-Core parameter name; `{layer}` is the global layer index."""
    hf: tuple[str, ...]
    """HF tensor names, in the order `merge` expects."""
    merge: Merge = Merge.COPY
    """How the HF tensors combine."""
    tp_dim: int | None = None
    """Dimension split across TP ranks (0: column-parallel, 1: row-parallel, None: replicated)."""
    vocab: bool = False
    """Rows are vocabulary entries: padded for TP, un-padded on export."""

    @property
    def per_layer(self) -> bool:
        return LAYER in self.mcore


def _norm_names(spec: Spec) -> tuple[str, str]:
    if spec is Spec.TE:
        return ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight")
    return ("input_layernorm.weight", "pre_mlp_layernorm.weight")


def rules(cfg: Qwen2Config, spec: Spec = Spec.LOCAL) -> list[Rule]:
    """The full table for one model: global rules first, then one set per layer (templated)."""
    attn_norm, mlp_norm = _norm_names(spec)
    L, H = "decoder.layers.{layer}.", "model.layers.{layer}."
    table = [
        Rule(mcore="embedding.word_embeddings.weight", hf=("model.embed_tokens.weight",),
             tp_dim=0, vocab=True),
        Rule(mcore=L + attn_norm, hf=(H + "input_layernorm.weight",)),
        Rule(mcore=L + "self_attention.linear_qkv.weight",
             hf=tuple(H + f"self_attn.{p}_proj.weight" for p in "qkv"), merge=Merge.QKV, tp_dim=0),
        Rule(mcore=L + "self_attention.linear_qkv.bias",
             hf=tuple(H + f"self_attn.{p}_proj.bias" for p in "qkv"), merge=Merge.QKV, tp_dim=0),
        Rule(mcore=L + "self_attention.linear_proj.weight", hf=(H + "self_attn.o_proj.weight",),
             tp_dim=1),
        Rule(mcore=L + mlp_norm, hf=(H + "post_attention_layernorm.weight",)),
        Rule(mcore=L + "mlp.linear_fc1.weight",
             hf=(H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"), merge=Merge.GATE_UP,
             tp_dim=0),
        Rule(mcore=L + "mlp.linear_fc2.weight", hf=(H + "mlp.down_proj.weight",), tp_dim=1),
        Rule(mcore="decoder.final_layernorm.weight", hf=("model.norm.weight",)),
    ]
    if not cfg.tie_word_embeddings:
        table.append(Rule(mcore="output_layer.weight", hf=("lm_head.weight",), tp_dim=0,
                          vocab=True))
    return table


def expand(rule: Rule, layer: int | None) -> tuple[str, tuple[str, ...]]:
    """Concrete (mcore name, hf names) of a rule for one layer."""
    if not rule.per_layer:
        return rule.mcore, rule.hf
    assert layer is not None, rule.mcore
    return rule.mcore.format(layer=layer), tuple(n.format(layer=layer) for n in rule.hf)


def iter_rules(cfg: Qwen2Config, spec: Spec = Spec.LOCAL,
               layers: range | None = None) -> Iterator[tuple[Rule, int | None]]:
    """(rule, layer) pairs in model order: embedding, layer 0..L-1, final norm, output layer.

    Streaming consumers (converter, weight sync) walk this order so at most one layer's tensors
    are alive at a time.
    """
    table = rules(cfg, spec)
    layers = range(cfg.num_layers) if layers is None else layers
    yield table[0], None
    for layer in layers:
        for rule in table:
            if rule.per_layer:
                yield rule, layer
    for rule in table[1:]:
        if not rule.per_layer:
            yield rule, None


def hf_shapes(cfg: Qwen2Config) -> dict[str, tuple[int, ...]]:
    """Expected shape of every HF tensor of the model (used to validate an HF checkpoint)."""
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.kv_channels
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    per_layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.weight": (kv, h), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.weight": (kv, h), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for layer in range(cfg.num_layers):
        for name, shape in per_layer.items():
            shapes[f"model.layers.{layer}.{name}"] = shape
    return shapes


def full_shape(rule: Rule, layer: int | None, cfg: Qwen2Config, padded_vocab: int) -> tuple:
    """Shape of the full (un-sharded) Megatron tensor of one rule (vocabulary rows padded)."""
    shapes = hf_shapes(cfg)
    parts = [shapes[n] for n in expand(rule, layer)[1]]
    return (padded_vocab if rule.vocab else sum(p[0] for p in parts), *parts[0][1:])


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron pads the vocabulary so every TP rank holds the same number of rows."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


# ---- merge / split between HF tensors and one full Megatron tensor ---------------------------
def merge_hf(rule: Rule, tensors: list[torch.Tensor], cfg: Qwen2Config,
             padded_vocab: int | None = None) -> torch.Tensor:
    """HF tensors of one rule -> the full (un-sharded) Megatron tensor."""
    if rule.merge is Merge.COPY:
        (full,) = tensors
    elif rule.merge is Merge.GATE_UP:
        full = torch.cat(tensors, dim=0)
    else:
        q, k, v = tensors
        g, d = cfg.num_query_groups, cfg.kv_channels
        rest = q.shape[1:]
        q = q.reshape(g, cfg.heads_per_group * d, *rest)
        k = k.reshape(g, d, *rest)
        v = v.reshape(g, d, *rest)
        full = torch.cat([q, k, v], dim=1).reshape(-1, *rest)
    if rule.vocab and padded_vocab is not None and padded_vocab > full.shape[0]:
        pad = full.new_zeros(padded_vocab - full.shape[0], *full.shape[1:])
        full = torch.cat([full, pad], dim=0)
    return full


def split_hf(rule: Rule, full: torch.Tensor, cfg: Qwen2Config) -> list[torch.Tensor]:
    """The full Megatron tensor of one rule -> its HF tensors (vocabulary un-padded)."""
    if rule.vocab:
        full = full[: cfg.vocab_size]
    if rule.merge is Merge.COPY:
        return [full]
    if rule.merge is Merge.GATE_UP:
        return list(torch.chunk(full, 2, dim=0))
    g, d = cfg.num_query_groups, cfg.kv_channels
    rest = full.shape[1:]
    grouped = full.reshape(g, (cfg.heads_per_group + 2) * d, *rest)
    q, k, v = torch.split(grouped, [cfg.heads_per_group * d, d, d], dim=1)
    return [t.reshape(-1, *rest) for t in (q, k, v)]


# ---- tensor-parallel sharding of one full Megatron tensor ------------------------------------
def shard(rule: Rule, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The slice of `full` that TP rank `tp_rank` holds."""
    if rule.tp_dim is None or tp_size == 1:
        return full
    if rule.merge is Merge.GATE_UP:
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, tp_size, dim=0)[tp_rank],
                          torch.chunk(up, tp_size, dim=0)[tp_rank]], dim=0)
    if full.shape[rule.tp_dim] % tp_size:
        raise ValueError(f"{rule.mcore}: dim {rule.tp_dim} of {tuple(full.shape)} does not "
                         f"split into {tp_size} TP shards")
    return torch.chunk(full, tp_size, dim=rule.tp_dim)[tp_rank]


def unshard(rule: Rule, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `shard`: the full tensor from every TP rank's slice, in rank order."""
    if rule.tp_dim is None or len(shards) == 1:
        return shards[0]
    if rule.merge is Merge.GATE_UP:
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=rule.tp_dim)


# ---- pipeline-parallel placement -------------------------------------------------------------
def pp_layer_range(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """Global layers held by one pipeline stage (even split, as Megatron-Core does by default)."""
    if num_layers % pp_size:
        raise ValueError(f"num_layers ({num_layers}) must be divisible by pipeline size {pp_size}")
    per = num_layers // pp_size
    return range(pp_rank * per, (pp_rank + 1) * per)


def local_name(name: str, layer: int | None, layer_offset: int) -> str:
    """Megatron-Core names layers by their index inside the stage: global -> local name."""
    if layer is None:
        return name
    return name.replace(f"decoder.layers.{layer}.", f"decoder.layers.{layer - layer_offset}.", 1)


def on_stage(rule: Rule, layer: int | None, pp_rank: int, pp_size: int, cfg: Qwen2Config) -> bool:
    """Whether a (rule, layer) parameter lives on pipeline stage `pp_rank`.

    The embedding is on the first stage, the final norm and output layer on the last; with tied
    embeddings and PP > 1 Megatron-Core also keeps a copy of the embedding on the last stage
    (`output_layer` reads `embedding.word_embeddings.weight` there), which export ignores.
    """
    if layer is not None:
        return layer in pp_layer_range(cfg.num_layers, pp_size, pp_rank)
    if rule.mcore.startswith("embedding."):
        return pp_rank == 0
    return pp_rank == pp_size - 1
