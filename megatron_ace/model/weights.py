"""Move weights between HF-named full tensors and a live, sharded Megatron-Core model.

- `load_hf_into_model`: every rank takes what it holds (its PP stage's layers, its TP slice)
  from a function that returns full HF tensors by name, e.g. lazily from safetensors files.
- `iter_hf_tensors`: the inverse, a generator that gathers TP slices (all-gather in the TP
  group) and pipeline stages (broadcast in the PP group) into full HF-named tensors, one rule
  at a time in model order, so at most one layer's tensors are alive. Every rank of the model
  replica must drive the generator (it runs collectives); only `ps.tp_rank == 0 and
  ps.pp_rank == 0` receives tensors, the others get nothing yielded.

Both walk the one declarative table in mapping.py, as the offline converter does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from megatron_ace.model import mapping as M
from megatron_ace.model.config import Qwen2Config
from megatron_ace.model.parallel import ParallelState


def _params(model) -> dict[str, torch.nn.Parameter]:
    return dict(model.named_parameters())


def load_hf_into_model(model, get_hf: Callable[[str], torch.Tensor], cfg: Qwen2Config,
                       ps: ParallelState) -> None:
    """Copy full HF tensors into this rank's shard of `model`; every parameter must be set."""
    params = _params(model)
    padded = model.vocab_size
    offset = M.pp_layer_range(cfg.num_layers, ps.pp_size, ps.pp_rank).start
    loaded: set[str] = set()
    for rule, layer in M.iter_rules(cfg, model.ace_spec):
        if not M.on_stage(rule, layer, ps.pp_rank, ps.pp_size, cfg):
            continue
        name, hf_names = M.expand(rule, layer)
        full = M.merge_hf(rule, [get_hf(n) for n in hf_names], cfg, padded)
        _copy_into(params, M.local_name(name, layer, offset), M.shard(rule, full, ps.tp_rank,
                                                                          ps.tp_size), loaded)
    if cfg.tie_word_embeddings and ps.is_last_stage and not ps.is_first_stage:
        # Tied embeddings under PP: the last stage keeps its own copy of the embedding as
        # `output_layer.weight` (kept in sync by megatron's embedding-group all-reduce).
        rule = M.rules(cfg, model.ace_spec)[0]
        full = M.merge_hf(rule, [get_hf(rule.hf[0])], cfg, padded)
        _copy_into(params, "output_layer.weight", M.shard(rule, full, ps.tp_rank, ps.tp_size),
                   loaded)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"parameters not covered by the HF mapping: {', '.join(missing)}")


def _copy_into(params, name: str, value: torch.Tensor, loaded: set[str]) -> None:
    if name not in params:
        raise ValueError(f"{name}: not a parameter of this model chunk")
    param = params[name]
    if tuple(param.shape) != tuple(value.shape):
        raise ValueError(f"{name}: model expects shape {tuple(param.shape)}, "
                         f"mapping produced {tuple(value.shape)}")
    with torch.no_grad():
        param.copy_(value.to(param.dtype))
    loaded.add(name)


def _gather_tp(rule: M.Rule, local: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    if rule.tp_dim is None or ps.tp_size == 1:
        return local
    shards = [torch.empty_like(local) for _ in range(ps.tp_size)]
    dist.all_gather(shards, local.contiguous(), group=ps.tp_group)
    return M.unshard(rule, shards)


def iter_full_tensors(model, cfg: Qwen2Config, ps: ParallelState
                      ) -> Iterator[tuple[M.Rule, int | None, torch.Tensor | None]]:
    """(rule, layer, full Megatron tensor) in model order; the tensor is None off rank (0, 0)."""
    params = _params(model)
    padded = model.vocab_size
    offset = M.pp_layer_range(cfg.num_layers, ps.pp_size, ps.pp_rank).start
    receiver = ps.tp_rank == 0 and ps.pp_rank == 0
    for rule, layer in M.iter_rules(cfg, model.ace_spec):
        owner = next(s for s in range(ps.pp_size) if M.on_stage(rule, layer, s, ps.pp_size, cfg))
        full = None
        if owner == ps.pp_rank:
            name, _ = M.expand(rule, layer)
            local = params[M.local_name(name, layer, offset)].detach()
            full = _gather_tp(rule, local, ps)
        if ps.pp_size > 1 and owner != 0 and ps.tp_rank == 0 and ps.pp_rank in (0, owner):
            # Only stage 0's TP-rank-0 needs the tensor: a point-to-point hop, not a broadcast.
            if ps.pp_rank == owner:
                dist.send(full.contiguous(), dst=ps.pp_global_rank(0), group=ps.pp_group)
                full = None
            else:
                full = torch.empty(M.full_shape(rule, layer, cfg, padded),
                                   dtype=next(iter(params.values())).dtype, device=ps.device)
                dist.recv(full, src=ps.pp_global_rank(owner), group=ps.pp_group)
        yield rule, layer, (full if receiver else None)


def iter_hf_tensors(model, cfg: Qwen2Config, ps: ParallelState
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Full HF-named tensors of the model (un-padded vocabulary), on TP rank 0 of stage 0."""
    for rule, layer, full in iter_full_tensors(model, cfg, ps):
        if full is None:
            continue
        _, hf_names = M.expand(rule, layer)
        for hf_name, tensor in zip(hf_names, M.split_hf(rule, full, cfg)):
            yield hf_name, tensor
