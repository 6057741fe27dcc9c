"""Offline, streaming conversion between HF safetensors and megatron-core torch_dist checkpoints.

Every direction walks mapping.py's table in `iter_rules` order: read the HF tensors of one rule
(lazily, from an HF directory, or one layer at a time from a torch_dist checkpoint), merge them
into the full Megatron tensor, and stream its TP chunks into the torch_dist writer
(`torch_dist.py`), or split it back into HF tensors. Peak memory is about one rule's tensors,
not the model. Merge, split, shard and un-shard are pure permutations, so HF -> Megatron -> HF
is bit-identical and dtypes are never cast. Output directories are committed atomically
(atomic.py): an existing output is replaced only by a complete new one.

The previous release's safetensors-per-rank checkpoints are still read (`LegacySource`);
`relayout` rewrites one as torch_dist.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from megatron_ace.checkpoint import atomic
from megatron_ace.checkpoint import mcore_format as F
from megatron_ace.checkpoint import torch_dist as D
from megatron_ace.checkpoint.safetensors_stream import (INDEX_NAME, LazyReader, StreamingWriter,
                                                        TensorEntry)
from megatron_ace.model import mapping as M
from megatron_ace.model.config import Qwen2Config
from megatron_ace.utils.logging import get_logger

log = get_logger(__name__)
# Buffers some older HF checkpoints carry; they are recomputed, never weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json",
                   "chat_template.jinja")
RuleSource = Callable[[M.Rule, int | None], list[torch.Tensor]]


class HFSource:
    """HF tensors of each rule, read lazily from an HF directory after validating it whole."""

    def __init__(self, hf_dir: str | Path, cfg: Qwen2Config) -> None:
        self.reader = LazyReader(hf_dir)
        self.cfg = cfg
        expected = M.hf_shapes(cfg)
        present = set(self.reader.names())
        missing = [n for n in expected if n not in present]
        if missing:
            raise ValueError(f"{hf_dir}: missing tensor(s): {', '.join(missing[:8])}")
        extra = sorted(n for n in present - set(expected) if not n.endswith(_IGNORED_SUFFIXES))
        if cfg.tie_word_embeddings and "lm_head.weight" in extra:
            if not torch.equal(self.reader.get("lm_head.weight"),
                               self.reader.get("model.embed_tokens.weight")):
                raise ValueError("lm_head.weight: tie_word_embeddings is true but lm_head.weight "
                                 "differs from model.embed_tokens.weight")
            log.info("lm_head.weight equals the tied embedding: ignored")
            extra.remove("lm_head.weight")
        if extra:
            raise ValueError(f"{hf_dir}: unexpected tensor(s): {', '.join(extra[:8])}")
        self.dtype = self.reader.dtype("model.embed_tokens.weight")
        for name, shape in expected.items():
            found = self.reader.shape(name)
            if found != shape:
                raise ValueError(f"{name}: expected shape {shape}, found {found}")
            if self.reader.dtype(name) != self.dtype:
                raise ValueError(f"{name}: dtype {self.reader.dtype(name)} differs from "
                                 f"model.embed_tokens.weight's {self.dtype} (mixed dtypes)")
        if not self.dtype.is_floating_point:
            raise ValueError(f"model.embed_tokens.weight: dtype {self.dtype} is not floating")

    def __call__(self, rule: M.Rule, layer: int | None) -> list[torch.Tensor]:
        return [self.reader.get(n) for n in M.expand(rule, layer)[1]]


class LegacySource:
    """HF tensors of each rule, rebuilt from the previous release's safetensors-per-rank files."""

    def __init__(self, mcore_dir: str | Path, meta: F.CheckpointMeta) -> None:
        self.dir = Path(mcore_dir)
        self.meta = meta
        self._readers: dict[tuple[int, int], LazyReader] = {}
        for t in range(self.meta.tp):
            for p in range(self.meta.pp):
                path = F.rank_file(mcore_dir, t, p)
                if not path.is_file():
                    raise FileNotFoundError(f"{path}: rank file missing")
                reader = LazyReader(path)
                want = {e.name: e.shape for e, _, _ in F.rank_entries(self.meta, t, p)}
                for name, shape in want.items():
                    if name not in reader:
                        raise ValueError(f"{path}: missing tensor {name}")
                    if reader.shape(name) != shape:
                        raise ValueError(f"{path}: {name}: expected shape {shape}, "
                                         f"found {reader.shape(name)}")
                self._readers[(t, p)] = reader
        # Rules are matched by their HF names: the files use the names of their layer spec.
        self._rules = {r.hf: r for r in M.rules(meta.model, meta.spec)}

    def full(self, rule: M.Rule, layer: int | None) -> torch.Tensor:
        """The full Megatron tensor of a rule (vocabulary still padded)."""
        cfg, meta = self.meta.model, self.meta
        rule = self._rules[rule.hf]
        stage = next(s for s in range(meta.pp) if M.on_stage(rule, layer, s, meta.pp, cfg))
        offset = M.pp_layer_range(cfg.num_layers, meta.pp, stage).start
        name = M.local_name(M.expand(rule, layer)[0], layer, offset)
        shards = [self._readers[(t, stage)].get(name) for t in range(meta.tp)]
        return M.unshard(rule, shards)

    def __call__(self, rule: M.Rule, layer: int | None) -> list[torch.Tensor]:
        return M.split_hf(rule, self.full(rule, layer), self.meta.model)


class DistSource:
    """HF tensors of each rule, read one layer at a time from a torch_dist checkpoint (a model
    checkpoint or a training checkpoint, whose model tensors have the same names)."""

    def __init__(self, directory: str | Path, meta: F.CheckpointMeta) -> None:
        self.meta = meta
        self.reader = D.DistReader(directory)
        self.padded_vocab = D.check_model_keys(self.reader, meta.model)
        self.dtype = self.reader.dtype("embedding.word_embeddings.weight")
        # Rules are matched by their HF names: the checkpoint uses the TE spec's names.
        self._te_rules = {r.hf: r for r in M.rules(meta.model, M.Spec.TE)}

    def full(self, rule: M.Rule, layer: int | None) -> torch.Tensor:
        """The full Megatron tensor of a rule (vocabulary still padded)."""
        return self.reader.read(D.dist_key(self._te_rules[rule.hf]), layer)

    def __call__(self, rule: M.Rule, layer: int | None) -> list[torch.Tensor]:
        return M.split_hf(rule, self.full(rule, layer), self.meta.model)


def open_source(directory: str | Path) -> tuple[RuleSource, F.CheckpointMeta]:
    """A rule source over a Megatron checkpoint of either format, and its meta."""
    meta = F.read_meta(directory)
    if meta.format == F.SAFETENSORS_PER_RANK:
        return LegacySource(directory, meta), meta
    source = DistSource(directory, meta)
    meta.padded_vocab = source.padded_vocab
    return source, meta


def _hf_plan(cfg: Qwen2Config, dtype: torch.dtype, max_shard_bytes: int
             ) -> list[list[TensorEntry]]:
    shapes = M.hf_shapes(cfg)
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for rule, layer in M.iter_rules(cfg):
        for name in M.expand(rule, layer)[1]:
            e = TensorEntry(name=name, shape=shapes[name], dtype=dtype)
            if shards[-1] and size + e.num_bytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(e)
            size += e.num_bytes
    return shards


def write_hf(source: RuleSource, cfg: Qwen2Config, dtype: torch.dtype, out_dir: Path,
             max_shard_bytes: int = 5 * 2**30) -> int:
    """Stream HF safetensors (sharded with an index past `max_shard_bytes`); returns bytes."""
    plan = _hf_plan(cfg, dtype, max_shard_bytes)
    files = (["model.safetensors"] if len(plan) == 1 else
             [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    file_of = {e.name: f for f, entries in zip(files, plan) for e in entries}
    writers = {f: StreamingWriter(out_dir / f, entries, {"format": "pt"})
               for f, entries in zip(files, plan)}
    total = 0
    try:
        for rule, layer in M.iter_rules(cfg):
            for name, tensor in zip(M.expand(rule, layer)[1], source(rule, layer)):
                writers[file_of[name]].write(name, tensor)
                total += tensor.numel() * tensor.element_size()
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    if len(plan) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": file_of}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return total


def _copy_tokenizer(src: Path, dst: Path) -> bool:
    copied = False
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
            copied = True
    return copied


def _report(what: str, nbytes: int, t0: float) -> None:
    dt = time.perf_counter() - t0
    log.info("%s: %.1f MB in %.2f s (%.2f GB/s)", what, nbytes / 1e6, dt, nbytes / 1e9 / dt)


def _write_checkpoint(source: RuleSource, meta: F.CheckpointMeta, out: Path, *,
                      tokenizer_src: Path | None) -> int:
    """torch_dist tensors, tokenizer and meta into `<out>.tmp`, then one atomic rename; returns
    bytes. An existing `out` is left untouched until the new checkpoint is complete."""
    tmp = atomic.tmp_dir_for(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        nbytes = D.write_model(source, meta.model, tp=meta.tp, padded_vocab=meta.padded_vocab,
                               dtype=meta.torch_dtype, out_dir=tmp)
        if tokenizer_src is not None and _copy_tokenizer(tokenizer_src, tmp / "tokenizer"):
            meta.tokenizer_dir = "tokenizer"
        F.write_meta(tmp, meta)
        atomic.commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return nbytes


def hf_to_mcore(hf_dir: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1,
                rope_theta: float | None = None) -> Path:
    """Convert an HF Qwen2 directory into a torch_dist checkpoint chunked for (tp, pp)."""
    hf_dir, out = Path(hf_dir), Path(out)
    t0 = time.perf_counter()
    overrides = {} if rope_theta is None else {"rope_theta": rope_theta}
    cfg = Qwen2Config.from_hf_config(hf_dir, **overrides)
    source = HFSource(hf_dir, cfg)
    dtype_name = str(source.dtype).removeprefix("torch.")
    meta = F.CheckpointMeta(model=cfg.replace(torch_dtype=dtype_name), tp=tp, pp=pp,
                            dtype=dtype_name)
    nbytes = _write_checkpoint(source, meta, out, tokenizer_src=hf_dir)
    _report(f"hf-to-mcore tp={tp} pp={pp}", nbytes, t0)
    return out


def relayout(mcore_dir: str | Path, out: str | Path, *, tp: int, pp: int) -> Path:
    """Rewrite a Megatron checkpoint (either format, or a training checkpoint's model) as a
    torch_dist model checkpoint chunked for (tp, pp)."""
    t0 = time.perf_counter()
    source, old = open_source(mcore_dir)
    meta = F.CheckpointMeta(model=old.model, tp=tp, pp=pp, dtype=old.dtype,
                            iteration=old.iteration)
    tokenizer_src = Path(mcore_dir) / old.tokenizer_dir if old.tokenizer_dir else None
    nbytes = _write_checkpoint(source, meta, Path(out), tokenizer_src=tokenizer_src)
    _report(f"relayout tp={old.tp} pp={old.pp} -> tp={tp} pp={pp}", nbytes, t0)
    return Path(out)


def mcore_to_hf(mcore_dir: str | Path, out: str | Path,
                max_shard_bytes: int = 5 * 2**30) -> Path:
    """Export a Megatron checkpoint (either format, or a training checkpoint's model) as HF
    safetensors + config + tokenizer files."""
    t0 = time.perf_counter()
    source, meta = open_source(mcore_dir)
    out = Path(out)
    tmp = atomic.tmp_dir_for(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        nbytes = write_hf(source, meta.model, meta.torch_dtype, tmp, max_shard_bytes)
        hf_cfg = meta.model.to_hf_config()
        hf_cfg["torch_dtype"] = meta.dtype
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        if meta.tokenizer_dir:
            _copy_tokenizer(Path(mcore_dir) / meta.tokenizer_dir, tmp)
        if not (tmp / "generation_config.json").is_file():
            gen = {"bos_token_id": meta.model.bos_token_id, "eos_token_id": meta.model.eos_token_id}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        atomic.commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _report("mcore-to-hf", nbytes, t0)
    return out


def load_into_model(model, mcore_dir: str | Path, cfg: Qwen2Config, ps) -> None:
    """Fill a live model (any TP/PP) from a Megatron checkpoint (any TP/PP); collective.

    torch_dist: megatron-core's own distributed load (every rank reads what it holds). The
    previous safetensors-per-rank format: each rank loads its own file at the same layout,
    otherwise the full tensors are rebuilt from the shards through the mapping and re-sharded.
    """
    from megatron_ace.checkpoint.dist_io import load_model
    from megatron_ace.model.weights import load_hf_into_model

    meta = F.read_meta(mcore_dir)
    if meta.format == F.TORCH_DIST:
        D.check_model_keys(D.DistReader(mcore_dir), cfg)
        load_model(model, mcore_dir, dp_group=ps.dp_group)
        return
    if (meta.tp, meta.pp, meta.spec) == (ps.tp_size, ps.pp_size, model.ace_spec):
        state = F.load_rank_state(mcore_dir, ps.tp_rank, ps.pp_rank)
        F.check_keys(model, state, f"{mcore_dir} tp{ps.tp_rank} pp{ps.pp_rank}")
        with torch.no_grad():
            for k, v in state.items():
                model.state_dict()[k].copy_(v)
        return
    source = LegacySource(mcore_dir, meta)
    owner = {}
    for rule, layer in M.iter_rules(cfg, meta.spec):
        for i, name in enumerate(M.expand(rule, layer)[1]):
            owner[name] = (rule, layer, i)
    cache: dict = {}

    def get_hf(name: str) -> torch.Tensor:
        rule, layer, i = owner[name]
        if cache.get("key") != (rule.mcore, layer):
            cache.update(key=(rule.mcore, layer), tensors=source(rule, layer))
        return cache["tensors"][i]

    load_hf_into_model(model, get_hf, cfg, ps)
