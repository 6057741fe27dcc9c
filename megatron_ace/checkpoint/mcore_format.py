"""The on-disk Megatron checkpoint layout of megatron-ace.

A checkpoint is a directory holding `ace_checkpoint.json` (format version, the model as an HF
config dict, tp, pp, padded vocabulary, layer spec, dtype, iteration, tokenizer dir) and one
safetensors file per model-parallel rank, `model/tp{t:02d}_pp{p:03d}.safetensors`, holding that
rank's LOCAL Megatron state-dict names (stage-local layer indices; `_extra_state` dropped), so a
rank loads with `model.load_state_dict(..., strict=False)` after `check_keys`. The names and
shapes of each rank file are derived from mapping.py alone (`rank_entries`), so the offline
converter and a live model agree. Optimizer state is not stored here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from megatron_ace.checkpoint.safetensors_stream import LazyReader, StreamingWriter, TensorEntry
from megatron_ace.model import mapping as M
from megatron_ace.model.config import Qwen2Config

FORMAT_VERSION = 1
META_NAME = "ace_checkpoint.json"


@dataclasses.dataclass(kw_only=True)
class CheckpointMeta:
    model: Qwen2Config
    """The model (stored as an HF config dict)."""
    tp: int
    """Tensor-parallel size of the rank files."""
    pp: int
    """Pipeline-parallel size of the rank files."""
    dtype: str
    """Tensor dtype, e.g. 'bfloat16' (never cast on conversion)."""
    spec: M.Spec = M.Spec.LOCAL
    """Layer spec the names follow."""
    padded_vocab: int = 0
    """Rows of the vocabulary tensors; 0 = padded_vocab_size(vocab, tp)."""
    iteration: int = 0
    """Training iteration the weights belong to."""
    tokenizer_dir: str | None = None
    """Tokenizer files, relative to the checkpoint directory."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise ValueError(f"CheckpointMeta.{name} must be >= 1")
        if self.model.num_layers % self.pp:
            raise ValueError(f"CheckpointMeta.pp: {self.model.num_layers} layers do not split "
                             f"into {self.pp} stages")
        if self.model.num_query_groups % self.tp:
            raise ValueError(f"CheckpointMeta.tp: num_query_groups "
                             f"{self.model.num_query_groups} not divisible by tp {self.tp}")
        if not self.padded_vocab:
            self.padded_vocab = M.padded_vocab_size(self.model.vocab_size, self.tp)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_json(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "hf_config": self.model.to_hf_config(),
                "tp": self.tp, "pp": self.pp, "dtype": self.dtype, "spec": self.spec.value,
                "padded_vocab": self.padded_vocab, "iteration": self.iteration,
                "tokenizer_dir": self.tokenizer_dir}


def write_meta(directory: str | Path, meta: CheckpointMeta) -> None:
    Path(directory, META_NAME).write_text(json.dumps(meta.to_json(), indent=2) + "\n")


def read_meta(directory: str | Path) -> CheckpointMeta:
    path = Path(directory, META_NAME)
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not a megatron-ace checkpoint (no {META_NAME})")
    raw = json.loads(path.read_text())
    if raw.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {raw.get('format_version')} "
                         f"!= {FORMAT_VERSION}")
    return CheckpointMeta(model=Qwen2Config.from_hf_config(raw["hf_config"]), tp=raw["tp"],
                          pp=raw["pp"], dtype=raw["dtype"], spec=M.Spec(raw["spec"]),
                          padded_vocab=raw["padded_vocab"], iteration=raw.get("iteration", 0),
                          tokenizer_dir=raw.get("tokenizer_dir"))


def rank_file(directory: str | Path, tp_rank: int, pp_rank: int) -> Path:
    return Path(directory, "model", f"tp{tp_rank:02d}_pp{pp_rank:03d}.safetensors")


def _tied_copy_on(meta: CheckpointMeta, pp_rank: int) -> bool:
    """Tied embeddings under PP: the last stage holds its own copy as `output_layer.weight`."""
    return meta.model.tie_word_embeddings and meta.pp > 1 and pp_rank == meta.pp - 1


def rank_entries(meta: CheckpointMeta, tp_rank: int, pp_rank: int
                 ) -> list[tuple[TensorEntry, M.Rule, int | None]]:
    """(entry, rule, layer) of one rank's file, in the order the converter writes them."""
    cfg = meta.model
    offset = M.pp_layer_range(cfg.num_layers, meta.pp, pp_rank).start
    out = []
    for rule, layer in M.iter_rules(cfg, meta.spec):
        tied = rule.mcore.startswith("embedding.") and _tied_copy_on(meta, pp_rank)
        if not (M.on_stage(rule, layer, pp_rank, meta.pp, cfg) or tied):
            continue
        meta_full = torch.empty(M.full_shape(rule, layer, cfg, meta.padded_vocab), device="meta")
        shape = tuple(M.shard(rule, meta_full, tp_rank, meta.tp).shape)
        name = M.local_name(M.expand(rule, layer)[0], layer, offset)
        if tied:
            name = "output_layer.weight"
        out.append((TensorEntry(name=name, shape=shape, dtype=meta.torch_dtype), rule, layer))
    return out


def load_rank_state(directory: str | Path, tp_rank: int, pp_rank: int) -> dict[str, torch.Tensor]:
    """One rank's local state dict (names as `model.state_dict()` gives, no `_extra_state`)."""
    reader = LazyReader(rank_file(directory, tp_rank, pp_rank))
    return {n: reader.get(n) for n in reader.names()}


def check_keys(model, state: dict[str, torch.Tensor], where: str = "") -> None:
    """Raise naming every key/shape that differs between `state` and the model's state dict."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not k.endswith("_extra_state")}
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    bad = [f"{k}: expected shape {want[k]}, found {tuple(state[k].shape)}"
           for k in sorted(set(want) & set(state)) if tuple(state[k].shape) != want[k]]
    if missing or extra or bad:
        raise ValueError(f"{where}: checkpoint does not fit the model: missing {missing}, "
                         f"unexpected {extra}, {bad}")


def save_model_shards(model, directory: str | Path, tp_rank: int, pp_rank: int) -> Path:
    """Write this rank's local state dict to its rank file (call on dp_rank 0 only).

    Every rank writes into the same (tmp) directory; see atomic.py for the commit. The rank
    with tp_rank == pp_rank == 0 also writes the meta (`write_meta`), done by the caller.
    """
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    path = rank_file(directory, tp_rank, pp_rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = [TensorEntry(name=k, shape=tuple(v.shape), dtype=v.dtype) for k, v in state.items()]
    with StreamingWriter(path, entries) as writer:
        for k, v in state.items():
            writer.write(k, v)
    return path
