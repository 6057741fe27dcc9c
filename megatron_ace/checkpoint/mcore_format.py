"""The on-disk Megatron model checkpoints of megatron-ace: what `ace_checkpoint.json` says.

A model checkpoint (what `tools/convert_checkpoint.py` writes) is a directory holding
`ace_checkpoint.json` (format version, storage format, the model as an HF config dict, the TP/PP
it was chunked for, padded vocabulary, dtype, iteration, tokenizer dir) and the tensors in one of
two storage formats:
- `torch_dist` (format version 2, written now): megatron-core's distributed checkpoint, laid out
  as `torch_dist.py` describes; it loads at any TP/PP;
- `safetensors-per-rank` (format version 1, the previous release; read, never written): one
  safetensors file per model-parallel rank, `model/tp{t:02d}_pp{p:03d}.safetensors`, holding
  that rank's LOCAL state-dict names (stage-local layer indices; `_extra_state` dropped). Still
  readable for one release; `convert_checkpoint.py relayout` rewrites it as torch_dist.
A training checkpoint (`<run>/checkpoints/step_*`, train/state.py) is read as a model checkpoint
too: its `meta.json` holds the model config and its torch_dist files hold the model's tensors
under the same names (next to the optimizer's).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from megatron_ace.checkpoint.safetensors_stream import LazyReader, TensorEntry
from megatron_ace.model import mapping as M
from megatron_ace.model.config import Qwen2Config
from megatron_ace.utils.logging import get_logger

log = get_logger(__name__)

FORMAT_VERSION = 2
META_NAME = "ace_checkpoint.json"
TORCH_DIST = "torch_dist"
SAFETENSORS_PER_RANK = "safetensors-per-rank"
_TRAINING_META = "meta.json"  # train/state.py's META_FILE (checkpoint/ cannot import train/)


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
    format: str = TORCH_DIST
    """Storage format of the tensors: torch_dist, or the previous safetensors-per-rank."""

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
        if self.format not in (TORCH_DIST, SAFETENSORS_PER_RANK):
            raise ValueError(f"CheckpointMeta.format: unknown storage format {self.format!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_json(self) -> dict[str, Any]:
        if self.format != TORCH_DIST:
            raise ValueError(f"{self.format} checkpoints are read, no longer written")
        return {"format_version": FORMAT_VERSION, "format": self.format,
                "hf_config": self.model.to_hf_config(), "tp": self.tp, "pp": self.pp,
                "dtype": self.dtype, "spec": self.spec.value, "padded_vocab": self.padded_vocab,
                "iteration": self.iteration, "tokenizer_dir": self.tokenizer_dir}


def write_meta(directory: str | Path, meta: CheckpointMeta) -> None:
    Path(directory, META_NAME).write_text(json.dumps(meta.to_json(), indent=2) + "\n")


def read_meta(directory: str | Path) -> CheckpointMeta:
    """The meta of a model checkpoint (either format) or of a training checkpoint."""
    path = Path(directory, META_NAME)
    if not path.is_file():
        if Path(directory, _TRAINING_META).is_file():
            return _training_meta(Path(directory))
        raise FileNotFoundError(f"{directory}: not a megatron-ace checkpoint (no {META_NAME} "
                                f"or {_TRAINING_META})")
    raw = json.loads(path.read_text())
    version = raw.get("format_version")
    if version not in (1, FORMAT_VERSION):
        raise ValueError(f"{path}: format_version {version!r} is not one this version reads "
                         f"(1, {FORMAT_VERSION})")
    fmt = raw.get("format", TORCH_DIST) if version == FORMAT_VERSION else SAFETENSORS_PER_RANK
    if fmt == SAFETENSORS_PER_RANK:
        log.warning("%s is in the previous safetensors-per-rank layout: still read in this "
                    "release, not in the next; `tools/convert_checkpoint.py relayout` rewrites "
                    "it as torch_dist", directory)
    return CheckpointMeta(model=Qwen2Config.from_hf_config(raw["hf_config"]), tp=raw["tp"],
                          pp=raw["pp"], dtype=raw["dtype"], spec=M.Spec(raw["spec"]),
                          padded_vocab=raw["padded_vocab"], iteration=raw.get("iteration", 0),
                          tokenizer_dir=raw.get("tokenizer_dir"), format=fmt)


def _training_meta(directory: Path) -> CheckpointMeta:
    """A training checkpoint (`<run>/checkpoints/step_*`) seen as a model checkpoint."""
    from megatron_ace.checkpoint.dist_io import read_index

    raw = json.loads((directory / _TRAINING_META).read_text())
    if raw.get("format") != TORCH_DIST or not raw.get("model"):
        raise ValueError(f"{directory}: a training checkpoint of the previous format (per-rank "
                         ".pt files); resume the run once to rewrite it as torch_dist")
    embedding = read_index(directory).state_dict_metadata.get("embedding.word_embeddings.weight")
    if embedding is None:
        raise ValueError(f"{directory}: the checkpoint holds no embedding.word_embeddings.weight")
    return CheckpointMeta(model=Qwen2Config.from_hf_config(raw["model"]),
                          tp=raw["layout"]["tp"], pp=raw["layout"]["pp"],
                          dtype=str(embedding.properties.dtype).removeprefix("torch."),
                          padded_vocab=embedding.size[0], iteration=int(raw["step"]))


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
