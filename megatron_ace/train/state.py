"""Save and resume the full training state, atomically, keeping the last K checkpoints.

A checkpoint is one directory `<root>/step_00000050/` holding:
- `model_tp{t}_pp{p}.pt`: this TP/PP shard of the weights (written by DP rank 0 only);
- `optim_tp{t}_pp{p}_dp{d}.pt`: the optimizer state of that shard (every DP rank when the
  optimizer shards its state over DP, else DP rank 0 only) and the lr schedule;
- `rng_rank{r}.pt`: python, numpy, torch (and CUDA / megatron RNG tracker) states of each rank;
- `meta.json`: step, data-sampler state, layout and free-form `extra`, written last.
Every rank writes into a hidden `.tmp-step_...` directory; after a barrier global rank 0
renames it to its final name, so a directory named `step_*` is always complete: a run killed
mid-save leaves only a `.tmp-*` directory, which the next save removes. Resume needs the same
TP/PP/DP layout (changing layouts goes through the HF export and `model.hf_path`).

What it does not do: reshard on load, or save the data itself (the sampler state is enough to
regenerate the exact order).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_ace.train.optim import LRSchedule, TrainOptimizer
from megatron_ace.utils.logging import get_logger

logger = get_logger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
META_FILE = "meta.json"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ResumeInfo:
    """What a loaded checkpoint tells the training loop."""

    path: Path
    step: int
    """Optimizer steps completed."""
    data_state: dict[str, Any]
    """The sampler's `state_dict()` at that step."""
    extra: dict[str, Any]
    """Whatever the trainer stored (e.g. tokens seen)."""


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / META_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside a megatron-core DDP wrapper (or the module itself)."""
    return getattr(chunk, "module", chunk)


def _shard_names(ps: Any) -> tuple[str, str]:
    model = f"model_tp{ps.tp_rank:02d}_pp{ps.pp_rank:02d}.pt"
    optim = f"optim_tp{ps.tp_rank:02d}_pp{ps.pp_rank:02d}_dp{ps.dp_rank:03d}.pt"
    return model, optim


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        from megatron.core import tensor_parallel

        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".part")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_training_state(root: str | Path, *, step: int, model_chunks: list[torch.nn.Module],
                        opt: TrainOptimizer, sched: LRSchedule, data_state: dict[str, Any],
                        ps: Any, keep_last: int, shards_optimizer_over_dp: bool = False,
                        extra: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint of `step` on every rank (collective); returns its directory."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if ps.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    model_name, optim_name = _shard_names(ps)
    if ps.dp_rank == 0:
        _atomic_torch_save([_unwrap(c).state_dict() for c in model_chunks], tmp / model_name)
    if ps.dp_rank == 0 or shards_optimizer_over_dp:
        _atomic_torch_save({"optimizer": opt.state_dict(), "schedule": sched.state_dict()},
                           tmp / optim_name)
    _atomic_torch_save(rng_state(), tmp / f"rng_rank{ps.rank:05d}.pt")
    _barrier()
    if ps.rank == 0:
        meta = {
            "format_version": FORMAT_VERSION, "step": step, "data_state": data_state,
            "layout": {"tp": ps.tp_size, "pp": ps.pp_size, "dp": ps.dp_size},
            "shards_optimizer_over_dp": shards_optimizer_over_dp, "extra": extra or {},
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if final.exists():  # a re-run of the same step after a resume: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    _barrier()
    return final


def load_training_state(path: str | Path, *, model_chunks: list[torch.nn.Module],
                        opt: TrainOptimizer, sched: LRSchedule, ps: Any) -> ResumeInfo:
    """Restore model, optimizer, schedule and RNG of this rank from checkpoint `path`."""
    path = Path(path)
    meta = json.loads((path / META_FILE).read_text())
    layout = {"tp": ps.tp_size, "pp": ps.pp_size, "dp": ps.dp_size}
    if meta["layout"] != layout:
        raise ValueError(f"{path}: saved with layout {meta['layout']}, this run is {layout}; "
                         "resume with the same parallel.tp / parallel.pp and world size")
    model_name, optim_name = _shard_names(ps)
    states = torch.load(path / model_name, map_location="cpu", weights_only=False)
    for chunk, state in zip(model_chunks, states):
        _unwrap(chunk).load_state_dict(state, strict=True)
    if not meta["shards_optimizer_over_dp"]:
        optim_name = optim_name.rsplit("_dp", 1)[0] + "_dp000.pt"
    optim_state = torch.load(path / optim_name, map_location="cpu", weights_only=False)
    opt.load_state_dict(optim_state["optimizer"])
    sched.load_state_dict(optim_state["schedule"])
    rng_file = path / f"rng_rank{ps.rank:05d}.pt"
    set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    logger.info("resumed from %s (step %d)", path, meta["step"])
    return ResumeInfo(path=path, step=int(meta["step"]), data_state=meta["data_state"],
                      extra=meta.get("extra", {}))
