"""Optimizer, learning-rate schedule and gradient clipping for the Megatron-Core trainers.

What it does:
- `build_optimizer(model_chunks, cfg, ps)` returns a `TrainOptimizer`: one interface
  (`zero_grad`, `finalize_grads`, `step -> StepOutcome`, and `sharded_state_dict` /
  `load_sharded_state_dict` for megatron-core's distributed checkpoints) over two
  backends, picked by `OptimBackend` through a registry:
  * `MCORE`: megatron-core's DDP wrapper + `get_megatron_optimizer` (AdamW; the
    DistributedOptimizer when `optim.distributed=True`; bf16 with fp32 master weights). The
    default with CUDA. Grads live in DDP's contiguous buffers and `finalize_model_grads` does
    the DP all-reduce / reduce-scatter. It also runs on the CPU in float32 through
    `_cpu_patches_for_optimizer()`: DDP + FP32Optimizer (tested equal to TORCH), or the
    DistributedOptimizer with `optim.distributed=true` (its checkpoints tested across DP sizes).
  * `TORCH`: `torch.optim.AdamW` on the bare model with an explicit, coalesced DP gradient
    all-reduce (SUM: the loss is already divided by the global token count), the tied-embedding
    all-reduce across pipeline stages, and a TP/PP-aware global gradient-norm clip. The default
    on the CPU: it needs no monkeypatch of megatron-core's training-state code at all, float32.
- `LRSchedule`: linear warmup then `LRDecay` (constant / cosine / linear) down to `min_lr`,
  applied to every param group each step together with the group's weight decay. Biases, norm
  weights and other 1-D params get no weight decay in both backends.

What it does not do: loss scaling for fp16 (bf16 and fp32 only), ZeRO-3 / FSDP, or muP.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist

from megatron_ace.train.config import LRDecay, OptimBackend, OptimConfig
from megatron_ace.utils.logging import get_logger

logger = get_logger(__name__)


# ----------------------------------------------------------------------------------------------
# learning-rate schedule
# ----------------------------------------------------------------------------------------------
def _constant(progress: float) -> float:
    return 1.0


def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _linear(progress: float) -> float:
    return 1.0 - progress


_DECAY: dict[LRDecay, Callable[[float], float]] = {
    LRDecay.CONSTANT: _constant,
    LRDecay.COSINE: _cosine,
    LRDecay.LINEAR: _linear,
}
"""Decay shape: progress in [0, 1] after warmup -> fraction of (lr - min_lr) kept."""


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int,
          decay: LRDecay) -> float:
    """Learning rate used for optimizer step `step` (0-based).

    Warmup is linear from lr/warmup_steps at step 0 to lr at step warmup_steps-1 (never 0, so
    the first step moves the weights); then `decay` from lr to min_lr over the remaining steps.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if decay is LRDecay.CONSTANT:
        return lr
    num_decay = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / num_decay)
    return min_lr + (lr - min_lr) * _DECAY[decay](progress)


@dataclasses.dataclass
class LRSchedule:
    """Sets lr and weight decay of every param group for the next optimizer step.

    Weight decay is set here each step (group `wd_mult` times `weight_decay`) because
    megatron-core's `get_megatron_optimizer` builds every group with full weight decay and
    relies on its scheduler's `step()` to apply `wd_mult` (0 for biases and norms).
    """

    cfg: OptimConfig
    total_steps: int
    num_steps: int = 0
    """Optimizer steps taken so far (the next step uses lr_at(num_steps))."""

    @property
    def warmup_steps(self) -> int:
        if self.cfg.warmup_steps is not None:
            return self.cfg.warmup_steps
        return int(round(self.cfg.warmup_fraction * self.total_steps))

    def current_lr(self) -> float:
        return lr_at(self.num_steps, lr=self.cfg.lr, min_lr=self.cfg.min_lr,
                     warmup_steps=self.warmup_steps, total_steps=self.total_steps,
                     decay=self.cfg.decay)

    def apply(self, param_groups: Sequence[dict[str, Any]]) -> float:
        """Write this step's lr and weight decay into `param_groups`; return the lr."""
        lr = self.current_lr()
        for group in param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.cfg.weight_decay * group.get("wd_mult", 1.0)
        return lr

    def advance(self) -> None:
        self.num_steps += 1

    def state_dict(self) -> dict[str, int]:
        return {"num_steps": self.num_steps, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.num_steps = int(state["num_steps"])
        if int(state["total_steps"]) != self.total_steps:
            logger.warning("lr schedule: checkpoint planned %d steps, this run plans %d; "
                           "the schedule follows this run", state["total_steps"], self.total_steps)


# ----------------------------------------------------------------------------------------------
# the optimizer interface
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StepOutcome:
    """What one optimizer step did."""

    grad_norm: float
    """Global L2 norm of the gradient before clipping (all TP/PP/DP ranks together)."""
    skipped: bool
    """True when the step was skipped (non-finite gradient)."""


class TrainOptimizer(Protocol):
    """The optimizer as the training step sees it, whatever the backend."""

    model_chunks: list[torch.nn.Module]
    """The modules to run forward/backward on (DDP-wrapped for MCORE)."""
    param_groups: list[dict[str, Any]]

    def zero_grad(self) -> None: ...
    def finalize_grads(self) -> None: ...
    def step(self) -> StepOutcome: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def has_state(self) -> bool: ...
    def sharded_state_dict(self, model_sharded: dict[str, Any], *, is_loading: bool
                           ) -> dict[str, Any]: ...
    def load_sharded_state_dict(self, state: dict[str, Any]) -> None: ...


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Biases, norm weights and every other 1-D tensor get no weight decay."""
    return param.dim() < 2 or name.endswith(".bias")


# ----------------------------------------------------------------------------------------------
# TORCH backend: torch AdamW + explicit gradient reductions
# ----------------------------------------------------------------------------------------------
def _is_tp_duplicate(param: torch.nn.Parameter, tp_rank: int) -> bool:
    """A replicated (not TP-split) param counts once in the norm: on TP rank 0 only."""
    return tp_rank > 0 and not getattr(param, "tensor_model_parallel", False)


def _coalesced_all_reduce(grads: list[torch.Tensor], group: Any) -> None:
    """SUM-all-reduce `grads` in place as one flat buffer per dtype (one collective each)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = torch._utils._flatten_dense_tensors(same)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for g, reduced in zip(same, torch._utils._unflatten_dense_tensors(flat, same)):
            g.copy_(reduced)


class TorchAdamW:
    """torch AdamW on the bare model; DP and tied-embedding reductions done here."""

    def __init__(self, model_chunks: list[torch.nn.Module], cfg: OptimConfig, ps: Any) -> None:
        self.model_chunks = model_chunks
        self.cfg = cfg
        self.ps = ps
        decay, no_decay = [], []
        self._named: list[tuple[str, torch.nn.Parameter]] = []
        for chunk in model_chunks:
            for name, p in chunk.named_parameters():
                if not p.requires_grad:
                    continue
                self._named.append((name, p))
                (no_decay if _no_decay(name, p) else decay).append(p)
        groups = [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]
        groups = [g for g in groups if g["params"]]
        self.optimizer = torch.optim.AdamW(
            groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay, foreach=False,
        )

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        # Looked up every time: `load_state_dict` replaces the optimizer's list of groups, and
        # a reference kept from before would leave the schedule writing lr into stale groups.
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        for _, p in self._named:
            p.grad = None

    def _grads(self) -> list[torch.Tensor]:
        grads = []
        for _, p in self._named:
            if p.grad is None:  # a param unused on this stage still takes part in reductions
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        return grads

    def finalize_grads(self) -> None:
        """DP all-reduce (SUM) and, with tied embeddings over PP, the embedding all-reduce."""
        grads = self._grads()
        if self.ps.dp_size > 1:
            _coalesced_all_reduce(grads, self.ps.dp_group)
        # megatron-core marks both copies of a tied embedding `shared_embedding` when PP > 1.
        tied = [p.grad for _, p in self._named if getattr(p, "shared_embedding", False)]
        embedding_group = getattr(self.ps, "embedding_group", None)
        if tied and self.ps.pp_size > 1:
            if embedding_group is None:
                raise NotImplementedError(
                    "tie_word_embeddings with pp > 1 on optim.backend=torch needs "
                    "ParallelState.embedding_group; use optim.backend=mcore (its "
                    "finalize_model_grads reduces the tied embedding)")
            _coalesced_all_reduce(tied, embedding_group)

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm: TP-split params summed over TP, stages summed over PP."""
        total_sq = torch.zeros((), dtype=torch.float32)
        for name, p in self._named:
            if _is_tp_duplicate(p, self.ps.tp_rank):
                continue
            if getattr(p, "shared", False):
                continue  # the last stage's copy of a tied embedding: counted on the first stage
            total_sq += p.grad.detach().float().pow(2).sum()
        for group, size in ((self.ps.tp_group, self.ps.tp_size), (self.ps.pp_group, self.ps.pp_size)):
            if size > 1:
                dist.all_reduce(total_sq, op=dist.ReduceOp.SUM, group=group)
        return total_sq.sqrt()

    def step(self) -> StepOutcome:
        norm = self.grad_norm()
        norm_value = float(norm)
        if not math.isfinite(norm_value):
            self.zero_grad()
            return StepOutcome(grad_norm=norm_value, skipped=True)
        if self.cfg.clip_grad > 0 and norm_value > self.cfg.clip_grad:
            scale = self.cfg.clip_grad / (norm_value + 1e-6)
            for _, p in self._named:
                p.grad.mul_(scale)
        self.optimizer.step()
        return StepOutcome(grad_norm=norm_value, skipped=False)

    def state_dict(self) -> dict[str, Any]:
        return {"backend": OptimBackend.TORCH.value, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("backend") != OptimBackend.TORCH.value:
            raise ValueError(f"optimizer state was saved by backend {state.get('backend')!r}, "
                             f"this run uses {OptimBackend.TORCH.value!r} (set optim.backend)")
        self.optimizer.load_state_dict(state["optimizer"])

    # ---- distributed checkpoint (megatron.core.dist_checkpointing) ----------------------------
    def has_state(self) -> bool:
        return bool(self.optimizer.state)

    def sharded_state_dict(self, model_sharded: dict[str, Any], *, is_loading: bool
                           ) -> dict[str, Any]:
        """AdamW's moments as ShardedTensors sharded like their parameters
        (`optimizer.state.exp_avg.<param key>`, as megatron-core names them), so they reshard with
        the model; the step count is one number shared by every parameter. `model_sharded` is the
        model's `sharded_state_dict()` (its tensors must be the live parameters)."""
        from megatron.core.dist_checkpointing.optimizer import (
            get_param_id_to_sharded_param_map,
            optim_state_to_sharding_state,
        )

        if is_loading:
            for group in self.optimizer.param_groups:  # tensors the load fills in place
                for p in group["params"]:
                    state = self.optimizer.state[p]
                    state.setdefault("exp_avg", torch.zeros_like(p))
                    state.setdefault("exp_avg_sq", torch.zeros_like(p))
        state = self.optimizer.state_dict()
        steps = {float(s["step"]) for s in state["state"].values() if "step" in s}
        if len(steps) > 1:
            raise AssertionError(f"AdamW step counts differ between parameters: {sorted(steps)}")
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        optim_state_to_sharding_state(state, get_param_id_to_sharded_param_map(model_sharded, params),
                                      exclude_keys=("step",))
        return {"backend": OptimBackend.TORCH.value, "adam": state,
                "num_steps": int(steps.pop()) if steps else 0}

    def load_sharded_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a loaded `sharded_state_dict`; every parameter gets its own step tensor."""
        if state.get("backend") != OptimBackend.TORCH.value:
            raise ValueError(f"optimizer state was saved by backend {state.get('backend')!r}, "
                             f"this run uses {OptimBackend.TORCH.value!r} (set optim.backend)")
        adam = state["adam"]
        for param_state in adam["state"].values():
            param_state["step"] = torch.tensor(float(state["num_steps"]))
        self.optimizer.load_state_dict(adam)


# ----------------------------------------------------------------------------------------------
# MCORE backend: megatron-core DDP + optimizer (GPU)
# ----------------------------------------------------------------------------------------------
class McoreOptimizer:
    """megatron-core DDP-wrapped chunks + `get_megatron_optimizer` (AdamW)."""

    def __init__(self, model_chunks: list[torch.nn.Module], cfg: OptimConfig, ps: Any,
                 *, bf16: bool) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        _cpu_patches_for_optimizer()
        self.cfg = cfg
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.distributed,
        )
        wrapped = []
        for i, chunk in enumerate(model_chunks):
            # The loss is already divided by the global token count: DDP must SUM, not average.
            chunk.config.calculate_per_token_loss = True
            wrapped.append(DistributedDataParallel(
                config=chunk.config, ddp_config=ddp_cfg, module=chunk,
                disable_bucketing=i > 0))
        self.model_chunks = wrapped
        self._finalize = finalize_model_grads
        opt_cfg = OptimizerConfig(
            optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
            clip_grad=cfg.clip_grad, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=cfg.distributed,
        )
        self.optimizer = get_megatron_optimizer(opt_cfg, wrapped)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups  # never cached: loading replaces the groups

    def zero_grad(self) -> None:
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def finalize_grads(self) -> None:
        # num_tokens=None: the loss was already divided by the global token count.
        self._finalize(self.model_chunks, None)

    def step(self) -> StepOutcome:
        ok, grad_norm, _ = self.optimizer.step()
        norm = float(grad_norm) if grad_norm is not None else float("nan")
        return StepOutcome(grad_norm=norm, skipped=not ok)

    def _inner_optimizers(self) -> list[Any]:
        return list(getattr(self.optimizer, "chained_optimizers", [self.optimizer]))

    def state_dict(self) -> dict[str, Any]:
        # Per-rank state (the format of the previous checkpoint layout, read by its loader):
        # the DistributedOptimizer's own DP shard ("dp_reshardable"), same layout only.
        inner = []
        for opt in self._inner_optimizers():
            entry = {"optimizer": opt.state_dict()}
            if hasattr(opt, "get_parameter_state_dp_reshardable"):
                entry["param_state"] = opt.get_parameter_state_dp_reshardable()
            inner.append(entry)
        return {"backend": OptimBackend.MCORE.value, "inner": inner}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("backend") != OptimBackend.MCORE.value:
            raise ValueError(f"optimizer state was saved by backend {state.get('backend')!r}, "
                             f"this run uses {OptimBackend.MCORE.value!r} (set optim.backend)")
        inner = self._inner_optimizers()
        if len(inner) != len(state["inner"]):
            raise ValueError("optimizer checkpoint has a different number of param groups sets")
        for opt, entry in zip(inner, state["inner"]):
            opt.load_state_dict(entry["optimizer"])
            if "param_state" in entry:
                opt.load_parameter_state_from_dp_reshardable(entry["param_state"])
            _untie_adam_steps(opt)

    # ---- distributed checkpoint (megatron.core.dist_checkpointing) ----------------------------
    # The DistributedOptimizer's state is written "fully_reshardable" (gathered per parameter in
    # model space, so it reloads at any TP/PP/DP), with the memory-efficient variant: a gloo
    # gather to DP rank 0 instead of an all-gather of every buffer on every rank.
    _SHARDING = {"distrib_optim_sharding_type": "fully_reshardable",
                 "distrib_optim_fully_reshardable_mem_efficient": True}

    def has_state(self) -> bool:
        return any(getattr(opt, "optimizer", None) is not None and opt.optimizer.state
                   for opt in self._inner_optimizers())

    def sharded_state_dict(self, model_sharded: dict[str, Any], *, is_loading: bool
                           ) -> dict[str, Any]:
        """megatron-core's own optimizer `sharded_state_dict` (fully reshardable)."""
        if is_loading:
            self._allocate_torch_adam_state()
        return {"backend": OptimBackend.MCORE.value, "distributed": self.cfg.distributed,
                "megatron": self.optimizer.sharded_state_dict(model_sharded, is_loading=is_loading,
                                                              metadata=dict(self._SHARDING))}

    def load_sharded_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("backend") != OptimBackend.MCORE.value:
            raise ValueError(f"optimizer state was saved by backend {state.get('backend')!r}, "
                             f"this run uses {OptimBackend.MCORE.value!r} (set optim.backend)")
        self.optimizer.load_state_dict(state["megatron"])
        for opt in self._inner_optimizers():
            _untie_adam_steps(opt)

    def _allocate_torch_adam_state(self) -> None:
        """Give a fresh DistributedOptimizer over torch AdamW (no TE / apex) its state tensors.

        Its `state_dict()` reads one `step` out of every parameter's state
        (distrib_optimizer.py:836-839, asserting they agree), which a never-stepped torch AdamW
        does not have yet; TE's and apex's Adam keep the step in the param groups instead.
        """
        for opt in self._inner_optimizers():
            inner = getattr(opt, "optimizer", None)
            if not hasattr(opt, "gbuf_ranges") or not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
                continue
            for group in inner.param_groups:
                for p in group["params"]:
                    state = inner.state[p]
                    if not state:
                        state.update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p),
                                     step=torch.tensor(0.0))


def _untie_adam_steps(opt: Any) -> None:
    """Give every parameter its own Adam `step` tensor after a load.

    megatron-core's DistributedOptimizer (distrib_optimizer.py:818-825 in 0.16-0.19), when torch
    AdamW runs underneath (no TE / apex), restores one shared `step` tensor for all params; the
    in-place increments then add up and the bias correction drifts after resume.
    """
    torch_opt = getattr(opt, "optimizer", None)
    if torch_opt is None:
        return
    for param_state in torch_opt.state.values():
        step = param_state.get("step")
        if isinstance(step, torch.Tensor):
            param_state["step"] = step.detach().clone()


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------
def _build_torch(chunks: list[torch.nn.Module], cfg: OptimConfig, ps: Any, bf16: bool) -> TrainOptimizer:
    if bf16:
        raise ValueError("optim.backend=torch trains in float32 only; use optim.backend=mcore for bf16")
    return TorchAdamW(chunks, cfg, ps)


def _build_mcore(chunks: list[torch.nn.Module], cfg: OptimConfig, ps: Any, bf16: bool) -> TrainOptimizer:
    return McoreOptimizer(chunks, cfg, ps, bf16=bf16)


_BACKENDS: dict[OptimBackend, Callable[..., TrainOptimizer]] = {
    OptimBackend.TORCH: _build_torch,
    OptimBackend.MCORE: _build_mcore,
}


def resolve_backend(backend: OptimBackend) -> OptimBackend:
    """AUTO -> MCORE with CUDA, TORCH without."""
    if backend is OptimBackend.AUTO:
        return OptimBackend.MCORE if torch.cuda.is_available() else OptimBackend.TORCH
    return backend


def build_optimizer(model_chunks: list[torch.nn.Module], cfg: OptimConfig, ps: Any,
                    *, bf16: bool = False) -> TrainOptimizer:
    """The optimizer for `model_chunks` (use its `.model_chunks` for forward/backward)."""
    backend = resolve_backend(cfg.backend)
    logger.info("optimizer: AdamW via the %s backend (lr %.3g, wd %.3g, clip %.3g)",
                backend.value, cfg.lr, cfg.weight_decay, cfg.clip_grad)
    return _BACKENDS[backend](list(model_chunks), cfg, ps, bf16)


# megatron-core modules of the MCORE optimizer path that hard-code CUDA (0.19.2 lines), for the
# lead-owned megatron_ace/model/cpu_patches.py to absorb; applied only without CUDA.


def _cpu_patches_for_optimizer() -> bool:
    """CPU redirections of megatron-core's optimizer path (see megatron_ace.model.cpu_patches)."""
    from megatron_ace.model import cpu_patches

    return cpu_patches.apply_optimizer_cpu_patches()
