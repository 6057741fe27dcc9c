"""Checkpoint save / load time and GB/s: megatron-core torch_dist (train/state.py) vs safetensors.

Two cases, each in a fresh child process, one rank (world size 1, gloo):
- `model-bf16`: the model's weights in bf16, saved as a model-only torch_dist checkpoint
  (`dist_io.save(model.sharded_state_dict())`, what the converter writes) and loaded back
  with megatron-core's `dist_checkpointing.load`;
- `train-fp32`: the full training state of the CPU trainer (float32 weights + AdamW's two
  moments), through `save_training_state` / `load_training_state`, synchronous and
  asynchronous (the time training is blocked, and the time until the checkpoint is committed).
Baseline, same process and same tensors: a safetensors file of exactly those tensors written
one tensor at a time and fsynced (the project's streaming safetensors writer: same format as
the safetensors library, without holding a second copy of the model), and read back into the
same tensors. Every "load" reads a file just written, from the page cache on both sides.

  python bench/bench_checkpoint.py --preset qwen2.5-0.5b --out bench/out/checkpoint.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _safetensors_baseline(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, float]:
    from safetensors import safe_open

    from megatron_ace.checkpoint.safetensors_stream import StreamingWriter, TensorEntry

    entries = [TensorEntry(name=k, shape=tuple(v.shape), dtype=v.dtype) for k, v in tensors.items()]
    t0 = time.perf_counter()
    with StreamingWriter(path, entries) as writer:
        for k, v in tensors.items():
            writer.write(k, v)
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with safe_open(str(path), framework="pt") as f, torch.no_grad():
        for k, v in tensors.items():
            v.copy_(f.get_tensor(k))
    return {"save_s": save_s, "load_s": time.perf_counter() - t0, "bytes": path.stat().st_size}


def _trainer(preset_name: str):
    from megatron_ace.model.config import preset
    from megatron_ace.model.parallel import ParallelConfig, init_parallel
    from megatron_ace.train.config import OptimBackend, OptimConfig
    from megatron_ace.train.sft import build_trainer

    ps = init_parallel(ParallelConfig(), seed=0)
    optim = OptimConfig(lr=1e-4, backend=OptimBackend.TORCH)
    return ps, build_trainer(preset(preset_name), ps, optim, total_steps=10, dtype=torch.float32)


def _best(passes: list[dict[str, float]]) -> dict[str, float]:
    """Per figure, the fastest of the passes (sizes are equal across passes)."""
    return {k: min(p[k] for p in passes) for k in passes[0]}


def _passes(measure_base, measure_dist, repeats: int, tmp: Path) -> dict:
    """`repeats` passes, the two sides in alternating order, each pass on fresh files."""
    base, dist = [], []
    for i in range(repeats):
        work = tmp / f"pass{i}"
        work.mkdir()
        for side in ((measure_base, base), (measure_dist, dist))[:: 1 if i % 2 == 0 else -1]:
            side[1].append(side[0](work))
        shutil.rmtree(work)
    return {"torch_dist": _best(dist), "safetensors": _best(base)}


def _model_bf16(preset_name: str, tmp: Path, repeats: int) -> dict:
    from megatron.core import dist_checkpointing

    from megatron_ace.checkpoint import dist_io
    from megatron_ace.model.builder import build_model
    from megatron_ace.model.config import preset
    from megatron_ace.model.parallel import ParallelConfig, init_parallel

    ps = init_parallel(ParallelConfig(), seed=0)
    model = build_model(preset(preset_name), ps, dtype=torch.bfloat16)
    tensors = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}

    def dist(work: Path) -> dict[str, float]:
        (work / "dist").mkdir()
        t0 = time.perf_counter()
        dist_io.save(model.sharded_state_dict(), work / "dist", dp_group=ps.dp_group)
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        loaded = dist_checkpointing.load(model.sharded_state_dict(), str(work / "dist"))
        model.load_state_dict(loaded, strict=False)
        return {"save_s": save_s, "load_s": time.perf_counter() - t0,
                "bytes": _dir_bytes(work / "dist")}

    return _passes(lambda w: _safetensors_baseline(tensors, w / "model.safetensors"), dist,
                   repeats, tmp)


def _train_fp32(preset_name: str, tmp: Path, repeats: int) -> dict:
    from megatron_ace.train import state

    ps, trainer = _trainer(preset_name)
    opt = trainer.opt.optimizer
    tensors = {}
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():  # moments as after some steps
            opt.state[p].update(exp_avg=torch.randn_like(p) * 1e-3,
                                exp_avg_sq=torch.rand_like(p) * 1e-6, step=torch.tensor(10.0))
            tensors.update({name: p.data, f"exp_avg.{name}": opt.state[p]["exp_avg"],
                            f"exp_avg_sq.{name}": opt.state[p]["exp_avg_sq"]})
    kw = dict(model_chunks=trainer.opt.model_chunks, opt=trainer.opt, sched=trainer.sched, ps=ps)

    def dist(work: Path) -> dict[str, float]:
        t0 = time.perf_counter()
        path = state.save_training_state(work / "sync", step=10, data_state={}, keep_last=1, **kw)
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        state.load_training_state(path, **kw)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        state.save_training_state(work / "async", step=10, data_state={}, keep_last=1,
                                  async_save=True, **kw)
        blocked_s = time.perf_counter() - t0
        state.finish_saves()
        return {"save_s": save_s, "load_s": load_s, "bytes": _dir_bytes(path),
                "async_blocked_s": blocked_s, "async_committed_s": time.perf_counter() - t0}

    return _passes(lambda w: _safetensors_baseline(tensors, w / "state.safetensors"), dist,
                   repeats, tmp)


def _child(case: str, preset_name: str, tmp: str, repeats: int, q) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()))
    try:
        fn = _model_bf16 if case == "model-bf16" else _train_fp32
        result = fn(preset_name, Path(tmp), repeats)
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        q.put(result)
    except BaseException as exc:  # report, then fail in the parent
        q.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / 1e9 / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen2.5-0.5b", help="model shape")
    ap.add_argument("--case", action="append", choices=["model-bf16", "train-fp32"],
                    help="cases to run (default: both)")
    ap.add_argument("--repeats", type=int, default=2, help="passes; the fastest is reported")
    ap.add_argument("--tmp", default=None, help="scratch directory (default: system temp)")
    ap.add_argument("--out", required=True, help="JSON results")
    args = ap.parse_args()
    results = {"preset": args.preset, "repeats": args.repeats, "load_average": os.getloadavg(),
               "cases": {}}
    for case in args.case or ["model-bf16", "train-fp32"]:
        tmp = Path(tempfile.mkdtemp(prefix="ace-bench-ckpt-", dir=args.tmp))
        try:
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            proc = ctx.Process(target=_child, args=(case, args.preset, str(tmp), args.repeats, q))
            proc.start()
            r = q.get()
            proc.join()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if "error" in r:
            raise SystemExit(f"{case}: {r['error']}")
        for side in ("torch_dist", "safetensors"):
            s = r[side]
            s["save_gbps"], s["load_gbps"] = _gbps(s["bytes"], s["save_s"]), _gbps(s["bytes"], s["load_s"])
        td, st = r["torch_dist"], r["safetensors"]
        r["save_ratio"], r["load_ratio"] = td["save_s"] / st["save_s"], td["load_s"] / st["load_s"]
        results["cases"][case] = r
        print(f"{case} ({args.preset}): torch_dist save {td['save_s']:.2f} s "
              f"({td['save_gbps']:.2f} GB/s), load {td['load_s']:.2f} s ({td['load_gbps']:.2f} GB/s),"
              f" {td['bytes'] / 1e9:.2f} GB | safetensors save {st['save_s']:.2f} s "
              f"({st['save_gbps']:.2f} GB/s), load {st['load_s']:.2f} s ({st['load_gbps']:.2f} GB/s),"
              f" {st['bytes'] / 1e9:.2f} GB | ratio save {r['save_ratio']:.2f}x load "
              f"{r['load_ratio']:.2f}x | peak RSS {r['peak_rss_gb']:.1f} GB", flush=True)
        if "async_blocked_s" in td:
            print(f"  async save: training blocked {td['async_blocked_s']:.2f} s, committed after "
                  f"{td['async_committed_s']:.2f} s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
