"""SFT from published layouts in every file format: nvidia/AceReason-1.1-SFT rows get the
system prompt of their `category` (code rows the code prompt), their whole `output`, <think>
trace included, is in the loss, `max_responses_per_prompt` counts rows of one prompt; the other
chat layouts render as the chat template renders them; and a planted AIME problem inside the
AceReason file is caught by decontamination."""

from __future__ import annotations

import json

import pytest
from layout_fixtures import (
    A_PLUS_B,
    ACEREASON_SFT,
    AIME_PLANTED,
    FORMATS,
    MATH_LAYOUTS,
    ODD_SUM,
    SFT_EXPECTED,
    SFT_LAYOUTS,
    write,
)
from transformers import AutoTokenizer

from megatron_ace.data.chat import CODE_SYSTEM_PROMPT, IM_END, MATH_SYSTEM_PROMPT, SystemPrompt
from megatron_ace.data.sft_dataset import SFTDataConfig, build_sft_dataset


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from megatron_ace.data.tokenizer import save_qwen25_tokenizer

    path = save_qwen25_tokenizer(tmp_path_factory.mktemp("qwen25"))
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _template_ids(tok, messages):
    ids = tok.apply_chat_template(messages, tokenize=True)
    return list(ids) if isinstance(ids, list) else list(ids["input_ids"])


def _cfg(tmp_path, path, **kw):
    return SFTDataConfig(paths=[str(path)], cache_dir=str(tmp_path / "cache"), **kw)


@pytest.mark.parametrize("fmt", FORMATS)
def test_acereason_sft_as_shipped(tmp_path, qwen, fmt):
    path = write(ACEREASON_SFT, fmt, tmp_path / "data", "acereason")
    files_before = sorted((tmp_path / "data").rglob("*"))
    ds = build_sft_dataset(_cfg(tmp_path, path, system_prompt=SystemPrompt.AUTO,
                                max_responses_per_prompt=2), qwen)
    assert sorted((tmp_path / "data").rglob("*")) == files_before  # nothing written next to data
    assert ds.stats.rows_by_layout == {"acereason-sft": len(ACEREASON_SFT)}
    assert ds.stats.num_rows == 6 and ds.stats.num_over_cap == 1 and len(ds) == 5
    samples = sorted(ds.dataset, key=lambda s: (s["source"], s["row"]))
    kept = [r for r in ACEREASON_SFT if r["input"] != ODD_SUM] + \
        [r for r in ACEREASON_SFT if r["input"] == ODD_SUM][:2]
    by_output = {r["output"]: r for r in kept}
    assert len(samples) == len(by_output)
    for s in samples:
        masked = qwen.decode([i for i, m in zip(s["input_ids"], s["loss_mask"]) if m])
        row = by_output[masked.removesuffix(IM_END)]  # the whole output, <think> trace included
        assert masked.startswith("<think>\n")
        system = CODE_SYSTEM_PROMPT if row["category"] == "code" else MATH_SYSTEM_PROMPT
        assert s["input_ids"] == _template_ids(qwen, [
            {"role": "system", "content": system}, {"role": "user", "content": row["input"]},
            {"role": "assistant", "content": row["output"]}])
    assert sum(A_PLUS_B in qwen.decode(s["input_ids"]) for s in samples) == 2


@pytest.mark.parametrize("fmt", FORMATS)
def test_chat_layouts_render_as_the_template(tmp_path, qwen, fmt):
    for name in SFT_EXPECTED:
        write(SFT_LAYOUTS[name], fmt, tmp_path / "data", name)
    ds = build_sft_dataset(_cfg(tmp_path, tmp_path / "data", system_prompt=SystemPrompt.NONE), qwen)
    assert ds.stats.rows_by_layout == {"messages": 2, "sharegpt": 1, "prompt-completion": 2,
                                       "problem-solution": 1}
    want = sorted(_template_ids(qwen, prompt + [{"role": "assistant", "content": response}])
                  for expected in SFT_EXPECTED.values() for prompt, response in expected)
    assert sorted(ds.dataset["input_ids"]) == want


def test_mapped_columns_train(tmp_path, qwen):
    rows = [{"instruction": "Say hi.", "target": "Hi there!"}]
    path = write(rows, "jsonl", tmp_path, "custom")
    from megatron_ace.data.layouts import FieldMap

    ds = build_sft_dataset(_cfg(tmp_path, path, system_prompt=SystemPrompt.NONE,
                                fields=FieldMap(prompt="instruction", response="target")), qwen)
    assert ds[0]["input_ids"] == _template_ids(qwen, [
        {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}])
    with pytest.raises(ValueError, match=r"custom\.jsonl: row 1: no known layout.*its fields: "
                                         r"instruction, target"):
        build_sft_dataset(_cfg(tmp_path, path), qwen)


@pytest.mark.parametrize("fmt", ["jsonl", "save_to_disk"])
def test_planted_aime_problem_is_caught_by_decontamination(tmp_path, fmt):
    from tools.decontaminate import main

    train = write(ACEREASON_SFT, fmt, tmp_path / "train", "acereason")
    bench = write(MATH_LAYOUTS["aime24_h4"], "parquet", tmp_path, "aime24")
    out, report = tmp_path / "kept.jsonl", tmp_path / "report.json"
    assert main(["--input", str(train), "--benchmark", str(bench), "--out", str(out),
                 "--report", str(report)]) == 0
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["output"] for r in kept] == [r["output"] for r in ACEREASON_SFT
                                           if r["input"] != AIME_PLANTED]
    rep = json.loads(report.read_text())
    assert rep["dropped_by_reason"] == {"contaminated": 1, "exact_duplicate": 0,
                                        "near_duplicate": 0}
    drop = rep["drops"][0]
    assert (drop["row"], drop["benchmark"], drop["benchmark_item"]) == (6, "aime24", 2)
