"""Drop training rows that overlap benchmark problems, and duplicates, with a report.

Example:
  python tools/decontaminate.py --input AceReason-1.1-SFT/ --benchmark aime24.jsonl \\
      --benchmark lcb_v5/ --out sft.clean.jsonl --report sft.decontam.json

Training rows and benchmark items are read in every file format and layout the loaders read
(.jsonl, JSON arrays, parquet, `datasets` Arrow directories and shards, folders of them;
AceReason-1.1-SFT, messages, ShareGPT, ...; AIME / MATH-500 / LiveCodeBench / TACO / DeepCoder /
HumanEval). Kept rows are written as JSONL; rows in the report are numbered from 1 in their file.

Overlap is a shared word n-gram (default 9) after normalisation (NFKC, lower case, punctuation
removed); duplicates are exact (normalised hash) or near (MinHash + LSH, estimated Jaccard of
word 5-shingles). See megatron_ace/data/decontam.py for the details.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_ace.data.decontam import (
    BenchmarkIndex,
    DecontamConfig,
    TextField,
    decontaminate,
    read_rows,
)
from megatron_ace.data.layouts import FieldMap
from megatron_ace.data.tables import BadRowPolicy
from megatron_ace.utils.logging import get_logger

logger = get_logger("tools.decontaminate")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input", required=True, action="append",
                   help="training rows: a file or folder in any understood format; repeatable")
    p.add_argument(
        "--benchmark",
        action="append",
        default=[],
        help="benchmark file or folder (any math or code layout), optionally NAME=PATH; repeatable",
    )
    p.add_argument("--map", action="append", default=[], metavar="FIELD=COLUMN",
                   help="column mapping for training rows in another layout, e.g. prompt=instruction")
    p.add_argument("--on-bad-row", choices=[b.value for b in BadRowPolicy],
                   default=BadRowPolicy.ERROR.value,
                   help="stop at a malformed training row (error) or skip and count it (skip)")
    p.add_argument("--out", required=True, help="kept rows, written as JSONL")
    p.add_argument(
        "--report", required=True, help="report JSON (counts and every dropped row with its reason)"
    )
    p.add_argument(
        "--ngram", type=int, default=9, help="word n-gram length for benchmark overlap (default 9)"
    )
    p.add_argument(
        "--fields",
        choices=[f.value for f in TextField],
        default=TextField.PROMPT.value,
        help="check the prompt only, or prompt and responses, against the benchmarks",
    )
    p.add_argument("--no-dedup", action="store_true", help="skip exact / near-duplicate removal")
    p.add_argument(
        "--dedup-fields",
        choices=[f.value for f in TextField],
        default=TextField.PROMPT_AND_RESPONSES.value,
        help="what two rows must share to be duplicates",
    )
    p.add_argument(
        "--near-dup-threshold",
        type=float,
        default=0.8,
        help="estimated Jaccard similarity at or above which rows are near duplicates",
    )
    return p.parse_args(argv)


def _field_map(items: list[str]) -> FieldMap:
    mapping = {}
    for item in items:
        key, sep, column = item.partition("=")
        if not sep or not column:
            raise SystemExit(f"--map {item!r}: expected FIELD=COLUMN")
        mapping[key] = column
    try:
        return FieldMap(**mapping)
    except TypeError:
        raise SystemExit(f"--map: fields are {', '.join(FieldMap.__dataclass_fields__)}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = DecontamConfig(
        ngram=args.ngram,
        fields=TextField(args.fields),
        dedup=not args.no_dedup,
        dedup_fields=TextField(args.dedup_fields),
        near_dup_threshold=args.near_dup_threshold,
    )
    field_map = _field_map(args.map)
    index = None
    if args.benchmark:
        index = BenchmarkIndex(cfg.ngram)
        for spec in args.benchmark:
            name, _, path = spec.rpartition("=")
            index.add_file(path, name)
    elif cfg.dedup:
        logger.warning("no --benchmark given: only duplicate removal runs")
    loaded = read_rows(args.input, fields=field_map, on_bad_row=BadRowPolicy(args.on_bad_row))
    rows = loaded.rows
    result = decontaminate(rows, index, cfg, where=loaded.where, field_map=field_map)
    result.report["input"] = args.input
    result.report["benchmarks"] = args.benchmark
    result.report["num_bad_rows_skipped"] = loaded.num_skipped
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for r in result.kept_rows:
            # default=str: parquet/Arrow rows may hold dates and other non-JSON values.
            f.write(json.dumps(rows[r], ensure_ascii=False, default=str) + "\n")
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(result.report, indent=2, ensure_ascii=False) + "\n")
    logger.info(
        "kept %d of %d rows; dropped %s",
        len(result.kept_rows),
        len(rows),
        result.report["dropped_by_reason"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
