"""score_logprobs under torchrun (2 processes, gloo) matches HF transformers (tests/tolerances.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ace.checkpoint import convert

sys.path.insert(0, str(Path(__file__).parent))
from test_convert_roundtrip import make_hf  # noqa: E402
from tolerances import LOGPROB_ATOL  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "score_logprobs.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], nproc: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={_free_port()}", str(TOOL), *args] if nproc else [sys.executable, str(TOOL), *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.dist
@pytest.mark.numerics
def test_logprobs_match_hf_after_tp2_to_pp2_relayout(tmp_path):
    hf = make_hf(tmp_path / "hf", "tiny")
    m_tp2 = convert.hf_to_mcore(hf, tmp_path / "tp2", tp=2, pp=1)
    m_pp2 = convert.relayout(m_tp2, tmp_path / "pp2", tp=1, pp=2)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (17, 9, 24)]
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(seqs))
    _run(["--hf-dir", str(hf), "--tokens-file", str(tokens), "--out", str(tmp_path / "hf.json")],
         0)
    ref = json.loads((tmp_path / "hf.json").read_text())
    diffs = {}
    # same layout as the checkpoint (strict per-rank load), then re-sharded in memory (PP2 -> TP2)
    for tag, (tp, pp) in {"pp2-ckpt-pp2-run": (1, 2), "pp2-ckpt-tp2-run": (2, 1)}.items():
        out = tmp_path / f"{tag}.json"
        _run(["--mcore-dir", str(m_pp2), "--tp", str(tp), "--pp", str(pp), "--tokens-file",
              str(tokens), "--out", str(out), "--micro-batch-size", "2"], 2)
        got = json.loads(out.read_text())
        assert [len(r) for r in got] == [len(s) - 1 for s in seqs]
        diffs[tag] = max(abs(a - b) for r1, r2 in zip(got, ref) for a, b in zip(r1, r2))
    print("max abs logprob diff vs HF:", diffs)
    assert all(d < LOGPROB_ATOL for d in diffs.values()), diffs
