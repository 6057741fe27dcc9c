"""megatron-core distributed checkpoints (torch_dist) of live models: save, load, verify.

One place for the choices every caller shares:
- the `torch_dist` backend with megatron-core's fully parallel save and load strategies over
  the data-parallel group (replicated tensors are written and read once, spread over the DP
  ranks, then exchanged);
- the writers' result queue: megatron-core's default (filesystem_async.py:53-66) starts a
  `multiprocessing.Manager` server process with spawn, a second interpreter per training rank
  that a SIGKILLed trainer leaves behind holding its pipes. Saves here run their writers in
  this process (synchronous) or in one forked child (asynchronous), so a thread queue or a
  fork-context queue carries the results instead;
- `verify_files`: every file the checkpoint's `.metadata` names exists and is long enough,
  checked before any collective, so a damaged checkpoint fails on every rank alike with the
  file named instead of deep inside a collective read;
- `load_model`: a model (any TP/PP) from a checkpoint written at any layout; the names are
  megatron-core's (`decoder.layers.self_attention.linear_qkv.weight`, layers stacked), the same
  whether the local or the Transformer Engine layer spec wrote them.

Asynchronous saves (`save(..., async_save=True)`) return megatron-core's `AsyncRequest`; the
caller schedules it (`AsyncSaves`) and finalizes it collectively. On CPU the writer child is a
fork of the trainer, whose copy-on-write memory is the snapshot being written; on GPU
megatron-core first copies the tensors to host memory.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_ace.model.cpu_patches import apply_checkpoint_cpu_patches

METADATA_FILE = ".metadata"
"""torch.distributed.checkpoint's index of every tensor chunk and the file holding it."""
MCORE_CONFIG_FILE = "metadata.json"
"""megatron-core's marker of a distributed checkpoint (backend and version)."""


class UnreadableCheckpoint(ValueError):
    """A checkpoint directory that is incomplete or damaged (the message names what)."""


def _strategies(group: Any, *, save: bool):
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper,
        FullyParallelSaveStrategyWrapper,
    )
    from megatron.core.dist_checkpointing.strategies.torch import (
        TorchDistLoadShardedStrategy,
        TorchDistSaveShardedStrategy,
    )

    if save:
        return FullyParallelSaveStrategyWrapper(TorchDistSaveShardedStrategy(), group)
    return FullyParallelLoadStrategyWrapper(TorchDistLoadShardedStrategy(), group)


def _use_results_queue(async_save: bool) -> None:
    """Hand megatron-core's writers a queue that needs no server process (see module doc)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._results_queue = (multiprocessing.get_context("fork").Queue() if async_save
                                       else queue.Queue())


def save(sharded: dict[str, Any], directory: str | Path, *, dp_group: Any,
         async_save: bool = False, common_view: Callable[[dict], dict] | None = None):
    """Write `sharded` (a sharded state dict) into the existing, empty `directory` (collective).

    `common_view` maps the non-sharded part to what must agree across ranks (megatron-core
    compares it and warns; rank 0's is the one saved). Returns None, or with `async_save` the
    `AsyncRequest` whose finalization completes the checkpoint (megatron-core writes
    `.metadata` and `metadata.json` there)."""
    from megatron.core import dist_checkpointing

    from megatron.core.dist_checkpointing.strategies import torch as torch_strategy

    apply_checkpoint_cpu_patches()
    _use_results_queue(async_save)
    # Every save goes through megatron-core's own "mcore" writer (NVRx, its successor, is not a
    # dependency), which warns on first use that it is deprecated: known, so not repeated.
    if not getattr(torch_strategy, "_logged_mcore_async_deprecation", True):
        torch_strategy._logged_mcore_async_deprecation = True
    return dist_checkpointing.save(sharded, str(directory), _strategies(dp_group, save=True),
                                   async_sharded_save=async_save, async_strategy="mcore",
                                   preprocess_common_before_consistancy_check=common_view)


def load(sharded: dict[str, Any], directory: str | Path, *, dp_group: Any,
         allow_missing: Callable[[str], bool] = lambda key: "_extra_state" in key) -> dict:
    """Fill `sharded` from `directory` (collective); returns the loaded state dict.

    Keys this process asks for that the checkpoint lacks raise `ValueError` naming them, except
    those `allow_missing` accepts (layer-spec extras such as Transformer Engine's FP8 state)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.validation import StrictHandling

    apply_checkpoint_cpu_patches()
    verify_files(directory)
    try:
        loaded, _, absent = dist_checkpointing.load(
            sharded, str(directory), _strategies(dp_group, save=False),
            strict=StrictHandling.RETURN_UNEXPECTED)
    except CheckpointingException as exc:
        raise ValueError(f"{directory}: {exc}") from None
    absent = sorted(k for k in absent if not allow_missing(k))
    if absent:
        raise ValueError(f"{directory}: the checkpoint has no {', '.join(absent[:8])}"
                         f"{f' (and {len(absent) - 8} more)' if len(absent) > 8 else ''}: it was "
                         "written for another model or optimizer")
    return loaded


def read_index(directory: str | Path):
    """torch.distributed.checkpoint's `Metadata` of a checkpoint (tensor shapes and chunks)."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise UnreadableCheckpoint(f"{directory}: {METADATA_FILE} is missing (not a complete "
                                   "torch_dist checkpoint)")
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError) as exc:
        raise UnreadableCheckpoint(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None


def verify_files(directory: str | Path) -> None:
    """Raise `UnreadableCheckpoint` naming every shard file that is missing or too short."""
    directory = Path(directory)
    if not (directory / MCORE_CONFIG_FILE).is_file():
        raise UnreadableCheckpoint(f"{directory}: {MCORE_CONFIG_FILE} is missing (not a "
                                   "complete torch_dist checkpoint)")
    need: dict[str, int] = {}
    for info in read_index(directory).storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for name, size in sorted(need.items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif os.path.getsize(path) < size:
            problems.append(f"{name} is truncated ({os.path.getsize(path)} of {size} bytes)")
    if problems:
        raise UnreadableCheckpoint(f"{directory}: " + "; ".join(problems))


def is_torch_dist(directory: str | Path) -> bool:
    return (Path(directory) / MCORE_CONFIG_FILE).is_file()


def load_model(model: torch.nn.Module, directory: str | Path, *, dp_group: Any,
               prefix: str = "") -> None:
    """Load a model's weights (any TP/PP) from a torch_dist checkpoint written at any layout.

    `prefix` selects where the model sits in the checkpoint: "model." for training checkpoints
    (which also hold the optimizer), "" for model-only checkpoints of the converter."""
    sharded = model.sharded_state_dict()
    request = {prefix.rstrip("."): sharded} if prefix else sharded
    loaded = load(request, directory, dp_group=dp_group)
    model.load_state_dict(loaded[prefix.rstrip(".")] if prefix else loaded, strict=False)


class AsyncSaves:
    """At most one asynchronous save in flight, scheduled and finalized through megatron-core.

    Finalizing is collective: every rank calls `wait` (or `schedule`, which waits for the
    previous save first) at the same point of the run."""

    def __init__(self) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._queue = AsyncCallsQueue(persistent=False)
        self._pending = False

    def schedule(self, request: Any, on_done: Callable[[], None]) -> None:
        self.wait()
        request.finalize_fns.append(on_done)
        self._queue.schedule_async_request(request)
        self._pending = True

    def wait(self) -> None:
        if self._pending:
            self._queue.maybe_finalize_async_calls(blocking=True)
            self._pending = False

    @property
    def pending(self) -> bool:
        return self._pending
