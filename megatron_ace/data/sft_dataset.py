"""SFT data: rows of prompts and responses in any understood layout -> tokenized ChatML samples.

What it does:
- Reads every file through `tables.py` (JSONL, JSON arrays, parquet, `datasets` Arrow
  directories and shards, or folders of them) and reads each row in its layout through
  `layouts.py`: nvidia/AceReason-1.1-SFT (`category`, `input`, `output` with the `<think>`
  trace inside `output`), OpenAI `messages`, ShareGPT `conversations`, TRL
  `prompt`/`completion`, `problem`/`solution`, our own `prompt` + `response(s)`, or any other
  columns mapped with `fields` (`data.fields.prompt=instruction data.fields.response=output`).
  A malformed row is reported with its file, row (from 1) and field.
- Every kept response becomes one sample {input_ids, loss_mask} rendered in ChatML with the
  configured system prompt (rows that carry their own system message keep it; `auto` picks the
  math or code prompt from the row's domain, e.g. AceReason's `category`). The whole response,
  reasoning trace included, is in the loss.
- Options: cap responses per prompt (counted over all rows of the same prompt, in file order,
  since AceReason-1.1-SFT stores one row per response), drop responses shorter than N tokens,
  overlong samples truncated or dropped, malformed rows raise (`on_bad_row=error`) or are
  skipped; every outcome is counted in `SFTDataStats` (never a silent drop).
- Tokenizes in parallel worker processes (`Dataset.map(num_proc=...)`) and caches the result
  on disk under a key of (file contents, tokenizer, options, format version).

What it does not do: packing or batching (see `packing.py`), decontamination (`decontam.py`).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from megatron_ace.config.base import to_dict
from megatron_ace.data.chat import Role, SystemPrompt, encode_chat, system_prompt_text
from megatron_ace.data.layouts import FieldMap, RecordKind, parse_record
from megatron_ace.data.tables import (
    BadRowPolicy,
    RowError,
    Table,
    batch_rows,
    expand_paths,
    open_table,
    row_error,
)
from megatron_ace.utils.logging import get_logger

logger = get_logger(__name__)

# Bump when the sample format or the row rules change, so old caches are not reused.
_CACHE_VERSION = "2"
_MAX_ERRORS_KEPT = 20


class OverlongPolicy(enum.Enum):
    TRUNCATE = "truncate"
    DROP = "drop"


class SampleStatus(enum.Enum):
    """Outcome of one response (or, for BAD_ROW, of a whole row)."""

    KEPT = "kept"
    TRUNCATED = "truncated"
    TOO_SHORT = "too_short"
    OVERLONG = "overlong"
    BAD_ROW = "bad_row"
    BLANK_LINE = "blank_line"


_KEEP = frozenset({SampleStatus.KEPT.value, SampleStatus.TRUNCATED.value})


@dataclasses.dataclass(kw_only=True)
class SFTDataConfig:
    paths: list[str]
    """Data files or folders, read in order: .jsonl, .json (array or one object per line),
    .parquet, `datasets` save_to_disk directories, .arrow shards, or folders of these."""
    tokenizer: str = "qwen2.5"
    """Tokenizer directory, or "qwen2.5" for the bundled Qwen2.5 tokenizer."""
    system_prompt: SystemPrompt = SystemPrompt.MATH
    """System message added to every prompt; AUTO picks math/code from each row's domain
    (`category` in AceReason-1.1-SFT, `domain` elsewhere)."""
    fields: FieldMap = dataclasses.field(default_factory=FieldMap)
    """Column mapping for layouts not understood as they are (`fields.prompt=instruction`)."""
    max_responses_per_prompt: int = 0
    """Keep at most this many responses per prompt (the first ones that pass, counted over all
    rows with the same prompt); 0 keeps all."""
    min_response_tokens: int = 1
    """Drop responses with fewer tokens than this (assistant content, without `<|im_end|>`)."""
    max_seq_len: int = 32768
    """Longest sample in token ids (prompt + response); longer ones follow `overlong`."""
    overlong: OverlongPolicy = OverlongPolicy.DROP
    """DROP overlong samples, or TRUNCATE them to `max_seq_len` (both counted; a truncation
    that keeps no response token is counted as a drop)."""
    on_bad_row: BadRowPolicy = BadRowPolicy.ERROR
    """ERROR: raise naming file and row; SKIP: skip malformed rows and count them."""
    num_proc: int = 1
    """Worker processes for tokenization."""
    cache_dir: str = ""
    """Where tokenized datasets are cached; "" means $ACE_CACHE_DIR/sft or ~/.cache/megatron_ace/sft."""

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError("paths must name at least one file")
        if self.max_responses_per_prompt < 0:
            raise ValueError(
                f"max_responses_per_prompt must be >= 0, got {self.max_responses_per_prompt}"
            )
        if self.min_response_tokens < 0:
            raise ValueError(f"min_response_tokens must be >= 0, got {self.min_response_tokens}")
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.num_proc < 1:
            raise ValueError(f"num_proc must be >= 1, got {self.num_proc}")


@dataclasses.dataclass(kw_only=True)
class SFTDataStats:
    """What happened to every row and response (saved next to the cache)."""

    num_rows: int = 0
    num_bad_rows: int = 0
    num_blank_lines: int = 0
    num_responses: int = 0
    num_samples: int = 0
    num_truncated: int = 0
    num_too_short: int = 0
    num_overlong_dropped: int = 0
    num_over_cap: int = 0
    num_tokens: int = 0
    num_loss_tokens: int = 0
    rows_by_layout: dict[str, int] = dataclasses.field(default_factory=dict)
    bad_row_errors: list[str] = dataclasses.field(default_factory=list)
    cache_hit: bool = False


@dataclasses.dataclass
class SFTDataset:
    """Tokenized samples: `dataset[i]` = {input_ids, loss_mask, num_tokens, source, row,
    response_index, layout}."""

    dataset: Any
    stats: SFTDataStats
    cache_path: Path

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.dataset[i]

    @property
    def lengths(self) -> list[int]:
        return list(self.dataset["num_tokens"])


_COLUMNS = ("input_ids", "loss_mask", "num_tokens", "row", "response_index", "status", "error",
            "prompt_key", "layout")


def _empty_output() -> dict[str, list]:
    return {k: [] for k in _COLUMNS}


@dataclasses.dataclass(frozen=True)
class _RowInfo:
    number: int
    prompt_key: str = ""
    layout: str = ""


def _emit(out: dict[str, list], row: _RowInfo, k: int, status: SampleStatus, ids=(), mask=(),
          error="") -> None:
    out["input_ids"].append(list(ids))
    out["loss_mask"].append(list(mask))
    out["num_tokens"].append(len(ids))
    out["row"].append(row.number)
    out["response_index"].append(k)
    out["status"].append(status.value)
    out["error"].append(error)
    out["prompt_key"].append(row.prompt_key)
    out["layout"].append(row.layout)


def _encode_row(row: Any, row_number: int, opts: Mapping[str, Any], tokenizer: Any,
                out: dict[str, list]) -> None:
    """Append one output record per response (or one BAD_ROW record) for a row.

    Over-cap responses are decided later, over all rows of the same prompt (`_apply_cap`)."""
    try:
        if isinstance(row, RowError):
            raise row
        record = parse_record(row, [RecordKind.CONVERSATION], FieldMap(**opts["fields"]))
        has_system = record.prompt[0]["role"] == Role.SYSTEM.value
        system = None if has_system else system_prompt_text(
            SystemPrompt(opts["system_prompt"]), record.domain)
    except (RowError, ValueError, TypeError) as exc:
        _emit(out, _RowInfo(row_number), -1, SampleStatus.BAD_ROW,
              error=row_error(opts["source"], row_number, str(exc)))
        return
    info = _RowInfo(row_number, record.prompt_key(), record.layout.value)
    prefix = ([{"role": Role.SYSTEM.value, "content": system}] if system is not None else []) \
        + record.prompt
    for k, response in enumerate(record.responses):
        enc = encode_chat(tokenizer, prefix + [{"role": Role.ASSISTANT.value, "content": response}])
        ids, mask = enc.input_ids, enc.loss_mask
        if sum(mask) - 1 < opts["min_response_tokens"]:
            _emit(out, info, k, SampleStatus.TOO_SHORT)
            continue
        status = SampleStatus.KEPT
        if len(ids) > opts["max_seq_len"]:
            # A truncation that leaves no response token to learn from is a drop, not a sample.
            no_target_left = not any(mask[: opts["max_seq_len"]])
            if opts["overlong"] == OverlongPolicy.DROP.value or no_target_left:
                _emit(out, info, k, SampleStatus.OVERLONG)
                continue
            ids, mask, status = ids[: opts["max_seq_len"]], mask[: opts["max_seq_len"]], \
                SampleStatus.TRUNCATED
        _emit(out, info, k, status, ids, mask)


def _tokenize_batch(batch: Mapping[str, list], indices: list[int], *, opts: Mapping[str, Any],
                    tokenizer: Any) -> dict[str, list]:
    """`Dataset.map(batched=True)` body: raw rows -> one record per response."""
    out = _empty_output()
    for index, row in zip(indices, batch_rows(opts["json_text"], batch)):
        if row is None:
            _emit(out, _RowInfo(index + 1), -1, SampleStatus.BLANK_LINE)
        else:
            _encode_row(row, index + 1, opts, tokenizer, out)
    return out


def _features() -> Any:
    from datasets import Features, Sequence, Value

    return Features({
        "input_ids": Sequence(Value("int32")), "loss_mask": Sequence(Value("int8")),
        "num_tokens": Value("int32"), "row": Value("int64"), "response_index": Value("int32"),
        "status": Value("string"), "error": Value("string"), "prompt_key": Value("string"),
        "layout": Value("string"),
    })


def _content_sha256(path: Path) -> str:
    """Digest of a file, or of every file (names and contents) under a directory."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else "").encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _cache_root(cfg: SFTDataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("ACE_CACHE_DIR", Path.home() / ".cache" / "megatron_ace")) / "sft"


def cache_key(cfg: SFTDataConfig, tokenizer_fp: str) -> str:
    """Hash of (file contents in order, tokenizer fingerprint, options that change samples)."""
    options = {k: v for k, v in to_dict(cfg).items()
               if k not in ("paths", "num_proc", "cache_dir", "tokenizer")}
    payload = {
        "version": _CACHE_VERSION,
        "files": [_content_sha256(p) for p in expand_paths(cfg.paths)],
        "tokenizer": tokenizer_fp,
        "options": options,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _tokenize_table(table: Table, cfg: SFTDataConfig, tokenizer: Any, key: str,
                    work_dir: Path) -> Any:
    raw = table.dataset
    fingerprint = hashlib.sha256(f"{key}:{table.source}".encode()).hexdigest()[:16]
    opts = {
        "json_text": table.is_json_text,
        "source": table.source,
        "fields": to_dict(cfg.fields),
        "system_prompt": cfg.system_prompt.value,
        "min_response_tokens": cfg.min_response_tokens,
        "max_seq_len": cfg.max_seq_len,
        "overlong": cfg.overlong.value,
    }
    return raw.map(
        _tokenize_batch,
        batched=True,
        batch_size=64,
        with_indices=True,
        remove_columns=raw.column_names,
        features=_features(),
        fn_kwargs={"opts": opts, "tokenizer": tokenizer},
        num_proc=cfg.num_proc if cfg.num_proc > 1 and len(raw) > 1 else None,
        # Our own cache key already covers inputs and options; skip hashing the tokenizer.
        new_fingerprint=fingerprint,
        # Never next to the input: `datasets` would write into the user's Arrow directory.
        cache_file_name=str(work_dir / f"tokenized-{fingerprint}.arrow"),
        desc=f"tokenizing {Path(table.source).name}",
    )


def _apply_cap(records: Any, cap: int) -> tuple[list[int], int]:
    """Indices of kept samples, and how many were over `cap` responses of their prompt.

    Counted in file order over all rows, because one prompt may span many rows."""
    seen: Counter = Counter()
    keep, over = [], 0
    for i, (status, key) in enumerate(zip(records["status"], records["prompt_key"])):
        if status not in _KEEP:
            continue
        seen[key] += 1
        if cap and seen[key] > cap:
            over += 1
            continue
        keep.append(i)
    return keep, over


def _collect_stats(records: Any, kept: Any, num_over_cap: int) -> SFTDataStats:
    counts = Counter(records["status"])
    bad = records.filter(lambda s: s == SampleStatus.BAD_ROW.value, input_columns="status")
    firsts = records.filter(lambda k: k == 0, input_columns="response_index")
    stats = SFTDataStats(
        num_bad_rows=counts[SampleStatus.BAD_ROW.value],
        num_blank_lines=counts[SampleStatus.BLANK_LINE.value],
        num_truncated=sum(1 for s in kept["status"] if s == SampleStatus.TRUNCATED.value),
        num_too_short=counts[SampleStatus.TOO_SHORT.value],
        num_overlong_dropped=counts[SampleStatus.OVERLONG.value],
        num_over_cap=num_over_cap,
        num_samples=len(kept),
        num_tokens=int(sum(kept["num_tokens"])),
        num_loss_tokens=int(sum(sum(m) for m in kept["loss_mask"])),
        rows_by_layout=dict(Counter(firsts["layout"])),
        bad_row_errors=list(bad["error"][:_MAX_ERRORS_KEPT]),
    )
    stats.num_responses = sum(
        n for s, n in counts.items()
        if s not in (SampleStatus.BAD_ROW.value, SampleStatus.BLANK_LINE.value))
    stats.num_rows = len(set(zip(records["source"], records["row"]))) - stats.num_blank_lines
    return stats


def _load_cached(target: Path) -> SFTDataset | None:
    import datasets

    if not (target / "stats.json").is_file():
        return None
    stats = SFTDataStats(**json.loads((target / "stats.json").read_text()))
    stats.cache_hit = True
    logger.info("SFT data: cache hit %s (%d samples)", target, stats.num_samples)
    return SFTDataset(datasets.load_from_disk(str(target / "dataset")), stats, target)


def build_sft_dataset(cfg: SFTDataConfig, tokenizer: Any = None) -> SFTDataset:
    """Tokenized SFT samples for `cfg` (from the on-disk cache when inputs are unchanged)."""
    import datasets

    from megatron_ace.data.tokenizer import load_tokenizer, tokenizer_fingerprint

    units = expand_paths(cfg.paths)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
    key = cache_key(cfg, tokenizer_fingerprint(tokenizer))
    root = _cache_root(cfg)
    target = root / key
    cached = _load_cached(target)
    if cached is not None:
        return cached
    if cfg.num_proc > 1:
        # Fork-based workers plus the Rust tokenizer's own thread pool can deadlock.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    (root / "hf").mkdir(parents=True, exist_ok=True)
    parts = []
    for unit in units:
        table = open_table(unit, cache_dir=root / "hf")
        part = _tokenize_table(table, cfg, tokenizer, key, root / "hf")
        parts.append(part.add_column("source", [table.source] * len(part)))
    records = datasets.concatenate_datasets(parts)
    keep, num_over_cap = _apply_cap(records, cfg.max_responses_per_prompt)
    kept = records.select(keep)
    stats = _collect_stats(records, kept, num_over_cap)
    if stats.num_bad_rows and cfg.on_bad_row is BadRowPolicy.ERROR:
        raise ValueError(f"{stats.num_bad_rows} malformed row(s) (on_bad_row=error); first: "
                         f"{stats.bad_row_errors[0]}")
    for err in stats.bad_row_errors:
        logger.warning("skipped malformed row: %s", err)
    kept = kept.remove_columns(["status", "error", "prompt_key"])
    tmp = root / f".{key}.tmp{os.getpid()}"
    kept.save_to_disk(str(tmp / "dataset"))
    (tmp / "stats.json").write_text(json.dumps(dataclasses.asdict(stats), indent=2) + "\n")
    try:
        os.replace(tmp, target)
    except OSError:
        # Another process wrote the same key first; its content is identical.
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("SFT data: %s",
                {k: v for k, v in dataclasses.asdict(stats).items() if k != "bad_row_errors"})
    return SFTDataset(datasets.load_from_disk(str(target / "dataset")), stats, target)
