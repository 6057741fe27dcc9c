"""tools/check_weight_sync.py on a converted checkpoint: a fresh vLLM engine with random weights
receives the Megatron weights through the bucketed sync and then agrees with the Megatron model
on the logprobs of its own samples (TP1, and TP2 from a checkpoint saved at PP2)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dist_utils import REPO, torchrun
from tolerances import LOGPROB_ATOL

TOOL = REPO / "tools" / "check_weight_sync.py"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2ForCausalLM

    from megatron_ace.checkpoint.convert import hf_to_mcore
    from megatron_ace.model.config import preset

    root = tmp_path_factory.mktemp("sync")
    cfg = preset("tiny")
    torch.manual_seed(0)
    Qwen2ForCausalLM(HFConfig(**cfg.to_hf_config())).float().save_pretrained(root / "hf")
    return hf_to_mcore(root / "hf", root / "m_tp2", tp=2), hf_to_mcore(root / "hf", root / "m_pp2", pp=2)


def _report(path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.slow  # TP1 sync parity runs by default in test_grpo_e2e and test_weight_sync_vllm
@pytest.mark.vllm
@pytest.mark.numerics
def test_tp1_sync_matches_and_control_fails(checkpoints, tmp_path):
    m_tp2, _ = checkpoints
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run([sys.executable, str(TOOL), "--mcore-dir", str(m_tp2), "--bucket-mb", "0.25",
                         "--json-out", str(tmp_path / "ok.json")],
                        capture_output=True, text=True, env=env, timeout=600)
    assert ok.returncode == 0, ok.stderr[-4000:]
    report = _report(tmp_path / "ok.json")
    assert report["parity"]["logp_abs_diff_max"] < LOGPROB_ATOL
    assert report["sync"]["num_buckets"] > 1  # the small bucket size really split the model
    assert report["transport"] == "shared_memory"  # what `auto` means on a CPU
    # At TP1 the engine read the parameters where they lie: all but q/k/v, which the gather
    # copies out of Megatron's interleaved layout.
    assert 0.5 * report["sync"]["num_bytes"] < report["sync"]["num_shared_bytes"] \
        < report["sync"]["num_bytes"]
    control = subprocess.run([sys.executable, str(TOOL), "--mcore-dir", str(m_tp2), "--no-sync",
                              "--json-out", str(tmp_path / "control.json")],
                             capture_output=True, text=True, env=env, timeout=600)
    assert control.returncode == 1, control.stdout[-2000:]
    assert _report(tmp_path / "control.json")["parity"]["logp_abs_diff_max"] > 1e-2


@pytest.mark.vllm
@pytest.mark.dist
@pytest.mark.numerics
def test_tp2_sync_matches(checkpoints, tmp_path):
    _, m_pp2 = checkpoints
    torchrun(TOOL, "--mcore-dir", m_pp2, "--tp", "2", "--pp", "1", "--json-out", tmp_path / "r.json",
             nproc=2)
    report = _report(tmp_path / "r.json")
    assert report["parity"]["logp_abs_diff_max"] < LOGPROB_ATOL
    assert report["transport"] == "shared_memory"  # into an engine in a process of its own


def test_bad_layout_is_refused_before_any_work(checkpoints):
    m_tp2, _ = checkpoints
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(TOOL), "--mcore-dir", str(m_tp2), "--tp", "3"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert "--tp 3" in proc.stderr and "query groups" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_gpu_transport_is_refused_before_any_work(checkpoints):
    m_tp2, _ = checkpoints
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(TOOL), "--mcore-dir", str(m_tp2), "--transport",
                           "cuda_ipc"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert "--transport: 'cuda_ipc' needs CUDA" in proc.stderr


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.numerics
def test_tokenizer_prompts_sync_matches(checkpoints, tmp_path):
    from megatron_ace.data.tiny_tokenizer import build_tiny_tokenizer

    _, m_pp2 = checkpoints
    tok = build_tiny_tokenizer(tmp_path / "tok")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(TOOL), "--mcore-dir", str(m_pp2), "--tokenizer",
                           str(tok), "--num-prompts", "3", "--max-tokens", "8",
                           "--transport", "bytes", "--json-out", str(tmp_path / "r.json")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = _report(tmp_path / "r.json")
    assert report["prompts"].startswith("text via") and report["transport"] == "bytes"
    assert report["parity"]["num_tokens"] == 3 * 2 * 8
    assert report["parity"]["logp_abs_diff_max"] < LOGPROB_ATOL
