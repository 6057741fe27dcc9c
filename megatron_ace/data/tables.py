"""Data files as the public datasets ship them, read through `datasets`, rows numbered from 1.

What it does:
- `FileFormat`: JSONL (`.jsonl`, or `.json` holding one object per line), a JSON array (`.json`
  whose first character is `[`), parquet, a `datasets` Arrow directory (what `save_to_disk`
  writes: a Dataset, or a DatasetDict whose `train` split, or only split, is used) and `.arrow`
  shards (as `datasets` writes them to its cache).
- `expand_paths`: files and folders -> the units to read, in order. A folder that is not a
  `save_to_disk` directory stands for the data files inside it (recursively, sorted by path,
  `datasets`' own metadata and `cache-*.arrow` files left out), so a downloaded dataset folder or a folder of
  `.arrow` shards is one argument.
- `open_table(path)`: one unit as a `datasets.Dataset`. JSON text stays one string per row (a
  `text` column) and is decoded row by row (`decode_row`): a malformed line is reported with its
  file and row instead of failing inside a schema-inferring reader, and a field whose type
  changes from row to row (an answer that is a number here and a string there; chat content
  that is a string in one row and a list of parts in the next) is read as it is.
- Rows are numbered from 1 in file order: the line number for JSONL (blank lines count, and are
  reported as blank, not as errors), the element for a JSON array, the row for parquet/Arrow.
  Every error names the file (or directory) and that number.

What it does not do: decide what a row means (see `layouts.py`), download anything, or read
compressed JSON.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

JSON_TEXT_COLUMN = "text"
_METADATA_FILES = frozenset({"dataset_info.json", "state.json", "dataset_dict.json"})
_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")


class RowError(ValueError):
    """A malformed row; the message names the field (the caller adds the file and row)."""


class BadRowPolicy(enum.Enum):
    """What a loader does with a malformed row."""

    ERROR = "error"
    """Stop with an error naming the file, the row and the field."""
    SKIP = "skip"
    """Skip the row, count it, and log the first errors."""


class FileFormat(enum.Enum):
    JSONL = "jsonl"
    JSON_ARRAY = "json_array"
    PARQUET = "parquet"
    ARROW_DIR = "arrow_dir"
    ARROW_FILE = "arrow"


def describe_formats() -> str:
    return (".jsonl, .json (a JSON array or one object per line), .parquet, a `datasets` "
            "save_to_disk directory, .arrow shards, or a folder of these")


@dataclasses.dataclass(frozen=True)
class Table:
    """One readable unit: `dataset` has a `text` column of JSON (JSON formats) or the file's
    own columns (parquet, Arrow)."""

    source: str
    """The file or directory, as named in errors."""
    format: FileFormat
    dataset: Any

    @property
    def is_json_text(self) -> bool:
        return self.format in (FileFormat.JSONL, FileFormat.JSON_ARRAY)

    def __len__(self) -> int:
        return len(self.dataset)


def _is_save_to_disk_dir(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _unit_format(path: Path) -> FileFormat:
    if path.is_dir():
        if _is_save_to_disk_dir(path):
            return FileFormat.ARROW_DIR
        raise ValueError(f"{path}: not a `datasets` save_to_disk directory")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return FileFormat.PARQUET
    if suffix == ".arrow":
        return FileFormat.ARROW_FILE
    if suffix == ".jsonl":
        return FileFormat.JSONL
    if suffix == ".json":
        return FileFormat.JSON_ARRAY if _first_char(path) == "[" else FileFormat.JSONL
    raise ValueError(f"{path}: unsupported file type; expected {describe_formats()}")


def _first_char(path: Path) -> str:
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        while True:
            chunk = f.read(4096)
            if not chunk:
                return ""
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0]


def _folder_units(folder: Path) -> list[Path]:
    units: list[Path] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            units += [entry] if _is_save_to_disk_dir(entry) else _folder_units(entry)
        elif entry.suffix.lower() in _SUFFIXES and entry.name not in _METADATA_FILES \
                and not entry.name.startswith("cache-"):  # `datasets`' own map outputs
            units.append(entry)
    return units


def expand_paths(paths: list[str] | tuple[str, ...], *, what: str = "paths") -> list[Path]:
    """Files / save_to_disk directories to read, in order; ValueError naming a missing path,
    an unsupported file, or a folder with no data file."""
    units: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ValueError(f"{what}: {raw} does not exist")
        if path.is_dir() and not _is_save_to_disk_dir(path):
            found = _folder_units(path)
            if not found:
                raise ValueError(f"{what}: {raw} holds no data file ({describe_formats()})")
            units += found
        else:
            _unit_format(path)
            units.append(path)
    return units


def _load_save_to_disk(path: Path) -> Any:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" in loaded:
            return loaded["train"]
        if len(splits) == 1:
            return loaded[splits[0]]
        raise ValueError(f"{path}: a DatasetDict with splits {splits} and no 'train'; "
                         "save the split you want with save_to_disk, or pass its folder")
    return loaded


def _json_array_table(path: Path) -> Any:
    import datasets

    try:
        rows = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a valid JSON array (line {exc.lineno}, column "
                         f"{exc.colno}: {exc.msg})") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON array of objects")
    # One JSON string per element keeps rows whose field types differ readable (see above).
    texts = [json.dumps(r, ensure_ascii=False) for r in rows]
    return datasets.Dataset.from_dict({JSON_TEXT_COLUMN: texts})


def _read_jsonl(path: Path, cache: str | None) -> Any:
    import datasets

    return datasets.load_dataset("text", data_files=[str(path)], split="train", cache_dir=cache)


def _read_parquet(path: Path, cache: str | None) -> Any:
    import datasets

    return datasets.load_dataset("parquet", data_files=[str(path)], split="train", cache_dir=cache)


def _read_arrow_file(path: Path, cache: str | None) -> Any:
    import datasets

    return datasets.Dataset.from_file(str(path))  # memory-mapped, no copy


_READERS: dict[FileFormat, Callable[[Path, str | None], Any]] = {
    FileFormat.JSONL: _read_jsonl,
    FileFormat.JSON_ARRAY: lambda path, cache: _json_array_table(path),
    FileFormat.PARQUET: _read_parquet,
    FileFormat.ARROW_FILE: _read_arrow_file,
    FileFormat.ARROW_DIR: lambda path, cache: _load_save_to_disk(path),
}


def open_table(path: str | Path, *, cache_dir: str | Path | None = None) -> Table:
    """One unit (a file, or a save_to_disk directory) as a `Table`; `cache_dir` is where
    `datasets` keeps what it converts (its default cache when None)."""
    path = Path(path)
    fmt = _unit_format(path)
    dataset = _READERS[fmt](path, str(cache_dir) if cache_dir is not None else None)
    return Table(source=str(path), format=fmt, dataset=dataset)


def decode_row(value: Any) -> dict[str, Any] | None:
    """A JSON text row -> dict (None for a blank line); RowError for invalid JSON or a
    non-object."""
    if not value.strip():
        return None
    try:
        row = json.loads(value)
    except json.JSONDecodeError as exc:
        raise RowError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got {type(row).__name__}")
    return row


def batch_rows(table_is_json: bool, batch: Mapping[str, list]) -> Iterator[Any]:
    """Rows of a `Dataset.map(batched=True)` batch: dicts, None (blank line) or a RowError."""
    if table_is_json:
        for value in batch[JSON_TEXT_COLUMN]:
            try:
                yield decode_row(value)
            except RowError as exc:
                yield exc
        return
    columns = list(batch)
    size = len(batch[columns[0]]) if columns else 0
    for j in range(size):
        yield {c: batch[c][j] for c in columns}


def iter_rows(table: Table) -> Iterator[tuple[int, Any]]:
    """(row number from 1, dict | None for a blank line | RowError) over a whole table."""
    number = 0
    for start in range(0, len(table.dataset), 1024):
        batch = table.dataset[start:start + 1024]
        for row in batch_rows(table.is_json_text, batch):
            number += 1
            yield number, row


def row_where(source: str, row: int) -> str:
    """The one way every loader names a row."""
    return f"{source}: row {row}"


def row_error(source: str, row: int, message: str) -> str:
    return f"{row_where(source, row)}: {message}"
