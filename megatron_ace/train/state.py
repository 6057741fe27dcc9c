"""Save and resume the full training state as megatron-core distributed checkpoints.

A checkpoint is one directory `<root>/step_00000050/` holding:
- megatron-core's `torch_dist` files (`__<rank>_<n>.distcp`, `.metadata`, `metadata.json`) of
  one sharded state dict: "model" (the model's `sharded_state_dict()`: global tensor names with
  the layers stacked, so any TP/PP can read it), "optimizer" (AdamW's moments sharded like their
  parameters; megatron-core's optimizers, the DistributedOptimizer included, in their fully
  reshardable form) and "rng_state" (each rank's RNG states, keyed by its TP/PP/DP coordinates);
- `meta.json`: step, data-sampler state, layout, model config, optimizer backend, lr schedule
  and free-form `extra`, written last.
Every rank writes its own shards in parallel (megatron-core's fully parallel strategy spreads
the replicated tensors over the DP ranks) into a hidden `.tmp-step_...` directory; then global
rank 0 writes meta.json, fsyncs and renames it, so a directory named `step_*` is always
complete: a run killed mid-save leaves only a `.tmp-*` directory (the next save removes it) and
the previous checkpoints untouched.

Resume at another TP/PP/DP layout: weights and optimizer state reshard on load; the step, lr
schedule and data position are layout-free (the SFT sampler's position is a global count, see
`data_state_for_dp`). Per-rank RNG states cannot carry over when the ranks change: then every
rank is reseeded with `seed_everything(seed + step)` (python, numpy, torch, megatron-core's
TP/PP RNG tracker), a deterministic function of the run's seed and the step. No stream the
trainers draw from today depends on them (dropout is off; data order and rollout sampling
have their own seeds), which is why the loss curve continues; at the same layout the states are
restored exactly.

Asynchronous saves (`async_save=True`): the shards are written by a child process while
training goes on; the checkpoint is committed (meta.json + rename) when the next save starts or
when `finish_saves()` is called (both collective), so it becomes visible at that point.

The previous format (`format_version` 1: per-rank `model_tp*_pp*.pt` / `optim_*.pt` files) is
still read, at its own layout only, for one release; the next save writes torch_dist.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_ace.checkpoint import atomic, dist_io
from megatron_ace.checkpoint.dist_io import UnreadableCheckpoint
from megatron_ace.train.optim import LRSchedule, TrainOptimizer
from megatron_ace.utils.console import UsageError
from megatron_ace.utils.logging import get_logger

logger = get_logger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
META_FILE = "meta.json"
FORMAT_VERSION = 2
FORMAT = "torch_dist"
# Config fields that fix every tensor shape of the model (a checkpoint of another shape is refused).
_SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")
__all__ = ["ResumeInfo", "UnreadableCheckpoint", "save_training_state", "load_training_state",
           "finish_saves", "list_checkpoints", "latest_checkpoint", "read_meta", "data_state_for_dp"]


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
    layout_changed: bool = False
    """Saved at another TP/PP/DP layout (RNG states were reseeded)."""


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


def refuse_to_overwrite(root: str | Path, resume: Any) -> None:
    """`checkpoint.resume=never` where `root` already holds checkpoints: a UsageError, raised
    before any set-up, so that a fresh run never overwrites or prunes an earlier one's."""
    if getattr(resume, "value", resume) == "never" and list_checkpoints(root):
        raise UsageError(f"{root} holds checkpoints but checkpoint.resume=never; choose a new "
                         f"--out, or resume (checkpoint.resume=auto)")


def read_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint's meta.json; `UnreadableCheckpoint` when absent or damaged."""
    file = Path(path) / META_FILE
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise UnreadableCheckpoint(f"{path}: {META_FILE} is missing (an incomplete checkpoint)"
                                   ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UnreadableCheckpoint(f"{file}: unreadable ({exc})") from None


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside a megatron-core DDP wrapper (or the module itself)."""
    return getattr(chunk, "module", chunk)


def _layout(ps: Any) -> dict[str, int]:
    return {"tp": ps.tp_size, "pp": ps.pp_size, "dp": ps.dp_size}


def _optimizer_kind(opt: TrainOptimizer) -> str:
    """The optimizer's class, and whether megatron-core's distributes its state over DP."""
    distributed = type(opt).__name__ == "McoreOptimizer" and opt.cfg.distributed
    return type(opt).__name__ + ("/distributed" if distributed else "")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ---- RNG states ----------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This rank's RNG states as plain Python and tensors (nothing that needs unpickling code)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state(),
                             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                       has_gauss, gauss]}
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(state["python"]) if isinstance(state["python"], list) else state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        from megatron.core import tensor_parallel

        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_object(ps: Any, state: Any):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", state, (ps.pp_size, ps.tp_size, ps.dp_size),
                         (ps.pp_rank, ps.tp_rank, ps.dp_rank), replica_id=0)


# ---- save ----------------------------------------------------------------------------------
_async_saves: dist_io.AsyncSaves | None = None


def finish_saves() -> None:
    """Wait for an asynchronous save in flight and commit it (collective; no-op without one)."""
    if _async_saves is not None:
        _async_saves.wait()


def _sharded_state(model_chunks: list[torch.nn.Module], opt: TrainOptimizer, ps: Any, *,
                   is_loading: bool, with_optimizer: bool, rng: Any) -> dict[str, Any]:
    if len(model_chunks) != 1:
        raise NotImplementedError("checkpoints hold one model chunk per rank (no virtual pipeline)")
    model = _unwrap(model_chunks[0])
    sharded: dict[str, Any] = {"model": model.sharded_state_dict()}
    if with_optimizer:
        sharded["optimizer"] = opt.sharded_state_dict(sharded["model"], is_loading=is_loading)
    if rng is not None:
        sharded["rng_state"] = _rng_object(ps, rng)
    return sharded


def _rank_independent(common: dict[str, Any]) -> dict[str, Any]:
    """The non-sharded state minus what differs between ranks by design: the
    DistributedOptimizer's memory-efficient gather leaves its parameter state on DP rank 0."""
    megatron = common.get("optimizer", {}).get("megatron")
    if not isinstance(megatron, dict) or "param_state" not in megatron:
        return common
    rest = {k: v for k, v in megatron.items() if k != "param_state"}
    return {**common, "optimizer": {**common["optimizer"], "megatron": rest}}


def _clear_leftovers(root: Path) -> None:
    """Remove what an interrupted save or commit left behind (rank 0, nothing in flight)."""
    for stale in [*root.glob(".tmp-step_*"), *root.glob("step_*.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def _commit(tmp: Path, final: Path, meta: dict[str, Any], keep_last: int, ps: Any) -> None:
    """meta.json last, then the atomic rename and pruning (rank 0); a barrier on every rank."""
    if ps.rank == 0:
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        atomic.commit(tmp, final)
        for _, old in list_checkpoints(final.parent)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    _barrier()


def save_training_state(root: str | Path, *, step: int, model_chunks: list[torch.nn.Module],
                        opt: TrainOptimizer, sched: LRSchedule, data_state: dict[str, Any],
                        ps: Any, keep_last: int, extra: dict[str, Any] | None = None,
                        async_save: bool = False) -> Path:
    """Write the checkpoint of `step` on every rank (collective); returns its directory.

    With `async_save` the shards are written in the background and the checkpoint is committed
    by the next save or `finish_saves()`."""
    global _async_saves
    finish_saves()
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if ps.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _clear_leftovers(root)
        tmp.mkdir()
    _barrier()
    with_optimizer = opt.has_state()
    sharded = _sharded_state(model_chunks, opt, ps, is_loading=False,
                             with_optimizer=with_optimizer, rng=rng_state())
    model_cfg = getattr(_unwrap(model_chunks[0]), "ace_config", None)
    meta = {
        "format_version": FORMAT_VERSION, "format": FORMAT, "step": step,
        "data_state": data_state, "layout": _layout(ps),
        "model": model_cfg.to_hf_config() if model_cfg is not None else None,
        "optimizer": {"backend": _optimizer_kind(opt), "saved": with_optimizer},
        "schedule": sched.state_dict(), "extra": extra or {},
    }
    request = dist_io.save(sharded, tmp, dp_group=ps.dp_group, async_save=async_save,
                           common_view=_rank_independent)
    if request is None:
        _commit(tmp, final, meta, keep_last, ps)
        return final
    if _async_saves is None:
        _async_saves = dist_io.AsyncSaves()
    _async_saves.schedule(request, lambda: _commit(tmp, final, meta, keep_last, ps))
    logger.info("checkpoint %s is being written in the background", final.name)
    return final


# ---- load ----------------------------------------------------------------------------------
def _check_model_shape(path: Path, meta: dict[str, Any], model: torch.nn.Module) -> None:
    saved, cfg = meta.get("model"), getattr(model, "ace_config", None)
    if not saved or cfg is None:
        return
    mine = cfg.to_hf_config()
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this model {mine.get(k)!r}"
             for k in _SHAPE_FIELDS if saved.get(k) != mine.get(k)]
    if diffs:
        raise ValueError(f"{path}: the checkpoint is of another model shape ("
                         + "; ".join(diffs) + "); point the run at its own checkpoints or "
                         "use a new --out")


def data_state_for_dp(state: dict[str, Any], dp_size: int) -> dict[str, Any]:
    """A `ResumableSampler` state for `dp_size` ranks. Its position counts the items of the
    global stream every rank together consumed, so it holds at any DP size."""
    if "world_size" not in state or state["world_size"] == dp_size:
        return state
    return {**state, "world_size": dp_size}


def load_training_state(path: str | Path, *, model_chunks: list[torch.nn.Module],
                        opt: TrainOptimizer, sched: LRSchedule, ps: Any, seed: int = 0
                        ) -> ResumeInfo:
    """Restore model, optimizer, schedule and RNG of this rank from checkpoint `path` (collective).

    `seed` reseeds the RNGs (with the step) when the layout differs from the saved one.
    Raises `UnreadableCheckpoint` for missing or damaged files and `ValueError` for a
    checkpoint of another model shape or optimizer backend."""
    path = Path(path)
    meta = read_meta(path)
    if meta.get("format_version") == 1:
        return _load_v1(path, meta, model_chunks=model_chunks, opt=opt, sched=sched, ps=ps)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path / META_FILE}: format_version {meta.get('format_version')!r} is "
                         f"not one this version reads ({FORMAT_VERSION})")
    dist_io.verify_files(path)  # before anything is allocated or read
    _check_model_shape(path, meta, _unwrap(model_chunks[0]))
    saved_backend = meta["optimizer"]["backend"]
    if meta["optimizer"]["saved"] and saved_backend != _optimizer_kind(opt):
        raise ValueError(f"{path}: optimizer state was saved by {saved_backend}, this run uses "
                         f"{_optimizer_kind(opt)} (set optim.backend / optim.distributed as when "
                         "it was saved)")
    same_layout = meta["layout"] == _layout(ps)
    sharded = _sharded_state(model_chunks, opt, ps, is_loading=True,
                             with_optimizer=meta["optimizer"]["saved"],
                             rng=rng_state() if same_layout else None)
    loaded = dist_io.load(sharded, path, dp_group=ps.dp_group)
    _unwrap(model_chunks[0]).load_state_dict(loaded["model"], strict=False)
    if meta["optimizer"]["saved"]:
        opt.load_sharded_state_dict(loaded["optimizer"])
    sched.load_state_dict(meta["schedule"])
    if same_layout:
        set_rng_state(loaded["rng_state"])
    else:
        from megatron_ace.model.parallel import seed_everything

        seed_everything(seed + int(meta["step"]))
        logger.info("resuming at layout %s from a checkpoint saved at %s: weights and optimizer "
                    "state resharded, RNGs reseeded with seed %d + step", _layout(ps),
                    meta["layout"], seed)
    logger.info("resumed from %s (step %d)", path, meta["step"])
    return ResumeInfo(path=path, step=int(meta["step"]), data_state=meta["data_state"],
                      extra=meta.get("extra", {}), layout_changed=not same_layout)


def _load_v1(path: Path, meta: dict[str, Any], *, model_chunks: list[torch.nn.Module],
             opt: TrainOptimizer, sched: LRSchedule, ps: Any) -> ResumeInfo:
    """The previous per-rank format, same layout only (read for one release)."""
    logger.warning("%s is in the previous checkpoint format (per-rank .pt files); it is read at "
                   "its own layout only, and support ends with the next release: the next save "
                   "writes torch_dist", path)
    layout = _layout(ps)
    if meta["layout"] != layout:
        raise ValueError(f"{path}: saved in the previous format with layout {meta['layout']}, "
                         f"this run is {layout}; resume it at its own layout once (the next "
                         "checkpoint is torch_dist and loads at any layout)")
    model_file = path / f"model_tp{ps.tp_rank:02d}_pp{ps.pp_rank:02d}.pt"
    optim_file = path / (f"optim_tp{ps.tp_rank:02d}_pp{ps.pp_rank:02d}_dp"
                         f"{ps.dp_rank if meta['shards_optimizer_over_dp'] else 0:03d}.pt")
    rng_file = path / f"rng_rank{ps.rank:05d}.pt"
    for file in (model_file, optim_file, rng_file):
        if not file.is_file():
            raise UnreadableCheckpoint(f"{path}: {file.name} is missing")
    try:
        states = torch.load(model_file, map_location="cpu", weights_only=False)
        optim_state = torch.load(optim_file, map_location="cpu", weights_only=False)
        rng = torch.load(rng_file, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise UnreadableCheckpoint(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    for chunk, state in zip(model_chunks, states):
        _unwrap(chunk).load_state_dict(state, strict=True)
    opt.load_state_dict(optim_state["optimizer"])
    sched.load_state_dict(optim_state["schedule"])
    set_rng_state(rng)
    return ResumeInfo(path=path, step=int(meta["step"]), data_state=meta["data_state"],
                      extra=meta.get("extra", {}))
