"""SFT data: JSONL / parquet rows of prompts and responses -> tokenized ChatML samples.

What it does:
- Reads each file with the `datasets` library. JSONL is read line by line (the `text` loader)
  and every line parsed in the worker, so a malformed row is reported with its file and line
  number instead of failing inside a schema-inferring JSON reader. Parquet rows are numbered
  from 1 in file order.
- A row is a prompt (`prompt` str, or chat `messages` [{role, content}, ...]) with one or
  more responses (`response` str or `responses` list of str; or a final assistant message in
  `messages`). Every kept response becomes one sample {input_ids, loss_mask} rendered in ChatML
  with the configured system prompt (rows that carry their own system message keep it).
- Options: cap responses per prompt, drop responses shorter than N tokens, overlong samples
  truncated or dropped, malformed rows raise (`on_bad_row=error`) or are skipped; every
  outcome is counted in `SFTDataStats` (never a silent drop).
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
from megatron_ace.utils.logging import get_logger

logger = get_logger(__name__)

# Bump when the sample format or the row rules change, so old caches are not reused.
_CACHE_VERSION = "1"
_MAX_ERRORS_KEPT = 20


class OverlongPolicy(enum.Enum):
    TRUNCATE = "truncate"
    DROP = "drop"


class BadRowPolicy(enum.Enum):
    ERROR = "error"
    SKIP = "skip"


class SampleStatus(enum.Enum):
    """Outcome of one response (or, for BAD_ROW, of a whole row)."""

    KEPT = "kept"
    TRUNCATED = "truncated"
    TOO_SHORT = "too_short"
    OVERLONG = "overlong"
    OVER_CAP = "over_cap"
    BAD_ROW = "bad_row"
    BLANK_LINE = "blank_line"


_KEEP = frozenset({SampleStatus.KEPT.value, SampleStatus.TRUNCATED.value})


@dataclasses.dataclass(kw_only=True)
class SFTDataConfig:
    paths: list[str]
    """JSONL (.jsonl, or .json with one object per line) or .parquet files, read in order."""
    tokenizer: str = "qwen2.5"
    """Tokenizer directory, or "qwen2.5" for the bundled Qwen2.5 tokenizer."""
    system_prompt: SystemPrompt = SystemPrompt.MATH
    """System message added to every prompt; AUTO picks math/code from each row's `domain`."""
    max_responses_per_prompt: int = 0
    """Keep at most this many responses per prompt (the first ones that pass); 0 keeps all."""
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
    bad_row_errors: list[str] = dataclasses.field(default_factory=list)
    cache_hit: bool = False


@dataclasses.dataclass
class SFTDataset:
    """Tokenized samples: `dataset[i]` = {input_ids, loss_mask, num_tokens, source, row, response_index}."""

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


class RowError(ValueError):
    """A malformed row; the message says what is wrong (the caller adds file and row)."""


def _check_text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{field} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError(f"{field} is empty")
    return value


def parse_row(row: Any) -> tuple[list[dict[str, str]], list[str], str | None]:
    """(prompt messages, responses, domain) of one row; RowError if malformed."""
    if not isinstance(row, Mapping):
        raise RowError(f"row must be a JSON object, got {type(row).__name__}")
    responses: list[str] = []
    if row.get("messages") is not None:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise RowError("messages must be a non-empty list")
        parsed = []
        for k, m in enumerate(messages):
            if not isinstance(m, Mapping) or m.get("role") not in {r.value for r in Role}:
                raise RowError(f"messages[{k}] must be {{role: system|user|assistant, content}}")
            parsed.append(
                {
                    "role": m["role"],
                    "content": _check_text(m.get("content"), f"messages[{k}].content"),
                }
            )
        if (
            parsed[-1]["role"] == Role.ASSISTANT.value
            and row.get("response") is None
            and row.get("responses") is None
        ):
            responses = [parsed.pop()["content"]]
        if not parsed or parsed[-1]["role"] != Role.USER.value:
            raise RowError("messages must end with a user turn (before the response)")
    elif row.get("prompt") is not None:
        parsed = [{"role": Role.USER.value, "content": _check_text(row["prompt"], "prompt")}]
    else:
        raise RowError("missing 'prompt' (or 'messages')")
    if row.get("response") is not None and row.get("responses") is not None:
        raise RowError("has both 'response' and 'responses'; use one")
    if row.get("responses") is not None:
        if not isinstance(row["responses"], list) or not row["responses"]:
            raise RowError("responses must be a non-empty list of strings")
        responses = [_check_text(r, f"responses[{k}]") for k, r in enumerate(row["responses"])]
    elif row.get("response") is not None:
        responses = [_check_text(row["response"], "response")]
    if not responses:
        raise RowError("missing 'response' (or 'responses')")
    domain = row.get("domain")
    return parsed, responses, domain if isinstance(domain, str) else None


def _empty_output() -> dict[str, list]:
    return {
        k: []
        for k in (
            "input_ids",
            "loss_mask",
            "num_tokens",
            "row",
            "response_index",
            "status",
            "error",
        )
    }


def _emit(
    out: dict[str, list], row: int, k: int, status: SampleStatus, ids=(), mask=(), error=""
) -> None:
    out["input_ids"].append(list(ids))
    out["loss_mask"].append(list(mask))
    out["num_tokens"].append(len(ids))
    out["row"].append(row)
    out["response_index"].append(k)
    out["status"].append(status.value)
    out["error"].append(error)


def _encode_row(
    row: Any, row_number: int, opts: Mapping[str, Any], tokenizer: Any, out: dict[str, list]
) -> None:
    """Append one output record per response (or one BAD_ROW record) for a parsed row."""
    try:
        prompt_messages, responses, domain = parse_row(row)
        has_system = prompt_messages[0]["role"] == Role.SYSTEM.value
        system = (
            None if has_system else system_prompt_text(SystemPrompt(opts["system_prompt"]), domain)
        )
    except (RowError, ValueError, TypeError) as exc:
        _emit(
            out,
            row_number,
            -1,
            SampleStatus.BAD_ROW,
            error=f"{opts['source']}: row {row_number}: {exc}",
        )
        return
    prefix = (
        [{"role": Role.SYSTEM.value, "content": system}] if system is not None else []
    ) + prompt_messages
    kept = 0
    for k, response in enumerate(responses):
        if opts["cap"] and kept >= opts["cap"]:
            _emit(out, row_number, k, SampleStatus.OVER_CAP)
            continue
        enc = encode_chat(tokenizer, prefix + [{"role": Role.ASSISTANT.value, "content": response}])
        ids, mask = enc.input_ids, enc.loss_mask
        if sum(mask) - 1 < opts["min_response_tokens"]:
            _emit(out, row_number, k, SampleStatus.TOO_SHORT)
            continue
        status = SampleStatus.KEPT
        if len(ids) > opts["max_seq_len"]:
            # A truncation that leaves no response token to learn from is a drop, not a sample.
            no_target_left = not any(mask[: opts["max_seq_len"]])
            if opts["overlong"] == OverlongPolicy.DROP.value or no_target_left:
                _emit(out, row_number, k, SampleStatus.OVERLONG)
                continue
            ids, mask, status = (
                ids[: opts["max_seq_len"]],
                mask[: opts["max_seq_len"]],
                SampleStatus.TRUNCATED,
            )
        kept += 1
        _emit(out, row_number, k, status, ids, mask)


def _tokenize_batch(
    batch: Mapping[str, list], indices: list[int], *, opts: Mapping[str, Any], tokenizer: Any
) -> dict[str, list]:
    """`Dataset.map(batched=True)` body: raw rows -> one record per response."""
    out = _empty_output()
    is_jsonl = opts["format"] == "jsonl"
    columns = list(batch)
    for j, index in enumerate(indices):
        row_number = index + 1
        if is_jsonl:
            line = batch["text"][j]
            if not line.strip():
                _emit(out, row_number, -1, SampleStatus.BLANK_LINE)
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                _emit(
                    out,
                    row_number,
                    -1,
                    SampleStatus.BAD_ROW,
                    error=f"{opts['source']}: row {row_number}: invalid JSON ({exc})",
                )
                continue
        else:
            row = {c: batch[c][j] for c in columns}
        _encode_row(row, row_number, opts, tokenizer, out)
    return out


def _features() -> Any:
    from datasets import Features, Sequence, Value

    return Features(
        {
            "input_ids": Sequence(Value("int32")),
            "loss_mask": Sequence(Value("int8")),
            "num_tokens": Value("int32"),
            "row": Value("int64"),
            "response_index": Value("int32"),
            "status": Value("string"),
            "error": Value("string"),
        }
    )


def _file_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    raise ValueError(f"paths: {path} is not .jsonl/.json/.parquet")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_root(cfg: SFTDataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("ACE_CACHE_DIR", Path.home() / ".cache" / "megatron_ace")) / "sft"


def cache_key(cfg: SFTDataConfig, tokenizer_fp: str) -> str:
    """Hash of (file contents in order, tokenizer fingerprint, options that change samples)."""
    options = {
        k: v
        for k, v in to_dict(cfg).items()
        if k not in ("paths", "num_proc", "cache_dir", "tokenizer")
    }
    payload = {
        "version": _CACHE_VERSION,
        "files": [_file_sha256(Path(p)) for p in cfg.paths],
        "tokenizer": tokenizer_fp,
        "options": options,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _tokenize_file(path: Path, cfg: SFTDataConfig, tokenizer: Any, hf_cache: Path, key: str) -> Any:
    import datasets

    fmt = _file_format(path)
    loader = "text" if fmt == "jsonl" else "parquet"
    raw = datasets.load_dataset(
        loader, data_files=[str(path)], split="train", cache_dir=str(hf_cache)
    )
    opts = {
        "format": fmt,
        "source": str(path),
        "system_prompt": cfg.system_prompt.value,
        "cap": cfg.max_responses_per_prompt,
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
        new_fingerprint=hashlib.sha256(f"{key}:{path}".encode()).hexdigest()[:16],
        desc=f"tokenizing {path.name}",
    )


def _collect_stats(records: Any, cfg: SFTDataConfig) -> SFTDataStats:
    counts = Counter(records["status"])
    bad = records.filter(lambda s: s == SampleStatus.BAD_ROW.value, input_columns="status")
    kept = records.filter(lambda s: s in _KEEP, input_columns="status")
    stats = SFTDataStats(
        num_bad_rows=counts[SampleStatus.BAD_ROW.value],
        num_blank_lines=counts[SampleStatus.BLANK_LINE.value],
        num_truncated=counts[SampleStatus.TRUNCATED.value],
        num_too_short=counts[SampleStatus.TOO_SHORT.value],
        num_overlong_dropped=counts[SampleStatus.OVERLONG.value],
        num_over_cap=counts[SampleStatus.OVER_CAP.value],
        num_samples=len(kept),
        num_tokens=int(sum(kept["num_tokens"])),
        num_loss_tokens=int(sum(sum(m) for m in kept["loss_mask"])),
        bad_row_errors=list(bad["error"][:_MAX_ERRORS_KEPT]),
    )
    stats.num_responses = sum(
        n
        for s, n in counts.items()
        if s not in (SampleStatus.BAD_ROW.value, SampleStatus.BLANK_LINE.value)
    )
    stats.num_rows = len(set(zip(records["source"], records["row"]))) - stats.num_blank_lines
    return stats


def build_sft_dataset(cfg: SFTDataConfig, tokenizer: Any = None) -> SFTDataset:
    """Tokenized SFT samples for `cfg` (from the on-disk cache when inputs are unchanged)."""
    import datasets

    from megatron_ace.data.tokenizer import load_tokenizer, tokenizer_fingerprint

    for p in cfg.paths:
        if not Path(p).is_file():
            raise ValueError(f"paths: {p} does not exist")
        _file_format(Path(p))
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
    key = cache_key(cfg, tokenizer_fingerprint(tokenizer))
    root = _cache_root(cfg)
    target = root / key
    if (target / "stats.json").is_file():
        stats = SFTDataStats(**json.loads((target / "stats.json").read_text()))
        stats.cache_hit = True
        logger.info("SFT data: cache hit %s (%d samples)", target, stats.num_samples)
        return SFTDataset(datasets.load_from_disk(str(target / "dataset")), stats, target)
    if cfg.num_proc > 1:
        # Fork-based workers plus the Rust tokenizer's own thread pool can deadlock.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parts = []
    for p in cfg.paths:
        part = _tokenize_file(Path(p), cfg, tokenizer, root / "hf", key)
        parts.append(part.add_column("source", [str(p)] * len(part)))
    records = datasets.concatenate_datasets(parts)
    stats = _collect_stats(records, cfg)
    if stats.num_bad_rows and cfg.on_bad_row is BadRowPolicy.ERROR:
        raise ValueError(
            f"{stats.num_bad_rows} malformed row(s) (on_bad_row=error); first: {stats.bad_row_errors[0]}"
        )
    for err in stats.bad_row_errors:
        logger.warning("skipped malformed row: %s", err)
    kept = records.filter(lambda s: s in _KEEP, input_columns="status").remove_columns(
        ["status", "error"]
    )
    tmp = root / f".{key}.tmp{os.getpid()}"
    kept.save_to_disk(str(tmp / "dataset"))
    (tmp / "stats.json").write_text(json.dumps(dataclasses.asdict(stats), indent=2) + "\n")
    try:
        os.replace(tmp, target)
    except OSError:
        # Another process wrote the same key first; its content is identical.
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "SFT data: %s",
        {k: v for k, v in dataclasses.asdict(stats).items() if k != "bad_row_errors"},
    )
    return SFTDataset(datasets.load_from_disk(str(target / "dataset")), stats, target)
