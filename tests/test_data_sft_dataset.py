"""SFT dataset building on the real Qwen2.5 vocabulary: samples equal the chat template,
options are applied and counted, malformed rows error with file and row or are counted,
and the on-disk cache is hit on re-run and missed when an input changes."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from megatron_ace.data.chat import CODE_SYSTEM_PROMPT, IM_END, MATH_SYSTEM_PROMPT, SystemPrompt
from megatron_ace.data.sft_dataset import (
    BadRowPolicy,
    OverlongPolicy,
    SFTDataConfig,
    build_sft_dataset,
)
from megatron_ace.data.tokenizer import save_qwen25_tokenizer

GOOD_ROWS = [
    {
        "prompt": "What is 2+2?",
        "responses": ["2+2 = \\boxed{4}.", "Adding: \\boxed{4}", "It is four, \\boxed{4}."],
    },
    {"prompt": "Solve x+1=3.", "response": "Subtract one: x = \\boxed{2}."},
    {
        "messages": [
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": "Hello there, friend."},
        ]
    },
    {"prompt": "Name a prime.", "responses": ["7", "The prime \\boxed{7} works well here."]},
    {"prompt": "Write a long essay.", "response": " ".join(["word"] * 300)},
]


def _write_jsonl(path, rows, extra_lines=()):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = save_qwen25_tokenizer(tmp_path_factory.mktemp("qwen25"))
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _cfg(tmp_path, paths, **kw):
    return SFTDataConfig(paths=[str(p) for p in paths], cache_dir=str(tmp_path / "cache"), **kw)


def _template_ids(tok, system, prompt, response):
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    ids = tok.apply_chat_template(messages, tokenize=True)
    return list(ids) if isinstance(ids, list) else list(ids["input_ids"])


def test_samples_equal_template_and_options_are_counted(tmp_path, qwen):
    data = _write_jsonl(tmp_path / "train.jsonl", GOOD_ROWS)
    cfg = _cfg(tmp_path, [data], max_responses_per_prompt=2, min_response_tokens=2, max_seq_len=200)
    ds = build_sft_dataset(cfg, qwen)
    s = ds.stats
    # Row 1: 3 responses, cap 2 -> 1 over cap. Row 4: "7" is 1 token < 2. Row 5: > 200 tokens.
    assert (
        s.num_rows,
        s.num_responses,
        s.num_over_cap,
        s.num_too_short,
        s.num_overlong_dropped,
    ) == (5, 8, 1, 1, 1)
    assert s.num_samples == len(ds) == 5 and s.num_bad_rows == 0 and not s.cache_hit
    got = {(r["row"], r["response_index"]): r for r in ds.dataset}
    assert set(got) == {(1, 0), (1, 1), (2, 0), (3, 0), (4, 1)}
    expect = _template_ids(qwen, MATH_SYSTEM_PROMPT, "What is 2+2?", "Adding: \\boxed{4}")
    assert got[(1, 1)]["input_ids"] == expect
    sample = got[(3, 0)]
    masked = [i for i, m in zip(sample["input_ids"], sample["loss_mask"]) if m]
    assert qwen.decode(masked) == "Hello there, friend." + IM_END
    assert sample["num_tokens"] == len(sample["input_ids"])
    assert s.num_tokens == sum(r["num_tokens"] for r in ds.dataset)


def test_truncate_keeps_and_counts(tmp_path, qwen):
    long_prompt = {"prompt": " ".join(["context"] * 200), "response": "Short answer here."}
    data = _write_jsonl(tmp_path / "train.jsonl", GOOD_ROWS[4:] + [long_prompt])
    cfg = _cfg(tmp_path, [data], max_seq_len=64, overlong=OverlongPolicy.TRUNCATE)
    ds = build_sft_dataset(cfg, qwen)
    # The long response is truncated and kept; the long prompt would leave nothing to learn.
    assert ds.stats.num_truncated == 1 and ds.stats.num_overlong_dropped == 1
    assert len(ds) == 1 and len(ds[0]["input_ids"]) == 64 and sum(ds[0]["loss_mask"]) > 0


def test_system_prompt_choices(tmp_path, qwen):
    rows = [
        {"prompt": "Sort a list.", "response": "Use sorted().", "domain": "code"},
        {"prompt": "1+1?", "response": "\\boxed{2}", "domain": "math"},
    ]
    data = _write_jsonl(tmp_path / "mixed.jsonl", rows)
    ds = build_sft_dataset(_cfg(tmp_path, [data], system_prompt=SystemPrompt.AUTO), qwen)
    assert ds[0]["input_ids"] == _template_ids(
        qwen, CODE_SYSTEM_PROMPT, "Sort a list.", "Use sorted()."
    )
    assert ds[1]["input_ids"] == _template_ids(qwen, MATH_SYSTEM_PROMPT, "1+1?", "\\boxed{2}")
    ds = build_sft_dataset(_cfg(tmp_path, [data], system_prompt=SystemPrompt.NONE), qwen)
    assert ds[1]["input_ids"] == _template_ids(qwen, None, "1+1?", "\\boxed{2}")


BAD_LINES = [
    json.dumps({"response": "no prompt"}),  # row 6: missing prompt
    json.dumps({"prompt": ["not", "a string"], "response": "x"}),  # row 7: wrong type
    json.dumps({"prompt": "empty response", "response": "  "}),  # row 8: empty response
    "",  # row 9: blank line (counted, not an error)
    "{broken json",  # row 10: invalid JSON
    json.dumps({"prompt": "p", "responses": "not a list"}),  # row 11
]


def test_bad_rows_error_names_file_and_row(tmp_path, qwen):
    data = _write_jsonl(tmp_path / "dirty.jsonl", GOOD_ROWS, BAD_LINES)
    with pytest.raises(
        ValueError, match=r"5 malformed row\(s\).*dirty\.jsonl: row 6: no known layout fits "
        r"this row \(its fields: response\); understood layouts: acereason-sft"
    ):
        build_sft_dataset(_cfg(tmp_path, [data]), qwen)


def test_bad_rows_skipped_are_counted(tmp_path, qwen):
    data = _write_jsonl(tmp_path / "dirty.jsonl", GOOD_ROWS, BAD_LINES)
    ds = build_sft_dataset(_cfg(tmp_path, [data], on_bad_row=BadRowPolicy.SKIP), qwen)
    s = ds.stats
    assert s.num_bad_rows == 5 and s.num_blank_lines == 1 and s.num_rows == 10
    rows = [int(e.split(": row ")[1].split(":")[0]) for e in s.bad_row_errors]
    assert rows == [6, 7, 8, 10, 11]
    assert all("dirty.jsonl" in e for e in s.bad_row_errors)
    assert (
        "prompt[0].role: must be one of" in s.bad_row_errors[1]
        and "response: is empty" in s.bad_row_errors[2]
    )
    assert len(ds) == 8  # the good rows' responses only


def test_cache_hit_and_invalidation(tmp_path, qwen):
    data = _write_jsonl(tmp_path / "train.jsonl", GOOD_ROWS)
    first = build_sft_dataset(_cfg(tmp_path, [data]), qwen)
    again = build_sft_dataset(_cfg(tmp_path, [data]), qwen)
    assert not first.stats.cache_hit and again.stats.cache_hit
    assert again.cache_path == first.cache_path
    assert again.dataset["input_ids"] == first.dataset["input_ids"]
    other_option = build_sft_dataset(_cfg(tmp_path, [data], min_response_tokens=3), qwen)
    assert not other_option.stats.cache_hit
    _write_jsonl(data, GOOD_ROWS[:2])  # same path, new content
    changed = build_sft_dataset(_cfg(tmp_path, [data]), qwen)
    assert not changed.stats.cache_hit and len(changed) == 4


def test_parquet_and_parallel_workers_agree(tmp_path, qwen):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "prompt": f"Compute {i} + {i}.",
            "responses": [f"It is \\boxed{{{2 * i}}}.", f"{i}+{i}={2 * i}"],
        }
        for i in range(40)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    jsonl = _write_jsonl(tmp_path / "train.jsonl", rows)
    one = build_sft_dataset(_cfg(tmp_path, [tmp_path / "train.parquet"]), qwen)
    two = build_sft_dataset(_cfg(tmp_path / "b", [jsonl], num_proc=2), qwen)
    assert len(one) == len(two) == 80
    assert one.dataset["input_ids"] == two.dataset["input_ids"]
    assert one.dataset["loss_mask"] == two.dataset["loss_mask"]


def test_config_validation():
    with pytest.raises(ValueError, match="paths"):
        SFTDataConfig(paths=[])
    with pytest.raises(ValueError, match="max_seq_len"):
        SFTDataConfig(paths=["a.jsonl"], max_seq_len=1)
    with pytest.raises(ValueError, match="unsupported|not .jsonl"):
        build_sft_dataset(SFTDataConfig(paths=[__file__]))


def test_batcher_over_dataset_covers_every_loss_token_once_per_epoch(tmp_path, qwen):
    from megatron_ace.data.packing import BatchingConfig, SFTBatcher

    data = _write_jsonl(tmp_path / "train.jsonl", GOOD_ROWS)
    ds = build_sft_dataset(_cfg(tmp_path, [data]), qwen)
    batcher = SFTBatcher(
        ds, BatchingConfig(seq_length=512, micro_batch_size=1), pad_id=qwen.pad_token_id
    )
    batches = [batcher.next_batch() for _ in range(len(batcher.units))]
    assert batcher.state_dict()["epoch"] == 1
    # The first token of a sample (<|im_start|>) is never a target, so every masked token is.
    assert sum(int(b["loss_mask"].sum()) for b in batches) == ds.stats.num_loss_tokens
    assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) == ds.stats.num_tokens - len(ds)
    for b in batches:
        pad = b["segment_ids"] == 0
        assert b["tokens"][pad].eq(151_643).all()
