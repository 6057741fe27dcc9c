"""Offline, streaming reading and writing of megatron-core `torch_dist` model checkpoints.

The converter writes the very layout a live megatron-core GPTModel saves through
`dist_checkpointing.save(model.sharded_state_dict(), ...)` (tested key for key against one), so
its output loads into a model at any TP/PP with megatron-core's own `dist_checkpointing.load`,
and `ace sft` / `ace grpo` start from it (`model.mcore_path`). That layout, in short:
- one torch.distributed.checkpoint (DCP) tensor per parameter, named as megatron-core names it
  in checkpoints, independent of the layer spec: the Transformer Engine names
  (`decoder.layers.self_attention.linear_qkv.layer_norm_weight` for the attention pre-norm),
  with the layers stacked on a leading axis (`decoder.layers.mlp.linear_fc2.weight` is
  [num_layers, hidden, ffn]);
- the full tensors are the full Megatron tensors of `mapping.py` (q/k/v interleaved per query
  group, [gate; up], the vocabulary padded for the writing TP size); each TP rank's slice (each
  half of `linear_fc1` separately) of each layer is one stored chunk;
- `_extra_state` objects of the four linear layers of every layer (None for the local spec),
  the `common_state` object megatron-core reads first, and `metadata.json` naming the backend.

Writing streams: a DCP save planner whose items are produced on demand, one full tensor of one
rule at a time (read from the source, merged, sliced), so memory stays about one layer's tensor
whatever the model size. Reading asks DCP for one layer's region of a stacked tensor at a time.
Neither needs a process group nor megatron-core's model code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_ace.checkpoint.dist_io import MCORE_CONFIG_FILE, read_index, verify_files
from megatron_ace.model import mapping as M
from megatron_ace.model.config import Qwen2Config

RuleSource = Callable[[M.Rule, int | None], list[torch.Tensor]]
"""(rule, layer) -> the HF tensors of that rule."""
_LAYERS = "decoder.layers.{layer}."
# Linear layers whose (None) `_extra_state` megatron-core's local spec saves per layer.
_EXTRA_STATE_MODULES = ("self_attention.linear_proj", "self_attention.linear_qkv",
                        "mlp.linear_fc1", "mlp.linear_fc2")
COMMON_STATE_KEY = "common_state/shard_0_1"


@contextlib.contextmanager
def _single_process():
    """DCP without a process group (`no_dist=True`) still warns that it assumes one process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def dist_key(rule: M.Rule) -> str:
    """The checkpoint name of a rule of the Transformer Engine table (layers stacked)."""
    return rule.mcore.replace(_LAYERS, "decoder.layers.")


def _te_rules(cfg: Qwen2Config) -> Iterator[tuple[M.Rule, int | None]]:
    return M.iter_rules(cfg, M.Spec.TE)


@dataclasses.dataclass(frozen=True)
class _Chunk:
    """One stored piece of a checkpoint tensor: where it sits and how to cut it from the full
    (un-stacked) Megatron tensor of its rule."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    index: tuple[slice, ...] | None
    """The piece of the full tensor (None: all of it)."""


def _chunks(rule: M.Rule, layer: int | None, full_shape: tuple[int, ...], tp: int
            ) -> list[_Chunk]:
    """Chunks of one rule's full tensor at TP size `tp`, in global (stacked) coordinates."""
    lead = (layer,) if layer is not None else ()
    one = (1,) if layer is not None else ()
    if rule.tp_dim is None or tp == 1:
        return [_Chunk(lead + (0,) * len(full_shape), one + full_shape, None)]
    dim = rule.tp_dim
    pieces = []  # (start, length) along `dim`
    if rule.merge is M.Merge.GATE_UP:
        half = full_shape[0] // 2
        for r in range(tp):
            pieces += [(r * half // tp, half // tp), (half + r * half // tp, half // tp)]
    else:
        if full_shape[dim] % tp:
            raise ValueError(f"{rule.mcore}: dim {dim} of {full_shape} does not split into "
                             f"{tp} TP shards")
        step = full_shape[dim] // tp
        pieces = [(r * step, step) for r in range(tp)]
    out = []
    for start, length in pieces:
        offsets = [0] * len(full_shape)
        sizes = list(full_shape)
        offsets[dim], sizes[dim] = start, length
        index = (slice(None),) * dim + (slice(start, start + length),)
        out.append(_Chunk(lead + tuple(offsets), one + tuple(sizes), index))
    return out


@dataclasses.dataclass(frozen=True)
class _Entry:
    rule: M.Rule
    layer: int | None
    key: str
    global_shape: tuple[int, ...]
    chunk: _Chunk


def plan_tensors(cfg: Qwen2Config, padded_vocab: int, tp: int) -> list[_Entry]:
    """Every stored chunk of a model checkpoint, in model order (embedding, layers, norm, head)."""
    out = []
    for rule, layer in _te_rules(cfg):
        full = M.full_shape(rule, layer, cfg, padded_vocab)
        shape = (cfg.num_layers, *full) if layer is not None else full
        out += [_Entry(rule, layer, dist_key(rule), shape, c) for c in _chunks(rule, layer, full, tp)]
    return out


def _extra_state_keys(cfg: Qwen2Config) -> list[str]:
    return [f"decoder.layers.{m}._extra_state/shard_{i}_{cfg.num_layers}"
            for i in range(cfg.num_layers) for m in _EXTRA_STATE_MODULES]


def _bytes_of(obj: object) -> io.BytesIO:
    """A megatron-core ShardedObject payload: torch.save of the list of its data."""
    buffer = io.BytesIO()
    torch.save([obj], buffer)
    buffer.seek(0)
    return buffer


class _StreamingSavePlanner(DefaultSavePlanner):
    """DCP save plan of precomputed items whose tensors are produced when the writer asks."""

    def __init__(self, entries: list[_Entry], objects: dict[str, object], dtype: torch.dtype,
                 source: RuleSource, cfg: Qwen2Config, padded_vocab: int) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._entries = {(e.key, e.chunk.offsets): e for e in entries}
        self._objects = objects
        self._dtype, self._source, self._cfg, self._padded = dtype, source, cfg, padded_vocab
        self._cached: tuple[tuple[str, int | None], torch.Tensor] | None = None
        self.num_bytes = 0

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:
        self.state_dict, self.is_coordinator = {}, is_coordinator

    def create_local_plan(self) -> SavePlan:
        items = [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO)
                 for key in self._objects]
        for e in self._entries.values():
            items.append(WriteItem(
                index=MetadataIndex(e.key, torch.Size(e.chunk.offsets)), type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(e.chunk.offsets),
                                               sizes=torch.Size(e.chunk.sizes)),
                    properties=TensorProperties(dtype=self._dtype),
                    size=torch.Size(e.global_shape))))
        self.plan = SavePlan(items)
        return self.plan

    def _full(self, e: _Entry) -> torch.Tensor:
        ident = (e.rule.mcore, e.layer)
        if self._cached is None or self._cached[0] != ident:
            self._cached = None  # free the previous tensor before building the next
            full = M.merge_hf(e.rule, self._source(e.rule, e.layer), self._cfg, self._padded)
            if full.dtype != self._dtype:
                raise ValueError(f"{M.expand(e.rule, e.layer)[0]}: dtype {full.dtype}, "
                                 f"checkpoint dtype is {self._dtype}")
            self._cached = (ident, full)
        return self._cached[1]

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return _bytes_of(self._objects[write_item.index.fqn])
        e = self._entries[(write_item.index.fqn, tuple(write_item.index.offset))]
        full = self._full(e)
        piece = full if e.chunk.index is None else full[e.chunk.index]
        piece = piece.contiguous()
        self.num_bytes += piece.numel() * piece.element_size()
        return piece.reshape(e.chunk.sizes)


def write_model(source: RuleSource, cfg: Qwen2Config, *, tp: int, padded_vocab: int,
                dtype: torch.dtype, out_dir: str | Path,
                common_state: dict | None = None) -> int:
    """Stream every rule of `cfg` from `source` into a torch_dist checkpoint in the existing
    directory `out_dir`, chunked as TP size `tp` saves it; returns the tensor bytes written."""
    out_dir = Path(out_dir)
    objects: dict[str, object] = {COMMON_STATE_KEY: common_state or {}}
    objects.update({k: None for k in _extra_state_keys(cfg)})
    planner = _StreamingSavePlanner(plan_tensors(cfg, padded_vocab, tp), objects, dtype, source,
                                    cfg, padded_vocab)
    writer = FileSystemWriter(str(out_dir), single_file_per_rank=True, sync_files=True,
                              thread_count=1, per_thread_copy_ahead=0)
    with _single_process():
        dcp_save({}, storage_writer=writer, planner=planner, no_dist=True)
    (out_dir / MCORE_CONFIG_FILE).write_text(
        json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))
    return planner.num_bytes


# ---- reading -------------------------------------------------------------------------------
class _RegionLoadPlanner(DefaultLoadPlanner):
    """DCP load plan for given regions of checkpoint tensors, into given destination tensors."""

    def __init__(self, regions: dict[str, tuple[tuple[int, ...], torch.Tensor]]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._regions = regions  # key -> (offsets, destination tensor)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        self.state_dict, self.metadata, self.is_coordinator = {}, metadata, is_coordinator

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, (offsets, dest) in self._regions.items():
            md = self.metadata.state_dict_metadata[key]
            want = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            items += create_read_items_for_chunk_list(key, md, [want])
        return LoadPlan(items)

    def resolve_tensor(self, read_item):
        dest = self._regions[read_item.dest_index.fqn][1]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item, tensor) -> None:
        pass


class DistReader:
    """Full Megatron tensors of a torch_dist checkpoint (model or training), one rule at a time."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        verify_files(self.dir)
        self.index = read_index(self.dir).state_dict_metadata

    def shape(self, key: str) -> tuple[int, ...]:
        md = self.index.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise ValueError(f"{self.dir}: the checkpoint has no tensor {key}")
        return tuple(md.size)

    def dtype(self, key: str) -> torch.dtype:
        self.shape(key)
        return self.index[key].properties.dtype

    def read(self, key: str, layer: int | None = None) -> torch.Tensor:
        """The tensor `key` (one layer of it when stacked)."""
        shape = self.shape(key)
        if layer is None:
            offsets, dest = (0,) * len(shape), torch.empty(shape, dtype=self.dtype(key))
        else:
            offsets = (layer,) + (0,) * (len(shape) - 1)
            dest = torch.empty((1, *shape[1:]), dtype=self.dtype(key))
        with _single_process():
            dcp_load({}, storage_reader=FileSystemReader(str(self.dir)),
                     planner=_RegionLoadPlanner({key: (offsets, dest)}), no_dist=True)
        return dest if layer is None else dest[0]


def check_model_keys(reader: DistReader, cfg: Qwen2Config) -> int:
    """Raise naming every tensor of `cfg` the checkpoint lacks or holds in another shape;
    returns the padded vocabulary the checkpoint was written with."""
    padded = reader.shape("embedding.word_embeddings.weight")[0] \
        if "embedding.word_embeddings.weight" in reader.index else cfg.vocab_size
    problems = []
    for rule, layer in _te_rules(cfg):
        if layer not in (None, 0):
            continue
        full = M.full_shape(rule, layer, cfg, padded)
        want = (cfg.num_layers, *full) if layer is not None else full
        key = dist_key(rule)
        if key not in reader.index:
            problems.append(f"{key} is missing")
        elif tuple(reader.index[key].size) != want:
            problems.append(f"{key}: shape {tuple(reader.index[key].size)}, the model needs {want}")
    if problems:
        raise ValueError(f"{reader.dir}: the checkpoint does not hold this model: "
                         + "; ".join(problems[:8]))
    return padded
