"""Weight sync into a running vLLM engine: seconds per sync against vLLM's own reload, GB/s,
and peak extra trainer memory.

For each model preset and TP size, a fresh set of processes (plain python for TP1, torchrun for
TP > 1) builds a randomly initialised Megatron-Core model, starts a vLLM engine in its own
process (so the trainer's RSS is the trainer's alone) from an HF directory of the same shape,
and streams the model into it with `WeightSyncer` (gather TP shards -> HF names -> buckets ->
engine reload), the path the GRPO loop runs every step. Transports and variants:

- `shared_memory`: what `ace grpo` runs at TP1 on a CPU. The trainer's parameters are moved
  into a shared-memory file once, and the engine reads the HF tensors that are views of them
  where they lie (all but q/k/v, which the gather copies); the rest goes through a bucket file;
- `shared_memory_copy`: every bucket copied into a reused shared-memory file (the parameters
  not shared); `shared_memory_overlap`: the same with the next bucket packed while the engine
  loads the current one; `shared_memory_fresh`: copied into a new file per bucket (the
  transport as it first was);
- `bytes`: safetensors-serialised buckets through vLLM's RPC.

Per bucket size and transport it reports:

- seconds per sync and GB/s (median of `--repeats` rounds, after one warm-up round);
- `engine_reload_floor_s`, measured in the same rounds: vLLM's layerwise reload alone
  (initialize -> load_weights -> finalize, as the worker extension runs it) fed the same HF
  tensors already held in the engine's process, so no transport is involved; every sync is
  reported as a ratio to it (what a CPU sync can reach without changing vLLM);
- the gather alone (TP all-gather + HF split, no engine), to split the cost;
- the peak extra RSS of the trainer's rank 0 during a sync (VmHWM reset through
  /proc/self/clear_refs right before, minus VmRSS before), plus the tmpfs pages of the bucket
  files the sender keeps between syncs (already in RSS before a warm sync, so counted
  separately; a shared parameter file is the parameters themselves, not extra memory);
- baseline, measured in the same process: a plain memory copy of the same number of bytes
  (256 MiB blocks, larger than any cache, so it streams from DRAM).

Each sync is paired with a floor measured right before it, in rounds over all the cases, so
load from other jobs on the machine hits both alike: `sync_over_floor` is the median of the
paired ratios (and `best_sync_over_best_floor` the ratio of the best times); the ratios are
what to read. `cpu_over_floor_cpu` compares CPU time (rank 0 and the engine's process, every
thread) instead, which an overloaded machine inflates much less than wall time (packing that
overlaps the engine's loading would cost CPU time but no wall time if a core were free).

    python bench/bench_weight_sync.py --out bench/out/weight_sync.json          # short: 0.5B, TP1
    python bench/bench_weight_sync.py --full --out bench/out/weight_sync.json   # the sweep
    python bench/bench_weight_sync.py --preset tiny --tp 1 --repeats 1 --out /tmp/ws.json

Memory: the 0.5B shape is run in bfloat16 by default (about 1 GB in the trainer, again in the
engine, and again for the floor's held copy); float32 doubles that. The script checks
MemAvailable before each case.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any directory
    sys.path.insert(0, str(REPO))

MiB = 2**20
COPY_BLOCK_BYTES = 256 * MiB
SHORT_PRESETS, SHORT_TP = ("qwen2.5-0.5b",), (1,)
FULL_PRESETS, FULL_TP = ("tiny", "qwen2.5-0.5b"), (1, 2)
SHORT_BUCKETS_MB = {"tiny": (1.0,), "qwen2.5-0.5b": (256.0,)}
"""The GRPO default (`rollout.bucket_mb`)."""
FULL_BUCKETS_MB = {"tiny": (0.25, 1.0, 4.0), "qwen2.5-0.5b": (32.0, 128.0, 256.0, 512.0)}
DEFAULT_DTYPE = {"tiny": "float32", "qwen2.5-0.5b": "bfloat16"}
GOAL = {"preset": "qwen2.5-0.5b", "tp": 1, "dtype": "bfloat16", "transport": "shared_memory",
        "max_sync_over_floor": 1.3}
HOLD_BUCKET_BYTES = 256 * MiB
TRANSPORTS = ("bytes", "shared_memory", "shared_memory_copy", "shared_memory_overlap",
              "shared_memory_fresh")
"""Transports, and shared-memory variants that show what each step buys in the same run."""
SHARED = "shared_memory"
"""The variant that moves the trainer's parameters into shared memory first (at TP1), as
`ace grpo` does: the engine reads them where they lie."""


def _variants() -> dict[str, dict]:
    from megatron_ace.rollout.transport import TransportKind

    shm = TransportKind.SHARED_MEMORY
    return {
        # Every bucket copied into a reused file (the parameters not shared).
        "shared_memory_copy": {"transport": shm},
        # Copied, the next bucket packed while the engine loads the current one (two files).
        "shared_memory_overlap": {"transport": shm, "overlap": True},
        # Copied, into a fresh file per bucket: the transport as it first was.
        "shared_memory_fresh": {"transport": shm, "shm_reuse_files": False},
    }


@dataclasses.dataclass(kw_only=True)
class Case:
    """One (model, layout) measured in its own processes."""

    preset: str
    """Model preset name (megatron_ace.model.config.PRESETS)."""
    tp: int
    """Trainer tensor-parallel size (= processes)."""
    dtype: str
    """Trainer and engine dtype."""
    buckets_mb: tuple[float, ...]
    """Bucket sizes to measure."""
    transports: tuple[str, ...]
    """TransportKind values to measure."""
    repeats: int
    """Timed syncs per (bucket, transport)."""

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"Case.tp must be >= 1, got {self.tp}")
        if self.repeats < 1:
            raise ValueError(f"Case.repeats must be >= 1, got {self.repeats}")
        if not self.buckets_mb or min(self.buckets_mb) <= 0:
            raise ValueError(f"Case.buckets_mb must be positive sizes, got {self.buckets_mb}")


# ---- memory probes (Linux /proc) ---------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# ---- pieces timed on rank 0 --------------------------------------------------------------------
def memcpy_seconds(num_bytes: int, repeats: int) -> float:
    """Best time to copy `num_bytes` with torch's memcpy, in blocks larger than any cache."""
    import torch

    block = min(num_bytes, COPY_BLOCK_BYTES)
    src = torch.ones(block, dtype=torch.uint8)
    dst = torch.zeros(block, dtype=torch.uint8)
    full, rest = divmod(num_bytes, block)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass faults the pages in
        start = time.perf_counter()
        for _ in range(full):
            dst.copy_(src)
        if rest:
            dst[:rest].copy_(src[:rest])
        best = min(best, time.perf_counter() - start)
    return best


def write_random_hf(out: Path, cfg, dtype) -> Path:
    """An HF directory vLLM can start from: config, zero weights of the model's shape, tokenizer.

    Zeros, not the trainer's weights: the sync has to move every byte for real.
    """
    import torch

    from megatron_ace.checkpoint.safetensors_stream import StreamingWriter, TensorEntry
    from megatron_ace.data.tiny_tokenizer import build_tiny_tokenizer
    from megatron_ace.model.mapping import hf_shapes

    out.mkdir(parents=True, exist_ok=True)
    shapes = hf_shapes(cfg)
    entries = [TensorEntry(name=n, shape=s, dtype=dtype) for n, s in shapes.items()]
    with StreamingWriter(out / "model.safetensors", entries, {"format": "pt"}) as writer:
        for name, shape in shapes.items():
            writer.write(name, torch.zeros(shape, dtype=dtype))
    hf = cfg.to_hf_config()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    build_tiny_tokenizer(out)
    return out


# ---- the worker: one case, every rank ----------------------------------------------------------
def _drive(iterator) -> None:
    for _ in iterator:
        pass


def cpu_seconds() -> float:
    """CPU time (user + system, every thread) of this process and of its children, which
    include the engine's process."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def _timed_sync(syncer, model, cfg, ps, version: int) -> tuple[float, dict | None, int, float]:
    """One sync on every rank; rank 0 returns (seconds, metrics, peak extra RSS bytes, CPU
    seconds of rank 0 and the engine)."""
    import gc

    import torch.distributed as dist

    from megatron_ace.model.weights import iter_hf_tensors

    gc.collect()
    dist.barrier()
    rss_before = _status_kib("VmRSS")
    reset_peak_rss()
    cpu = cpu_seconds()
    start = time.perf_counter()
    tensors = iter_hf_tensors(model, cfg, ps)
    metrics = syncer.sync(tensors, version=version).to_dict(prefix="") if ps.rank == 0 \
        else _drive(tensors)
    seconds = time.perf_counter() - start
    cpu = cpu_seconds() - cpu
    peak_extra = (_status_kib("VmHWM") - rss_before) * 1024
    return seconds, metrics, peak_extra, cpu


def _gather_seconds(model, cfg, ps, repeats: int) -> float:
    import torch.distributed as dist

    from megatron_ace.model.weights import iter_hf_tensors

    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        _drive(iter_hf_tensors(model, cfg, ps))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _start_engine(cfg, dtype_name: str, tmp: Path):
    import torch

    from megatron_ace.rollout.engine import DType, RolloutEngineConfig, VllmRolloutEngine

    hf_dir = write_random_hf(tmp / "hf", cfg, getattr(torch, dtype_name))
    start = time.perf_counter()
    engine = VllmRolloutEngine(RolloutEngineConfig(
        model_path=str(hf_dir), dtype=DType(dtype_name), cpu_kvcache_space_gib=1,
        max_model_len=64, in_process=False, max_num_seqs=4))
    return engine, time.perf_counter() - start


def _hold_in_engine(engine, model, cfg, ps) -> int:
    """Copy the model's HF tensors into the engine's process once (for the floor); every rank
    drives the gather, rank 0 returns how many tensors the engine holds."""
    from megatron_ace.model.weights import iter_hf_tensors
    from megatron_ace.rollout.shm_transport import SharedMemoryOptions, SharedMemorySender
    from megatron_ace.rollout.weight_sync import iter_buckets

    tensors = iter_hf_tensors(model, cfg, ps)
    if ps.rank != 0:
        return _drive(tensors) or 0
    sender = SharedMemorySender(SharedMemoryOptions(reuse_files=False))
    held = 0
    try:
        for bucket in iter_buckets(tensors, HOLD_BUCKET_BYTES):
            descriptor = sender.pack(bucket)
            try:
                held += int(engine.llm.collective_rpc("ace_hold_weights", args=(descriptor,))[0])
            finally:
                sender.release(descriptor)
    finally:
        sender.close()
    return held


def _floor(engine) -> tuple[float, float]:
    """vLLM's layerwise reload of the held tensors: (seconds timed inside the engine's process,
    CPU seconds of this process and the engine's, as for a sync)."""
    cpu = cpu_seconds()
    seconds = float(engine.llm.collective_rpc("ace_time_held_reload")[0])
    return seconds, cpu_seconds() - cpu


def _make_syncers(case: Case, engine, model, ps) -> dict[tuple[str, float], object]:
    from megatron_ace.rollout.transport import TransportKind
    from megatron_ace.rollout.weight_sync import WeightSyncConfig, WeightSyncer

    keys = [(t, b) for t in case.transports for b in case.buckets_mb]
    variants = _variants()
    if ps.rank != 0:
        return dict.fromkeys(keys)

    def options(t: str) -> dict:
        return variants[t] if t in variants else {"transport": TransportKind(t)}

    syncers, shared_sender = {}, None
    for t, b in keys:
        config = WeightSyncConfig(bucket_bytes=int(b * MiB), **options(t))
        syncers[t, b] = WeightSyncer(engine, config, sender=shared_sender if t == SHARED else None)
        if t == SHARED and shared_sender is None and ps.tp_size == 1:
            # As `ace grpo` does. The parameters can lie in one file only: the other bucket
            # sizes use the same sender.
            syncers[t, b].share_parameters(model.parameters())
            shared_sender = syncers[t, b].sender
    return syncers


def _measure_rounds(case: Case, engine, model, cfg, ps) -> tuple[list[dict], list[float]]:
    """Round 0 warms up; each later round runs, for every (transport, bucket), the floor and
    then the sync, so each sync has a floor measured right before it (the load from other
    jobs drifts slowly compared with the ~1-2 s pair). Returns the rows (rank 0) and every
    timed floor."""
    syncers = _make_syncers(case, engine, model, ps)
    runs: dict[tuple[str, float], list] = {k: [] for k in syncers}
    paired: dict[tuple[str, float], list[tuple[float, float]]] = {k: [] for k in syncers}
    version = 0
    try:
        for _ in range(case.repeats + 1):
            for key, syncer in syncers.items():
                version += 1
                paired[key].append(_floor(engine) if ps.rank == 0 else (0.0, 0.0))
                runs[key].append(_timed_sync(syncer, model, cfg, ps, version))
        rows = [_row(key, syncers[key], runs[key], paired[key]) for key in syncers]
    finally:
        for syncer in syncers.values():
            if syncer is not None:
                syncer.close()  # a sender shared by several syncers closes twice: harmless
    return rows, [f for k in syncers for f in paired[k][1:]]


def _row(key: tuple[str, float], syncer, runs: list, floors: list[tuple[float, float]]) -> dict:
    transport, bucket_mb = key
    timed, floors = runs[1:], floors[1:]
    metrics = timed[-1][1] or {}
    sender = getattr(syncer, "sender", None)
    sync_s, sync_cpu_s = [r[0] for r in timed], [r[3] for r in timed]
    floor_s, floor_cpu_s = [f[0] for f in floors], [f[1] for f in floors]
    return {"transport": transport, "bucket_mb": bucket_mb,
            "sync_s": statistics.median(sync_s), "sync_runs_s": sync_s,
            "floor_runs_s": floor_s, "first_sync_s": runs[0][0],
            "sync_over_floor": statistics.median(s / f for s, f in zip(sync_s, floor_s)),
            "best_sync_over_best_floor": min(sync_s) / min(floor_s),
            "sync_cpu_runs_s": sync_cpu_s, "floor_cpu_runs_s": floor_cpu_s,
            "cpu_over_floor_cpu": statistics.median(s / f for s, f in zip(sync_cpu_s, floor_cpu_s)),
            "num_buckets": metrics.get("num_buckets"),
            "num_retained_buckets": metrics.get("num_retained_buckets"),
            "num_shared_bytes": metrics.get("num_shared_bytes"),
            "peak_bucket_bytes": metrics.get("peak_bucket_bytes"),
            "peak_extra_rss_bytes": max(r[2] for r in timed),
            "held_shm_bytes": getattr(sender, "held_bytes", 0),
            "shm_files_created": getattr(sender, "files_created", None)}


def run_case(case: Case) -> dict | None:
    """Every rank runs this; rank 0 returns the case's record."""
    import torch

    from megatron_ace.model.builder import build_model
    from megatron_ace.model.config import preset
    from megatron_ace.model.parallel import ParallelConfig, destroy_parallel, init_parallel

    cfg = preset(case.preset)
    ps = init_parallel(ParallelConfig(tp=case.tp), seed=0)
    engine = None
    try:
        with tempfile.TemporaryDirectory(prefix="ace-bench-sync-") as tmp:
            model = build_model(cfg, ps, dtype=getattr(torch, case.dtype))
            model.eval()
            start_s = None
            if ps.rank == 0:
                engine, start_s = _start_engine(cfg, case.dtype, Path(tmp))
            held = _hold_in_engine(engine, model, cfg, ps)
            rows, floors = _measure_rounds(case, engine, model, cfg, ps)
            gather_s = _gather_seconds(model, cfg, ps, case.repeats)
        if ps.rank != 0:
            return None
        return _record(case, cfg, rows, floors, held, start_s, gather_s)
    finally:
        if engine is not None:
            engine.close()
        destroy_parallel()


def _record(case: Case, cfg, rows: list[dict], floors: list[float], held: int,
            start_s: float, gather_s: float) -> dict:
    import torch

    num_bytes = cfg.num_params() * torch.tensor([], dtype=getattr(torch, case.dtype)).element_size()
    copy_s = memcpy_seconds(num_bytes, case.repeats)
    floor_s = statistics.median(f[0] for f in floors)
    for row in rows:
        row["gb_per_s"] = num_bytes / 1e9 / row["sync_s"]
        row["sync_over_memcpy"] = row["sync_s"] / copy_s
        memory = row["peak_extra_rss_bytes"] + row["held_shm_bytes"]
        row["peak_extra_over_bucket"] = memory / (row["bucket_mb"] * MiB)
    return {"preset": case.preset, "tp": case.tp, "dtype": case.dtype, "num_bytes": num_bytes,
            "num_params": cfg.num_params(), "engine_start_s": start_s,
            "engine_reload_floor_s": floor_s, "engine_reload_floor_runs_s": [f[0] for f in floors],
            "engine_reload_floor_cpu_s": statistics.median(f[1] for f in floors),
            "floor_num_tensors": held, "gather_only_s": gather_s, "memcpy_s": copy_s,
            "memcpy_gb_per_s": num_bytes / 1e9 / copy_s, "syncs": rows,
            "peak_rss_reset_supported": reset_peak_rss()}


# ---- the driver: one fresh process group per case -----------------------------------------------
def _launch(case: Case, out: Path, timeout_s: int) -> dict:
    args = [str(Path(__file__).resolve()), "--worker", "--preset", case.preset,
            "--tp", str(case.tp), "--dtype", case.dtype, "--repeats", str(case.repeats),
            "--bucket-mb", *map(str, case.buckets_mb), "--transport", *case.transports,
            "--out", str(out)]
    if case.tp == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={case.tp}",
               f"--master-port={_free_port()}", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", "1"), "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{case.preset} tp{case.tp} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_memory(case: Case) -> None:
    from megatron_ace.model.config import preset

    width = 4 if case.dtype == "float32" else 2
    model_bytes = preset(case.preset).num_params() * width
    # trainer shards (1x) + engine copy (1x) + the floor's held copy in the engine (1x) + rank
    # 0's largest gathered tensor and bucket files (~1x at most) + ~1.5 GB per process of
    # torch / vLLM imports.
    need = 4 * model_bytes + int(1.5e9) * (case.tp + 1)
    have = mem_available_bytes()
    if have and need > have:
        raise SystemExit(f"bench_weight_sync: {case.preset} tp{case.tp} {case.dtype} needs about "
                         f"{need / 1e9:.1f} GB, only {have / 1e9:.1f} GB available; "
                         "use --dtype bfloat16 or a smaller --preset")


def table(results: list[dict]) -> str:
    head = ("| model | TP | dtype | transport | bucket MiB | s/sync | floor s | sync / floor | "
            "CPU / floor CPU | GB/s | memcpy GB/s | sync / memcpy | gather-only s | "
            "read in place MB | peak extra RSS MB | held shm MB | (peak + held) / bucket |")
    lines = [head, "|" + "---|" * 17]
    for res in results:
        for row in res["syncs"]:
            lines.append(
                f"| {res['preset']} ({res['num_bytes'] / 1e6:.0f} MB) | {res['tp']} | "
                f"{res['dtype']} | {row['transport']} | {row['bucket_mb']:g} | "
                f"{row['sync_s']:.3f} | {res['engine_reload_floor_s']:.3f} | "
                f"{row['sync_over_floor']:.2f}x | {row['cpu_over_floor_cpu']:.2f}x | "
                f"{row['gb_per_s']:.3f} | "
                f"{res['memcpy_gb_per_s']:.2f} | {row['sync_over_memcpy']:.0f}x | "
                f"{res['gather_only_s']:.3f} | {(row['num_shared_bytes'] or 0) / 1e6:.0f} | "
                f"{row['peak_extra_rss_bytes'] / 1e6:.0f} | "
                f"{row['held_shm_bytes'] / 1e6:.0f} | {row['peak_extra_over_bucket']:.2f} |")
    return "\n".join(lines)


def goal_lines(results: list[dict]) -> list[str]:
    """One line per measured row of the goal's case: met or not."""
    lines = []
    for res in results:
        if (res["preset"], res["tp"], res["dtype"]) != (GOAL["preset"], GOAL["tp"], GOAL["dtype"]):
            continue
        for row in res["syncs"]:
            if row["transport"] != GOAL["transport"]:
                continue
            ratio, limit = row["sync_over_floor"], GOAL["max_sync_over_floor"]
            lines.append(
                f"goal: {res['preset']} {res['dtype']} TP{res['tp']} over {row['transport']} "
                f"({row['bucket_mb']:g} MiB buckets) <= {limit}x engine_reload_floor_s: "
                f"{ratio:.2f}x ({'met' if ratio <= limit else 'NOT met'}; median of paired "
                f"ratios; medians {row['sync_s']:.3f} s vs {res['engine_reload_floor_s']:.3f} s, "
                f"best vs best {row['best_sync_over_best_floor']:.2f}x, CPU time "
                f"{row['cpu_over_floor_cpu']:.2f}x)")
    return lines


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true",
                   help="the full sweep: tiny and qwen2.5-0.5b, TP1 and TP2, several bucket sizes "
                        "(default: qwen2.5-0.5b, TP1, the GRPO bucket size)")
    p.add_argument("--preset", action="append", default=None, help="model preset (repeatable)")
    p.add_argument("--tp", type=int, action="append", default=None, help="TP size (repeatable)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="default: float32 for tiny, bfloat16 for qwen2.5-0.5b")
    p.add_argument("--bucket-mb", type=float, nargs="+", default=None,
                   help="bucket sizes in MiB (default per preset)")
    p.add_argument("--transport", nargs="+", default=list(TRANSPORTS), choices=TRANSPORTS,
                   help="shared_memory_overlap: the next bucket packed while the engine "
                        "loads; shared_memory_fresh: a new file per bucket")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed rounds (each: every sync once, each after a floor)")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per case")
    p.add_argument("--out", type=Path, default=Path("bench_weight_sync.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def _cases(args) -> list[Case]:
    presets = args.preset or (FULL_PRESETS if args.full else SHORT_PRESETS)
    buckets = FULL_BUCKETS_MB if args.full else SHORT_BUCKETS_MB
    return [Case(preset=name, tp=tp, dtype=args.dtype or DEFAULT_DTYPE.get(name, "float32"),
                 buckets_mb=tuple(args.bucket_mb or buckets.get(name, (64.0,))),
                 transports=tuple(args.transport), repeats=args.repeats)
            for name in presets for tp in (args.tp or (FULL_TP if args.full else SHORT_TP))]


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        case = Case(preset=args.preset[0], tp=args.tp[0], dtype=args.dtype,
                    buckets_mb=tuple(args.bucket_mb), transports=tuple(args.transport),
                    repeats=args.repeats)
        record = run_case(case)
        if record is not None:
            args.out.write_text(json.dumps(record, indent=2) + "\n")
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="ace-bench-sync-out-") as tmp:
        for case in _cases(args):
            _check_memory(case)
            out = Path(tmp) / f"{case.preset}_tp{case.tp}.json"
            results.append(_launch(case, out, args.timeout))
            sys.stdout.write(f"done: {case.preset} tp{case.tp}\n")
            sys.stdout.flush()
    goals = goal_lines(results)
    report = {"benchmark": "weight_sync", "cases": results, "goal": goals,
              "baseline": "engine_reload_floor_s: vLLM's layerwise reload of tensors already in "
                          "the engine's process, same rounds; memcpy of the same bytes in "
                          "256 MiB blocks, same process",
              "load_average": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(table(results) + "\n" + "".join(g + "\n" for g in goals))
    return 0


if __name__ == "__main__":  # the engine's process is spawned and re-imports this file
    sys.exit(main(sys.argv[1:]))
