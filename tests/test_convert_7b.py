"""A 7B-shaped bf16 model (Qwen2.5-Math-7B's shapes, 15.2 GB, a 4-shard HF index) converts
HF -> torch_dist (TP4 x PP2) -> HF bit-identically within the memory of a 24 GiB machine.

Slow (writes ~46 GB, about 10-20 minutes on 2 cores): `make test-slow` or
    PYTHONPATH=. .venv/bin/python -m pytest -q -m slow tests/test_convert_7b.py -s
Put the scratch space elsewhere with ACE_BIG_TMP=/path (it needs ~46 GB free).

Each conversion runs the real CLI in a child process whose peak resident memory (VmHWM) and
peak anonymous memory (RssAnon: what cannot be dropped under pressure, unlike the page cache
of mapped input files) are sampled from /proc. The weights are arbitrary bit patterns (random
int16 viewed as bf16), compared bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from dist_utils import REPO

GIB = 2**30
LIMIT = 24 * GIB
NUM_SHARDS = 4


def _write_hf(out: Path) -> int:
    from megatron_ace.checkpoint.safetensors_stream import INDEX_NAME, StreamingWriter, TensorEntry
    from megatron_ace.model.config import preset
    from megatron_ace.model.mapping import hf_shapes

    cfg = preset("qwen2.5-math-7b")
    shapes = hf_shapes(cfg)
    entries = [TensorEntry(name=n, shape=s, dtype=torch.bfloat16) for n, s in shapes.items()]
    total = sum(e.num_bytes for e in entries)
    shards, size = [[]], 0
    for e in entries:
        if size > total / NUM_SHARDS and len(shards) < NUM_SHARDS:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.num_bytes
    out.mkdir(parents=True)
    weight_map = {}
    gen = torch.Generator().manual_seed(0)
    for i, group in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with StreamingWriter(out / name, group, {"format": "pt"}) as writer:
            for e in group:
                bits = torch.randint(-2**15, 2**15, e.shape, dtype=torch.int16, generator=gen)
                writer.write(e.name, bits.view(torch.bfloat16))
                weight_map[e.name] = name
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total},
                                              "weight_map": weight_map}))
    hf = cfg.to_hf_config()
    hf["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(hf))
    return total


def _peak_memory(cmd: list[str]) -> dict[str, float]:
    """Run `cmd`; its peak VmHWM and RssAnon (GiB), sampled every 50 ms."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    peak = {"VmHWM": 0, "RssAnon": 0}
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in peak:
                    peak[key] = max(peak[key], int(value.split()[0]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.05)
    stderr = proc.stderr.read()
    assert proc.wait() == 0, stderr[-3000:]
    return {k: v / GIB for k, v in peak.items()}


@pytest.mark.slow
def test_7b_bf16_round_trip_within_24_gib():
    from megatron_ace.checkpoint.safetensors_stream import LazyReader

    base = Path(tempfile.mkdtemp(prefix="ace-7b-", dir=os.environ.get("ACE_BIG_TMP")))
    try:
        if shutil.disk_usage(base).free < 50 * 10**9:
            pytest.skip(f"needs ~50 GB free under {base}")
        total = _write_hf(base / "hf")
        assert 15.0e9 < total < 15.5e9
        tool = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py")]
        t0 = time.perf_counter()
        to_mcore = _peak_memory(tool + ["hf-to-mcore", "--hf-dir", str(base / "hf"), "--out",
                                        str(base / "m"), "--tp", "4", "--pp", "2"])
        t1 = time.perf_counter()
        to_hf = _peak_memory(tool + ["mcore-to-hf", "--mcore-dir", str(base / "m"), "--out",
                                     str(base / "hf2")])
        t2 = time.perf_counter()
        print(f"\n7B bf16 {total / 1e9:.1f} GB: hf-to-mcore {t1 - t0:.0f} s, peak RSS "
              f"{to_mcore['VmHWM']:.2f} GiB (anonymous {to_mcore['RssAnon']:.2f}); mcore-to-hf "
              f"{t2 - t1:.0f} s, peak RSS {to_hf['VmHWM']:.2f} GiB (anonymous "
              f"{to_hf['RssAnon']:.2f})")
        for peak in (to_mcore, to_hf):
            assert peak["VmHWM"] * GIB < LIMIT
        a, b = LazyReader(base / "hf"), LazyReader(base / "hf2")
        assert sorted(a.names()) == sorted(b.names())
        for name in a.names():
            assert torch.equal(a.get(name).view(torch.int16), b.get(name).view(torch.int16)), name
    finally:
        shutil.rmtree(base, ignore_errors=True)
