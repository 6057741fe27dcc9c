"""A 7B-shaped bf16 model (Qwen2.5-Math-7B's shapes, 15.2 GB, a 4-shard HF index) converts
HF -> torch_dist (TP4 x PP2) -> HF bit-identically within the memory of a 24 GiB machine.

Slow (writes 3 x 15.2 GB, about 10-20 minutes on 2 cores): `make test-slow` or
    PYTHONPATH=. .venv/bin/python -m pytest -q -m slow tests/test_convert_7b.py -s
At most two copies exist at once (the HF input is deleted once converted, and the output is
compared against the same regenerated bit patterns), so it needs ~31 GB of scratch space; put
it elsewhere with ACE_BIG_TMP=/path. The peak memory of each step and what else the machine
was doing are printed (run with -s).

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


def _entries() -> list:
    from megatron_ace.checkpoint.safetensors_stream import TensorEntry
    from megatron_ace.model.config import preset
    from megatron_ace.model.mapping import hf_shapes

    shapes = hf_shapes(preset("qwen2.5-math-7b"))
    return [TensorEntry(name=n, shape=s, dtype=torch.bfloat16) for n, s in shapes.items()]


def _weights(entries: list):
    """(name, tensor) of arbitrary bf16 bit patterns, the same on every call."""
    gen = torch.Generator().manual_seed(0)
    for e in entries:
        bits = torch.randint(-2**15, 2**15, e.shape, dtype=torch.int16, generator=gen)
        yield e.name, bits.view(torch.bfloat16)


def _write_hf(out: Path) -> int:
    from megatron_ace.checkpoint.safetensors_stream import INDEX_NAME, StreamingWriter
    from megatron_ace.model.config import preset

    cfg = preset("qwen2.5-math-7b")
    entries = _entries()
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
    weights = _weights(entries)
    for i, group in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with StreamingWriter(out / name, group, {"format": "pt"}) as writer:
            for e, (_, tensor) in zip(group, weights):
                writer.write(e.name, tensor)
                weight_map[e.name] = name
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total},
                                              "weight_map": weight_map}))
    hf = cfg.to_hf_config()
    hf["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(hf))
    return total


def _machine() -> str:
    """What else the (shared) machine was doing: load, available memory, largest processes."""
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    avail = int(info["MemAvailable"].split()[0]) / 2**20
    ps = subprocess.run(["ps", "-eo", "rss=,args=", "--sort=-rss"], capture_output=True,
                        text=True).stdout.splitlines()[:4]
    top = "; ".join(f"{int(line.split(None, 1)[0]) / 2**20:.1f} GiB {line.split(None, 1)[1][:60]}"
                    for line in ps if line.strip())
    return f"load {os.getloadavg()[0]:.1f}, MemAvailable {avail:.1f} GiB, largest: {top}"


def _peak_memory(cmd: list[str]) -> dict[str, float]:
    """Run `cmd`; its peak VmHWM and RssAnon (GiB), sampled every 50 ms."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    log = tempfile.TemporaryFile(mode="w+")  # not a pipe: a full pipe would stall the child
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=log, text=True)
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
    code = proc.wait()
    log.seek(0)
    assert code == 0, log.read()[-3000:]
    log.close()
    return {k: v / GIB for k, v in peak.items()}


@pytest.mark.slow
def test_7b_bf16_round_trip_within_24_gib():
    from megatron_ace.checkpoint.safetensors_stream import LazyReader

    base = Path(tempfile.mkdtemp(prefix="ace-7b-", dir=os.environ.get("ACE_BIG_TMP")))
    try:
        if shutil.disk_usage(base).free < 33 * 10**9:
            pytest.skip(f"needs ~33 GB free under {base}")
        total = _write_hf(base / "hf")
        assert 15.0e9 < total < 15.5e9
        tool = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py")]
        print(f"\nbefore hf-to-mcore: {_machine()}")
        t0 = time.perf_counter()
        to_mcore = _peak_memory(tool + ["hf-to-mcore", "--hf-dir", str(base / "hf"), "--out",
                                        str(base / "m"), "--tp", "4", "--pp", "2"])
        to_mcore_s = time.perf_counter() - t0
        shutil.rmtree(base / "hf")
        print(f"before mcore-to-hf: {_machine()}")
        t0 = time.perf_counter()
        to_hf = _peak_memory(tool + ["mcore-to-hf", "--mcore-dir", str(base / "m"), "--out",
                                     str(base / "hf2")])
        to_hf_s = time.perf_counter() - t0
        print(f"7B bf16 {total / 1e9:.1f} GB: hf-to-mcore {to_mcore_s:.0f} s, peak RSS "
              f"{to_mcore['VmHWM']:.2f} GiB (anonymous {to_mcore['RssAnon']:.2f}); mcore-to-hf "
              f"{to_hf_s:.0f} s, peak RSS {to_hf['VmHWM']:.2f} GiB (anonymous "
              f"{to_hf['RssAnon']:.2f}); after: {_machine()}")
        for peak in (to_mcore, to_hf):
            assert peak["VmHWM"] * GIB < LIMIT
        shutil.rmtree(base / "m")
        out = LazyReader(base / "hf2")
        entries = _entries()
        assert sorted(out.names()) == sorted(e.name for e in entries)
        for name, want in _weights(entries):
            assert torch.equal(out.get(name).view(torch.int16), want.view(torch.int16)), name
    finally:
        shutil.rmtree(base, ignore_errors=True)
