"""Megatron-Core Qwen2 vs HF transformers Qwen2ForCausalLM (float32, same weights).

Tiny models with GQA (4 heads, 2 KV groups), QKV bias, tied and untied embeddings and a
vocabulary of 1000 (not a multiple of 128, so TP padding is exercised). Parity must hold at
TP1, TP2 and PP2; the gather back to HF names must reproduce every tensor bit for bit.
"""

import pytest

from dist_utils import REPO, read_json, torchrun
from tolerances import LOGPROB_ATOL

WORKER = REPO / "tests" / "workers" / "parity_worker.py"
LAYOUTS = [(1, 1), (2, 1), (1, 2)]


@pytest.mark.dist
@pytest.mark.numerics
@pytest.mark.parametrize("name", ["tiny", "tiny-tied"])
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_logprobs_match_hf(tmp_path, name, tp, pp):
    out = tmp_path / "result.json"
    torchrun(WORKER, tp, pp, name, out, nproc=tp * pp)
    result = read_json(out)
    assert result["logp_std"] > 0.1  # the reference is not degenerate
    assert result["max_logp_diff"] <= LOGPROB_ATOL, result
    assert result["max_entropy_diff"] <= LOGPROB_ATOL, result
    assert result["roundtrip_ok"], result


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.numerics
def test_logprobs_match_hf_tp2_pp2(tmp_path):
    out = tmp_path / "result.json"
    torchrun(WORKER, 2, 2, "tiny-4l", out, nproc=4)
    result = read_json(out)
    assert result["max_logp_diff"] <= LOGPROB_ATOL, result
    assert result["roundtrip_ok"], result
