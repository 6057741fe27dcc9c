"""Process groups: the only module that touches megatron-core's `parallel_state`.

`init_parallel` starts torch.distributed (NCCL on GPU, gloo on CPU; a single process works too,
without torchrun), builds the TP/PP/DP groups and returns them in a `ParallelState` that the
rest of the library receives as an argument. Sequence and context parallelism need Transformer
Engine and are refused without it.
"""

from __future__ import annotations

import dataclasses
import os
import random
import socket
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megatron_ace.model.cpu_patches import apply_cpu_patches
from megatron_ace.model.spec import te_usable
from megatron_ace.utils.logging import get_logger

log = get_logger(__name__)


@dataclasses.dataclass(kw_only=True)
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    sequence_parallel: bool = False
    """Shard activations along the sequence inside TP regions (needs Transformer Engine)."""
    cp: int = 1
    """Context-parallel size (needs Transformer Engine)."""
    backend: str | None = None
    """torch.distributed backend; default nccl with CUDA, gloo without."""
    timeout_minutes: int = 30
    """Collective timeout."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.backend not in (None, "gloo", "nccl"):
            raise ValueError(f"parallel.backend must be gloo or nccl, got {self.backend!r}")


@dataclasses.dataclass(frozen=True)
class ParallelState:
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    rank: int
    world_size: int
    tp_group: object
    pp_group: object
    dp_group: object
    mp_group: object
    """Model-parallel group (TP x PP): the ranks that hold one replica."""
    embedding_group: object
    """First and last pipeline stages (tied embeddings are all-reduced over it)."""
    pg_collection: object
    """megatron-core ProcessGroupCollection handed to the model."""
    sequence_parallel: bool = False
    cp_size: int = 1

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def pp_global_rank(self, stage: int) -> int:
        """Global rank of pipeline stage `stage` in this rank's pipeline."""
        return dist.get_process_group_ranks(self.pp_group)[stage]

    def tp_global_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.tp_group)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_process_group(cfg: ParallelConfig) -> None:
    if dist.is_initialized():
        return
    backend = cfg.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    timeout = timedelta(minutes=cfg.timeout_minutes)
    if "RANK" not in os.environ:
        # Plain `python`, one process. The address goes to init_process_group directly rather
        # than into os.environ, so child processes (torchrun, vLLM) never inherit a stale port.
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                rank=0, world_size=1, timeout=timeout)
        return
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timeout)


def seed_everything(seed: int) -> None:
    """Python, numpy and torch RNGs, and megatron-core's model-parallel RNG tracker.

    On CPU the tracker is the inference variant: its `fork()` does not touch the CUDA RNG
    (upstream random.py:303 calls torch.cuda.get_rng_state). Dropout is off in every recipe, so
    the tracker never draws; weights are initialised on the CPU RNG (use_cpu_initialization).
    """
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(
        seed, inference_rng_tracker=not torch.cuda.is_available(), force_reset_rng=True
    )


def init_parallel(cfg: ParallelConfig, *, seed: int = 1234) -> ParallelState:
    """Start torch.distributed and build the groups. World size must equal tp*pp*cp*dp."""
    from megatron.core import parallel_state as mpu
    from megatron.core.process_groups_config import ProcessGroupCollection

    if (cfg.sequence_parallel or cfg.cp > 1) and not te_usable():
        raise ValueError("parallel.sequence_parallel / parallel.cp need Transformer Engine on GPU")
    apply_cpu_patches()
    _init_process_group(cfg)
    world = dist.get_world_size()
    if world % (cfg.tp * cfg.pp * cfg.cp):
        raise ValueError(
            f"world size {world} is not divisible by tp*pp*cp = {cfg.tp}*{cfg.pp}*{cfg.cp}"
        )
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
        context_parallel_size=cfg.cp,
        distributed_timeout_minutes=cfg.timeout_minutes,
    )
    seed_everything(seed)
    ps = ParallelState(
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        tp_size=cfg.tp,
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        pp_size=cfg.pp,
        dp_rank=mpu.get_data_parallel_rank(),
        dp_size=mpu.get_data_parallel_world_size(),
        rank=dist.get_rank(),
        world_size=world,
        tp_group=mpu.get_tensor_model_parallel_group(),
        pp_group=mpu.get_pipeline_model_parallel_group(),
        dp_group=mpu.get_data_parallel_group(),
        mp_group=mpu.get_model_parallel_group(),
        embedding_group=mpu.get_embedding_group(check_initialized=False),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        sequence_parallel=cfg.sequence_parallel,
        cp_size=cfg.cp,
    )
    log.info("parallel: world=%d tp=%d pp=%d dp=%d cp=%d backend=%s", world, cfg.tp, cfg.pp,
             ps.dp_size, cfg.cp, dist.get_backend())
    return ps


def destroy_parallel() -> None:
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
