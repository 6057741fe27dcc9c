"""Conversion throughput (GB/s) and peak RSS vs model size, each step in a fresh child process.

Random HF weights are written with the streaming writer straight from mapping.hf_shapes (no
transformers model is instantiated). Baseline: reading every tensor of the HF files.
  python bench/bench_convert.py --preset tiny --preset qwen2.5-0.5b --out bench.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import torch


def make_random_hf(out: Path, name: str, dtype: torch.dtype) -> None:
    from megatron_ace.checkpoint.safetensors_stream import StreamingWriter, TensorEntry
    from megatron_ace.model.config import preset
    from megatron_ace.model.mapping import hf_shapes

    cfg = preset(name)
    out.mkdir(parents=True, exist_ok=True)
    shapes = hf_shapes(cfg)
    entries = [TensorEntry(name=n, shape=s, dtype=dtype) for n, s in shapes.items()]
    with StreamingWriter(out / "model.safetensors", entries, {"format": "pt"}) as w:
        for n, s in shapes.items():
            w.write(n, (torch.randn(s) * 0.02).to(dtype))
    hf = cfg.to_hf_config()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf))


def _child(step: str, a: str, b: str, q) -> None:
    from megatron_ace.checkpoint import convert
    from megatron_ace.checkpoint.safetensors_stream import LazyReader

    t0 = time.perf_counter()
    if step == "read_hf":
        r = LazyReader(a)
        nbytes = sum(r.get(n).numel() * r.get(n).element_size() for n in r.names())
    elif step == "hf_to_mcore_tp2":
        convert.hf_to_mcore(a, b, tp=2, pp=1)
        nbytes = None
    else:
        convert.mcore_to_hf(a, b)
        nbytes = None
    q.put((time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))


def _measure(step, a, b) -> dict:
    q = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=_child, args=(step, a, b, q))
    p.start()
    secs, rss = q.get()
    p.join()
    return {"seconds": secs, "peak_rss_bytes": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", action="append", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default="bench_convert.json")
    args = ap.parse_args()
    results = []
    for name in args.preset or ["tiny"]:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            make_random_hf(tmp / "hf", name, getattr(torch, args.dtype))
            size = (tmp / "hf" / "model.safetensors").stat().st_size
            row = {"preset": name, "weights_bytes": size}
            for step, a, b in [("read_hf", tmp / "hf", ""), ("hf_to_mcore_tp2", tmp / "hf",
                               tmp / "m"), ("mcore_to_hf", tmp / "m", tmp / "hf2")]:
                m = _measure(step, str(a), str(b))
                m["GB_per_s"] = size / 1e9 / m["seconds"]
                row[step] = m
            results.append(row)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
