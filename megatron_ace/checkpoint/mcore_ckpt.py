"""The Megatron checkpoint layout on disk, and streaming conversion HF <-> Megatron at any TP/PP.

Layout of a Megatron checkpoint directory `M`:
- `M/ace_checkpoint.json`: format version, the model as an HF config dict, tp, pp, padded
  vocabulary size, layer spec;
- `M/model/tp{t:02d}_pp{p:03d}.safetensors`: each rank's weights under its LOCAL Megatron-Core
  names (stage-local layer indices, TP slices), exactly what `model.named_parameters()` holds on
  that rank, so a trainer at the same layout loads a file directly;
- `M/tokenizer/`: the tokenizer files of the source model, when it had any.

Conversion walks the one declarative table in `megatron_ace/model/mapping.py` (shared with weight
sync) in model order and streams: every output file's safetensors header is computed up front
from the table, then each tensor is read lazily, merged / split / sharded and appended to its
file. Peak memory is one full Megatron tensor and its shards, never the model.

Not handled: HF checkpoints in `.bin` (pickle) format, and Megatron-LM `torch_dist` checkpoints
(convert those with Megatron-LM's own tools first).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from megatron_ace.checkpoint.stream_writer import StreamingWriter
from megatron_ace.model import mapping as M
from megatron_ace.model.config import Qwen2Config
from megatron_ace.utils.logging import get_logger

log = get_logger(__name__)

META_FILE = "ace_checkpoint.json"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json",
                   "added_tokens.json")


def rank_file(root: Path, tp_rank: int, pp_rank: int) -> Path:
    return Path(root) / "model" / f"tp{tp_rank:02d}_pp{pp_rank:03d}.safetensors"


def read_meta(mcore_dir: str | Path) -> dict[str, Any]:
    path = Path(mcore_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{mcore_dir}: not a Megatron checkpoint (no {META_FILE})")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')} is not "
                         f"{FORMAT_VERSION}")
    return meta


def meta_config(meta: dict[str, Any]) -> Qwen2Config:
    return Qwen2Config.from_hf_config(meta["hf_config"])


# ---- reading HF checkpoints lazily ----------------------------------------------------------
class HFReader:
    """Lazy access to the tensors of an HF safetensors checkpoint (single file or sharded)."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.dir}: no *.safetensors files")
            weight_map = {}
        self._handles = {f: safe_open(str(self.dir / f), framework="pt") for f in files}
        if not weight_map:
            weight_map = {k: f for f, h in self._handles.items() for k in h.keys()}
        self.weight_map = weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.weight_map[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handles[self.weight_map[name]].get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self.weight_map[name]].get_tensor(name)


def validate_hf(reader: HFReader, cfg: Qwen2Config) -> torch.dtype:
    """Names and shapes against the config; returns the checkpoint dtype. Errors name the tensor."""
    expected = M.hf_shapes(cfg)
    found = set(reader.weight_map)
    if cfg.tie_word_embeddings and "lm_head.weight" in found:
        found.discard("lm_head.weight")  # some exports store the tied head too; it is ignored
    missing = sorted(set(expected) - found)
    if missing:
        raise ValueError(f"{reader.dir}: missing tensor(s): {', '.join(missing[:10])}")
    extra = sorted(found - set(expected))
    if extra:
        raise ValueError(f"{reader.dir}: unexpected tensor(s) for a Qwen2 model: "
                         f"{', '.join(extra[:10])}")
    for name, shape in expected.items():
        got = reader.shape(name)
        if got != shape:
            raise ValueError(f"{name}: expected shape {shape} from config.json, found {got}")
    dtypes = {reader.dtype(n) for n in expected}
    if len(dtypes) != 1:
        raise ValueError(f"{reader.dir}: mixed dtypes {sorted(dtypes)}")
    return _torch_dtype(dtypes.pop())


def _torch_dtype(name: str) -> torch.dtype:
    table = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    if name not in table:
        raise ValueError(f"unsupported checkpoint dtype {name}")
    return table[name]


# ---- where each Megatron tensor lives ---------------------------------------------------------
def _placements(cfg: Qwen2Config, spec: M.Spec, tp: int, pp: int
                ) -> Iterator[tuple[M.Rule, int | None, int, str]]:
    """(rule, layer, pp_rank, local name) of every Megatron tensor, in streaming order.

    With tied embeddings under PP the last stage holds its own copy of the embedding as
    `output_layer.weight`; it is listed right after the embedding.
    """
    for rule, layer in M.iter_rules(cfg, spec):
        for stage in range(pp):
            if M.on_stage(rule, layer, stage, pp, cfg):
                offset = M.pp_layer_range(cfg.num_layers, pp, stage).start
                name, _ = M.expand(rule, layer)
                yield rule, layer, stage, M.local_name(name, layer, offset)
        if rule.mcore.startswith("embedding.") and cfg.tie_word_embeddings and pp > 1:
            yield rule, layer, pp - 1, "output_layer.weight"


def _full_shape(rule: M.Rule, layer: int | None, cfg: Qwen2Config, padded: int) -> tuple:
    shapes = M.hf_shapes(cfg)
    parts = [shapes[n] for n in M.expand(rule, layer)[1]]
    rows = padded if rule.vocab else sum(p[0] for p in parts)
    return (rows, *parts[0][1:])


def _shard_shape(rule: M.Rule, full: tuple, tp: int) -> tuple:
    if rule.tp_dim is None or tp == 1:
        return full
    shape = list(full)
    if shape[rule.tp_dim] % tp:
        raise ValueError(f"{rule.mcore}: dim {rule.tp_dim} of {full} does not split into {tp}")
    shape[rule.tp_dim] //= tp
    return tuple(shape)


def _open_writers(out: Path, cfg: Qwen2Config, spec: M.Spec, tp: int, pp: int, padded: int,
                  dtype: torch.dtype) -> dict[tuple[int, int], StreamingWriter]:
    entries: dict[tuple[int, int], list] = {(t, p): [] for t in range(tp) for p in range(pp)}
    for rule, layer, stage, local in _placements(cfg, spec, tp, pp):
        shape = _shard_shape(rule, _full_shape(rule, layer, cfg, padded), tp)
        for t in range(tp):
            entries[(t, stage)].append((local, dtype, shape))
    (out / "model").mkdir(parents=True, exist_ok=True)
    return {key: StreamingWriter(rank_file(out, *key), ents) for key, ents in entries.items()}


def _write_layout(out: Path, cfg: Qwen2Config, spec: M.Spec, tp: int, pp: int, dtype: torch.dtype,
                  full_tensor: Callable[[M.Rule, int | None], torch.Tensor]) -> None:
    """Stream every full Megatron tensor (from `full_tensor`) into the rank files of a layout."""
    if cfg.num_query_groups % tp:
        raise ValueError(f"tp={tp} must divide num_key_value_heads ({cfg.num_query_groups})")
    M.pp_layer_range(cfg.num_layers, pp, 0)  # validates divisibility
    padded = M.padded_vocab_size(cfg.vocab_size, tp)
    writers = _open_writers(out, cfg, spec, tp, pp, padded, dtype)
    try:
        cached: tuple[Any, torch.Tensor] | None = None
        for rule, layer, stage, local in _placements(cfg, spec, tp, pp):
            key = (rule.mcore, layer)
            if cached is None or cached[0] != key:
                cached = (key, full_tensor(rule, layer).to(dtype))
            for t in range(tp):
                writers[(t, stage)].write(local, M.shard(rule, cached[1], t, tp))
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise


def _write_meta(out: Path, cfg: Qwen2Config, spec: M.Spec, tp: int, pp: int, dtype: torch.dtype,
                extra: dict[str, Any] | None = None) -> None:
    hf_config = cfg.to_hf_config()
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    meta = {"format_version": FORMAT_VERSION, "hf_config": hf_config, "tp": tp, "pp": pp,
            "padded_vocab_size": M.padded_vocab_size(cfg.vocab_size, tp), "spec": spec.value,
            **(extra or {})}
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _commit(tmp: Path, out: Path) -> None:
    """Atomic publish: a crash leaves only `<out>.tmp`, never a half-written `<out>`."""
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _tmp_dir(out: Path) -> Path:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)


# ---- the three conversions -------------------------------------------------------------------
def hf_to_mcore(hf_dir: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1,
                spec: M.Spec = M.Spec.LOCAL, **config_overrides: Any) -> Path:
    """HF Qwen2 checkpoint -> Megatron checkpoint at (tp, pp); e.g. rope_theta=1e6 overrides."""
    hf_dir, out = Path(hf_dir), Path(out)
    cfg = Qwen2Config.from_hf_config(hf_dir, **config_overrides)
    reader = HFReader(hf_dir)
    dtype = validate_hf(reader, cfg)
    padded = M.padded_vocab_size(cfg.vocab_size, tp)
    tmp = _tmp_dir(out)

    def full(rule: M.Rule, layer: int | None) -> torch.Tensor:
        _, hf_names = M.expand(rule, layer)
        return M.merge_hf(rule, [reader.get(n) for n in hf_names], cfg, padded)

    _write_layout(tmp, cfg, spec, tp, pp, dtype, full)
    _copy_tokenizer(hf_dir, tmp / "tokenizer")
    _write_meta(tmp, cfg, spec, tp, pp, dtype)
    _commit(tmp, out)
    log.info("wrote Megatron checkpoint %s (tp=%d pp=%d, %s)", out, tp, pp, dtype)
    return out


class McoreReader:
    """Lazy access to a Megatron checkpoint: full (un-sharded) tensors and HF-named tensors."""

    def __init__(self, mcore_dir: str | Path) -> None:
        self.dir = Path(mcore_dir)
        self.meta = read_meta(self.dir)
        self.cfg = meta_config(self.meta)
        self.tp, self.pp = int(self.meta["tp"]), int(self.meta["pp"])
        self.spec = M.Spec(self.meta["spec"])
        self._handles = {}
        for t in range(self.tp):
            for p in range(self.pp):
                path = rank_file(self.dir, t, p)
                if not path.is_file():
                    raise FileNotFoundError(f"{self.dir}: missing rank file {path.name}")
                self._handles[(t, p)] = safe_open(str(path), framework="pt")
        self._hf_index = {hf: (rule, layer, i) for rule, layer in M.iter_rules(self.cfg, self.spec)
                          for i, hf in enumerate(M.expand(rule, layer)[1])}

    @property
    def dtype(self) -> torch.dtype:
        return _torch_dtype(next(iter(self._handles.values())).get_slice(
            next(iter(next(iter(self._handles.values())).keys()))).get_dtype())

    def full_tensor(self, rule: M.Rule, layer: int | None) -> torch.Tensor:
        stage = next(s for s in range(self.pp) if M.on_stage(rule, layer, s, self.pp, self.cfg))
        offset = M.pp_layer_range(self.cfg.num_layers, self.pp, stage).start
        local = M.local_name(M.expand(rule, layer)[0], layer, offset)
        shards = []
        for t in range(self.tp):
            handle = self._handles[(t, stage)]
            if local not in handle.keys():
                raise ValueError(f"{rank_file(self.dir, t, stage)}: missing tensor {local}")
            shards.append(handle.get_tensor(local))
        return M.unshard(rule, shards)

    def hf_tensor(self, name: str) -> torch.Tensor:
        """One HF-named tensor (vocabulary un-padded), for `load_hf_into_model`."""
        if name not in self._hf_index:
            raise KeyError(f"{name}: not a tensor of this model")
        rule, layer, i = self._hf_index[name]
        return M.split_hf(rule, self.full_tensor(rule, layer), self.cfg)[i]

    def iter_hf(self) -> Iterator[tuple[str, torch.Tensor]]:
        for rule, layer in M.iter_rules(self.cfg, self.spec):
            names = M.expand(rule, layer)[1]
            yield from zip(names, M.split_hf(rule, self.full_tensor(rule, layer), self.cfg))


def mcore_to_hf(mcore_dir: str | Path, out: str | Path) -> Path:
    """Megatron checkpoint -> HF directory (safetensors, config.json, tokenizer files)."""
    reader, out = McoreReader(mcore_dir), Path(out)
    cfg, dtype = reader.cfg, reader.dtype
    shapes = M.hf_shapes(cfg)
    names = [n for rule, layer in M.iter_rules(cfg, reader.spec) for n in M.expand(rule, layer)[1]]
    tmp = _tmp_dir(out)
    writer = StreamingWriter(tmp / "model.safetensors", [(n, dtype, shapes[n]) for n in names],
                             metadata={"format": "pt"})
    try:
        for name, tensor in reader.iter_hf():
            writer.write(name, tensor)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    hf_config = dict(reader.meta["hf_config"])
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    _copy_tokenizer(reader.dir / "tokenizer", tmp)
    if not (tmp / "generation_config.json").is_file():
        gen = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id") if hf_config.get(k) is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    _commit(tmp, out)
    log.info("wrote HF checkpoint %s", out)
    return out


def relayout(mcore_dir: str | Path, out: str | Path, *, tp: int, pp: int) -> Path:
    """Rewrite a Megatron checkpoint at another TP/PP, streaming one tensor at a time."""
    reader, out = McoreReader(mcore_dir), Path(out)
    cfg = reader.cfg
    padded = M.padded_vocab_size(cfg.vocab_size, tp)

    def full(rule: M.Rule, layer: int | None) -> torch.Tensor:
        tensor = reader.full_tensor(rule, layer)
        if rule.vocab:  # padding differs between TP degrees
            tensor = M.merge_hf(rule, [tensor[: cfg.vocab_size]], cfg, padded)
        return tensor

    tmp = _tmp_dir(out)
    _write_layout(tmp, cfg, reader.spec, tp, pp, reader.dtype, full)
    if (reader.dir / "tokenizer").is_dir():
        shutil.copytree(reader.dir / "tokenizer", tmp / "tokenizer")
    _write_meta(tmp, cfg, reader.spec, tp, pp, reader.dtype)
    _commit(tmp, out)
    log.info("re-laid out %s -> %s (tp=%d pp=%d)", reader.dir, out, tp, pp)
    return out


def load_into_model(model, mcore_dir: str | Path, ps) -> None:
    """Fill a live model at any TP/PP from a Megatron checkpoint of any TP/PP."""
    from megatron_ace.model.weights import load_hf_into_model

    reader = McoreReader(mcore_dir)
    if (reader.tp, reader.pp) == (ps.tp_size, ps.pp_size):
        handle = reader._handles[(ps.tp_rank, ps.pp_rank)]
        params = dict(model.named_parameters())
        if set(handle.keys()) != set(params):
            raise ValueError(f"{mcore_dir}: rank ({ps.tp_rank}, {ps.pp_rank}) tensors "
                             f"{sorted(set(handle.keys()) ^ set(params))[:5]} do not match the model")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(handle.get_tensor(name))
        return
    load_hf_into_model(model, reader.hf_tensor, reader.cfg, ps)
