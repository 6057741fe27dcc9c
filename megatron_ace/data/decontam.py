"""Benchmark decontamination and duplicate removal for SFT / RL training rows.

What it does:
- Contamination: a training row is dropped when its text shares a word n-gram (default 9, the
  AceReason recipe's choice) with any benchmark problem. Text is normalised first (Unicode
  NFKC, lower case, every run of non-alphanumeric characters -> one space) and split into
  words, so punctuation, LaTeX braces and spacing do not hide an overlap. A benchmark problem
  shorter than n words is matched as a whole (its full word sequence must occur in the row).
- Rows are read the way the loaders read them (`tables.py` for files, `layouts.py` for
  layouts): a benchmark item's text is its problem in any math or code layout (AIME / MATH-500
  `problem`, `Problem`, `question`, LiveCodeBench `question_content`, TACO `question`,
  DeepCoder `problem`, HumanEval `prompt`); a training row's text is its prompt (and, if asked,
  its responses) in any SFT layout (AceReason-1.1-SFT `input`/`output`, `messages`,
  ShareGPT, ...) or RL prompt layout.
- Exact duplicates: rows whose normalised text is equal (hash of the normalised word string).
- Near duplicates: MinHash (128 permutations over word 5-shingles) with LSH banding
  (32 bands x 4 rows) proposes candidate pairs; a pair is a duplicate when its estimated
  Jaccard similarity is >= the threshold (default 0.8). The first row of a group is kept.
- Every dropped row is reported: which row, why, and the benchmark item and n-gram, or the
  row it duplicates and the similarity.

What it does not do: semantic (paraphrase) detection, or decontaminate responses unless asked
(`fields`); MinHash is probabilistic, so near-duplicates close to the threshold may be missed.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import re
import unicodedata
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from megatron_ace.data.layouts import FieldMap, RecordKind, parse_record, record_texts
from megatron_ace.data.tables import (
    BadRowPolicy,
    RowError,
    expand_paths,
    iter_rows,
    open_table,
    row_error,
)

BENCHMARK_KINDS = (RecordKind.CODE, RecordKind.MATH)
"""Layouts a benchmark item may be in."""
TRAINING_KINDS = (RecordKind.CONVERSATION, RecordKind.MATH, RecordKind.CODE)
"""Layouts a training row may be in (SFT rows first, then RL prompts)."""

_NON_ALNUM = re.compile(r"[^0-9a-z]+")
_PRIME31 = (1 << 31) - 1
_SHINGLE_BASE = 1_000_003


class DropReason(enum.Enum):
    CONTAMINATED = "contaminated"
    EXACT_DUPLICATE = "exact_duplicate"
    NEAR_DUPLICATE = "near_duplicate"


class TextField(enum.Enum):
    """Which parts of a training row are checked against the benchmarks."""

    PROMPT = "prompt"
    PROMPT_AND_RESPONSES = "prompt_and_responses"


@dataclasses.dataclass(kw_only=True)
class DecontamConfig:
    ngram: int = 9
    """Word n-gram length for benchmark overlap."""
    fields: TextField = TextField.PROMPT
    """Check only the prompt (the usual choice) or the responses as well."""
    dedup: bool = True
    """Remove exact and near duplicates within the training rows."""
    dedup_fields: TextField = TextField.PROMPT_AND_RESPONSES
    """What must match for two rows to be duplicates (the prompt alone collapses rows that
    carry different responses to the same prompt)."""
    near_dup_threshold: float = 0.8
    """Estimated Jaccard similarity of word 5-shingles at or above which rows are duplicates."""
    num_perm: int = 128
    """MinHash permutations (must be divisible by `num_bands`)."""
    num_bands: int = 32
    """LSH bands; with 128 permutations, 32 bands of 4 rows give candidates from Jaccard ~0.4."""
    shingle: int = 5
    """Words per shingle for MinHash."""
    seed: int = 0
    """Seed of the MinHash permutations."""

    def __post_init__(self) -> None:
        if self.ngram < 1:
            raise ValueError(f"ngram must be >= 1, got {self.ngram}")
        if not 0.0 < self.near_dup_threshold <= 1.0:
            raise ValueError(f"near_dup_threshold must be in (0, 1], got {self.near_dup_threshold}")
        if self.num_bands < 1 or self.num_perm % self.num_bands:
            raise ValueError(
                f"num_bands must divide num_perm ({self.num_perm}), got {self.num_bands}"
            )
        if self.shingle < 1:
            raise ValueError(f"shingle must be >= 1, got {self.shingle}")


@dataclasses.dataclass(frozen=True)
class Drop:
    """One dropped training row and why."""

    row: int
    """Position of the row in the input sequence (from 0)."""
    reason: DropReason
    benchmark: str = ""
    benchmark_item: int = 0
    """Row number (from 1) of the benchmark item in its file."""
    ngram: str = ""
    duplicate_of: int = -1
    """Position (from 0) of the kept row this one duplicates."""
    similarity: float = 0.0

    def to_json(self, where: Sequence[tuple[str, int]] | None = None) -> dict[str, Any]:
        """JSON form; rows as (source, row number from 1) when `where` gives them, else as
        positions from 1."""
        data = dataclasses.asdict(self)
        data["reason"] = self.reason.value
        for key in ("row", "duplicate_of"):
            if data[key] >= 0:
                source, number = where[data[key]] if where is not None else ("", data[key] + 1)
                data[key] = number
                data[f"{key}_source" if key == "duplicate_of" else "source"] = source
        return data


def normalize_words(text: str) -> list[str]:
    """NFKC, lower case, non-alphanumerics -> spaces, split."""
    text = unicodedata.normalize("NFKC", text).lower()
    return _NON_ALNUM.sub(" ", text).split()


def _ngrams(words: Sequence[str], n: int) -> Iterator[str]:
    for i in range(len(words) - n + 1):
        yield " ".join(words[i : i + n])


@dataclasses.dataclass(frozen=True)
class LoadedRows:
    rows: list[dict[str, Any]]
    where: list[tuple[str, int]]
    """(file, row number from 1) of each row."""
    num_skipped: int = 0


def read_rows(paths: str | Path | Sequence[str | Path], *, kinds: Sequence[RecordKind] = TRAINING_KINDS,
              fields: FieldMap | None = None,
              on_bad_row: BadRowPolicy = BadRowPolicy.ERROR) -> LoadedRows:
    """Rows of files / folders in any format `tables.py` reads, checked against the layouts of
    `kinds`; a bad row is a ValueError naming file and row, or skipped and counted."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    loaded = LoadedRows([], [])
    skipped = 0
    for unit in expand_paths([str(p) for p in paths], what="input"):
        table = open_table(unit)
        for number, row in iter_rows(table):
            if row is None:
                continue
            try:
                if isinstance(row, RowError):
                    raise row
                parse_record(row, kinds, fields)
            except (RowError, ValueError) as exc:
                if on_bad_row is BadRowPolicy.ERROR:
                    raise ValueError(row_error(table.source, number, str(exc))) from None
                skipped += 1
                continue
            loaded.rows.append(row)
            loaded.where.append((table.source, number))
    return dataclasses.replace(loaded, num_skipped=skipped)


def benchmark_text(item: Mapping[str, Any]) -> str:
    """The problem text of a benchmark item in any math or code layout (RowError if none)."""
    return record_texts(parse_record(item, BENCHMARK_KINDS))[0]


def row_text(row: Mapping[str, Any], fields: TextField, field_map: FieldMap | None = None) -> str:
    """Prompt and, if asked, responses of a training row in any layout (RowError if none)."""
    prompt, responses = record_texts(parse_record(row, TRAINING_KINDS, field_map))
    if fields is TextField.PROMPT_AND_RESPONSES:
        return "\n".join([prompt, *responses])
    return prompt


class BenchmarkIndex:
    """Word n-grams of benchmark problems -> (benchmark name, item index)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.grams: dict[str, tuple[str, int]] = {}
        self.short: dict[int, dict[str, tuple[str, int]]] = {}  # length -> whole short items
        self.num_items: dict[str, int] = {}

    def add(self, name: str, texts: Iterable[str]) -> None:
        """Index `texts`; items are numbered from 1, in order, across calls with one name."""
        count = self.num_items.get(name, 0)
        for item, text in enumerate(texts, start=count + 1):
            words = normalize_words(text)
            count += 1
            if len(words) < self.n:
                if words:
                    self.short.setdefault(len(words), {}).setdefault(" ".join(words), (name, item))
                continue
            for gram in _ngrams(words, self.n):
                self.grams.setdefault(gram, (name, item))
        self.num_items[name] = count

    def add_file(self, path: str | Path, name: str = "") -> None:
        """Index the benchmark items of a file or folder (named by its stem unless `name`)."""
        path = Path(path)
        for unit in expand_paths([str(path)], what="benchmark"):
            table = open_table(unit)
            texts = []
            for number, row in iter_rows(table):
                if row is None:
                    continue
                try:
                    if isinstance(row, RowError):
                        raise row
                    texts.append(benchmark_text(row))
                except (RowError, ValueError) as exc:
                    raise ValueError(row_error(table.source, number, str(exc))) from None
            self.add(name or path.stem, texts)

    def match(self, text: str) -> tuple[str, int, str] | None:
        """(benchmark, item, n-gram) of the first overlap in `text`, or None."""
        words = normalize_words(text)
        for gram in _ngrams(words, self.n):
            hit = self.grams.get(gram)
            if hit is not None:
                return hit[0], hit[1], gram
        for length, items in self.short.items():
            for gram in _ngrams(words, length):
                hit = items.get(gram)
                if hit is not None:
                    return hit[0], hit[1], gram
        return None


def _shingle_hashes(words: Sequence[str], k: int) -> np.ndarray:
    """Distinct hashes (uint64 values < 2^31 - 1) of the k-word shingles of `words`.

    Words are hashed with CRC32 (stable across processes, unlike `hash`), then each window of
    k word hashes is combined by a polynomial (Horner) hash mod 2^31 - 1, vectorised in numpy;
    every intermediate stays below 2^63, so uint64 arithmetic is exact.
    """
    w = np.fromiter((zlib.crc32(x.encode()) for x in words), dtype=np.uint64, count=len(words))
    w %= np.uint64(_PRIME31)
    n = len(w) - k + 1
    h = np.zeros(n, dtype=np.uint64)
    for j in range(k):
        h = (h * np.uint64(_SHINGLE_BASE) + w[j : j + n]) % np.uint64(_PRIME31)
    return np.unique(h)


class MinHasher:
    """MinHash signatures of word shingles with multiply-shift hashing.

    h(x) = ((a x + b) mod 2^64) >> 32 with random odd a: a (near-)universal family that numpy
    evaluates with wrapping uint64 arithmetic, no division.
    """

    def __init__(self, num_perm: int, shingle: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        top = np.iinfo(np.uint64).max
        self.a = rng.integers(1, top, size=num_perm, dtype=np.uint64, endpoint=True) | np.uint64(1)
        self.b = rng.integers(0, top, size=num_perm, dtype=np.uint64, endpoint=True)
        self.shingle = shingle

    def signature(self, words: Sequence[str]) -> np.ndarray:
        """uint64 [num_perm]; texts shorter than a shingle are one shingle of all their words."""
        words = list(words) or [""]
        x = _shingle_hashes(words, min(self.shingle, len(words)))[:, None]
        with np.errstate(over="ignore"):
            return ((x * self.a + self.b) >> np.uint64(32)).min(axis=0)


def find_duplicates(texts: Sequence[str], cfg: DecontamConfig) -> list[Drop]:
    """Exact then near duplicates among `texts` (index = row); the first of a group is kept."""
    drops: list[Drop] = []
    seen_exact: dict[str, int] = {}
    hasher = MinHasher(cfg.num_perm, cfg.shingle, cfg.seed)
    rows_per_band = cfg.num_perm // cfg.num_bands
    buckets: dict[tuple[int, bytes], list[int]] = {}
    signatures: dict[int, np.ndarray] = {}  # row -> uint64 [num_perm]
    for row, text in enumerate(texts):
        words = normalize_words(text)
        key = hashlib.sha1(" ".join(words).encode()).hexdigest()
        if key in seen_exact:
            drops.append(
                Drop(
                    row=row,
                    reason=DropReason.EXACT_DUPLICATE,
                    duplicate_of=seen_exact[key],
                    similarity=1.0,
                )
            )
            continue
        seen_exact[key] = row
        sig = hasher.signature(words)
        bands = [
            (b, sig[b * rows_per_band : (b + 1) * rows_per_band].tobytes())
            for b in range(cfg.num_bands)
        ]
        candidates = sorted({r for band in bands for r in buckets.get(band, ())})
        best = max(
            ((float(np.mean(sig == signatures[r])), r) for r in candidates),
            default=(0.0, -1),
            key=lambda t: (t[0], -t[1]),
        )
        if best[0] >= cfg.near_dup_threshold:
            drops.append(
                Drop(
                    row=row,
                    reason=DropReason.NEAR_DUPLICATE,
                    duplicate_of=best[1],
                    similarity=round(best[0], 4),
                )
            )
            continue
        signatures[row] = sig
        for band in bands:
            buckets.setdefault(band, []).append(row)
    return drops


@dataclasses.dataclass
class DecontamResult:
    kept_rows: list[int]
    drops: list[Drop]
    report: dict[str, Any]


def decontaminate(
    rows: Sequence[Mapping[str, Any]], index: BenchmarkIndex | None, cfg: DecontamConfig,
    *, where: Sequence[tuple[str, int]] | None = None, field_map: FieldMap | None = None,
) -> DecontamResult:
    """Drop contaminated rows (if `index`), then duplicates among the rest (if `cfg.dedup`).

    `where` names each row's (file, row number) in the report; `field_map` maps columns of a
    layout not understood as it is."""
    drops: list[Drop] = []
    clean: list[int] = []
    for row_id, row in enumerate(rows):
        hit = index.match(row_text(row, cfg.fields, field_map)) if index is not None else None
        if hit is None:
            clean.append(row_id)
        else:
            drops.append(
                Drop(
                    row=row_id,
                    reason=DropReason.CONTAMINATED,
                    benchmark=hit[0],
                    benchmark_item=hit[1],
                    ngram=hit[2],
                )
            )
    if cfg.dedup:
        dup = find_duplicates([row_text(rows[r], cfg.dedup_fields, field_map) for r in clean], cfg)
        # find_duplicates numbers rows within `clean`; map back to input row numbers.
        drops += [
            dataclasses.replace(d, row=clean[d.row], duplicate_of=clean[d.duplicate_of])
            for d in dup
        ]
    dropped = {d.row for d in drops}
    kept = [r for r in range(len(rows)) if r not in dropped]
    drops.sort(key=lambda d: d.row)
    by_reason = {reason.value: sum(d.reason is reason for d in drops) for reason in DropReason}
    by_benchmark: dict[str, int] = {}
    for d in drops:
        if d.reason is DropReason.CONTAMINATED:
            by_benchmark[d.benchmark] = by_benchmark.get(d.benchmark, 0) + 1
    report = {
        "config": {
            k: (v.value if isinstance(v, enum.Enum) else v)
            for k, v in dataclasses.asdict(cfg).items()
        },
        "num_rows": len(rows),
        "num_kept": len(kept),
        "num_dropped": len(drops),
        "dropped_by_reason": by_reason,
        "contaminated_by_benchmark": by_benchmark,
        "benchmark_items": dict(index.num_items) if index is not None else {},
        "near_duplicate_method": "MinHash over word shingles with LSH banding, estimated Jaccard",
        "rows_numbered": "from 1 in their file (source)",
        "drops": [d.to_json(where) for d in drops],
    }
    return DecontamResult(kept_rows=kept, drops=drops, report=report)
