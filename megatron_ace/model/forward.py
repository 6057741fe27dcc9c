"""Log-probabilities and entropy from a TP/PP Megatron-Core model.

Logits stay vocabulary-parallel (each TP rank holds a slice of the vocabulary): log-softmax and
entropy are computed with two all-reduces in the TP group instead of gathering [B, S, V].
Vocabulary padding columns (ids >= the real vocabulary, added so TP ranks hold equal slices) are
masked to -inf, so probabilities match an un-padded HF model exactly.

Shape legend: B sequences, S positions, V vocabulary (Vl: this rank's slice).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist

from megatron_ace.model.parallel import ParallelState


def mask_padded_vocab(logits_BSVl: torch.Tensor, ps: ParallelState, vocab_size: int
                      ) -> torch.Tensor:
    """-inf on this rank's columns that are vocabulary padding."""
    slice_size = logits_BSVl.shape[-1]
    start = ps.tp_rank * slice_size
    num_real = max(0, min(slice_size, vocab_size - start))
    if num_real == slice_size:
        return logits_BSVl
    mask = torch.arange(slice_size, device=logits_BSVl.device) >= num_real
    return logits_BSVl.masked_fill(mask, float("-inf"))


def _shifted_exp(logits_BSVl: torch.Tensor, tp_group) -> tuple[torch.Tensor, ...]:
    """(logits - global max, its exp, global sum of that exp) over the TP-sharded vocabulary."""
    lmax = logits_BSVl.max(dim=-1).values
    dist.all_reduce(lmax, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = logits_BSVl - lmax.unsqueeze(-1)
    exp = shifted.exp()
    sum_exp = exp.sum(dim=-1)
    dist.all_reduce(sum_exp, group=tp_group)
    return shifted, exp, sum_exp


class _VocabParallelLogSoftmaxGather(torch.autograd.Function):
    """log p(target) under softmax over the TP-sharded vocabulary, with its gradient."""

    @staticmethod
    def forward(ctx, logits_BSVl, target_BS, tp_group, vocab_start):
        logits = logits_BSVl.float()
        shifted, exp, sum_exp = _shifted_exp(logits, tp_group)
        local_t = target_BS - vocab_start
        in_slice = (local_t >= 0) & (local_t < logits.shape[-1])
        safe_t = local_t.clamp(0, logits.shape[-1] - 1)
        tgt = torch.gather(shifted, -1, safe_t.unsqueeze(-1)).squeeze(-1)
        tgt = torch.where(in_slice, tgt, torch.zeros_like(tgt))
        dist.all_reduce(tgt, group=tp_group)
        logp = tgt - sum_exp.log()
        softmax = exp / sum_exp.unsqueeze(-1)
        ctx.save_for_backward(softmax, safe_t, in_slice)
        ctx.input_dtype = logits_BSVl.dtype
        return logp

    @staticmethod
    def backward(ctx, grad_BS):
        softmax, safe_t, in_slice = ctx.saved_tensors
        # d logp / d logit_j = 1[j == target] - softmax_j
        grad = -softmax * grad_BS.unsqueeze(-1)
        onehot = torch.zeros_like(softmax).scatter_(-1, safe_t.unsqueeze(-1),
                                                     in_slice.unsqueeze(-1).to(softmax.dtype))
        grad = grad + onehot * grad_BS.unsqueeze(-1)
        return grad.to(ctx.input_dtype), None, None, None


def token_logprobs_from_logits(logits_BSVl: torch.Tensor, targets_BS: torch.Tensor,
                               ps: ParallelState, vocab_size: int,
                               temperature: float = 1.0) -> torch.Tensor:
    """log p(targets) per position; logits of position s score target s (already shifted)."""
    logits = mask_padded_vocab(logits_BSVl, ps, vocab_size)
    if temperature != 1.0:
        logits = logits / temperature
    vocab_start = ps.tp_rank * logits.shape[-1]
    return _VocabParallelLogSoftmaxGather.apply(logits, targets_BS, ps.tp_group, vocab_start)


@torch.no_grad()
def entropy_from_logits(logits_BSVl: torch.Tensor, ps: ParallelState, vocab_size: int,
                        temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position (a metric: no gradient)."""
    logits = mask_padded_vocab(logits_BSVl.float(), ps, vocab_size) / temperature
    shifted, exp, sum_exp = _shifted_exp(logits, ps.tp_group)
    p_shift = torch.where(exp > 0, exp * shifted, torch.zeros_like(exp)).sum(dim=-1)
    dist.all_reduce(p_shift, group=ps.tp_group)
    # H = log Z - E[shifted], with Z = sum exp(shifted)
    return sum_exp.log() - p_shift / sum_exp


def causal_position_ids(tokens_BS: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens_BS.shape[1], device=tokens_BS.device).expand_as(tokens_BS)


def model_inputs(batch: dict, device: torch.device):
    """(tokens, position_ids, attention_mask, packed_seq_params) for a GPTModel call.

    A batch with `cu_seqlens` and no dense `attention_mask` is a packed row in THD layout:
    tokens [1, T] holding several sequences back to back, `cu_seqlens` [K + 1] int32 their
    boundaries. Megatron-Core then applies rotary embeddings per sequence and the core
    attention (TE, or model/attention.py's SDPA) attends within each sequence only. Otherwise
    the batch is [B, S] with a dense mask (True = masked) or None (causal).
    """
    tokens = batch["tokens"].to(device)
    pos = batch.get("position_ids")
    pos = causal_position_ids(tokens) if pos is None else pos.to(device)
    mask = batch.get("attention_mask")
    packed = None
    if mask is None and batch.get("cu_seqlens") is not None:
        from megatron.core.packed_seq_params import PackedSeqParams

        if tokens.shape[0] != 1:
            raise ValueError(f"a THD micro-batch is one packed row, got tokens {tuple(tokens.shape)}")
        cu = batch["cu_seqlens"].to(device=device, dtype=torch.int32)
        max_len = int(batch.get("max_seqlen") or int((cu[1:] - cu[:-1]).max()))
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=max_len, max_seqlen_kv=max_len)
    return tokens, pos, None if mask is None else mask.to(device), packed


def _forward_step(ps, vocab_size, temperature, with_entropy, data_iterator, model):
    batch = next(data_iterator)
    tokens, pos, mask, packed = model_inputs(batch, ps.device)
    output = model(tokens, pos, mask, packed_seq_params=packed)

    def collect(logits_BSVl, non_loss_data=True):
        targets = tokens[:, 1:]
        logp = token_logprobs_from_logits(logits_BSVl[:, :-1], targets, ps, vocab_size,
                                          temperature)
        out = {"logp": logp.detach()}
        if with_entropy:
            out["entropy"] = entropy_from_logits(logits_BSVl[:, :-1], ps, vocab_size,
                                                 temperature)
        return out

    return output, collect


@torch.no_grad()
def forward_logprobs(model, batches: list[dict[str, torch.Tensor]], ps: ParallelState, *,
                     vocab_size: int, temperature: float = 1.0,
                     with_entropy: bool = False) -> list[dict[str, torch.Tensor]]:
    """Per-token logprobs (and entropy) of each batch's `tokens[:, 1:]`, on every rank.

    Each batch is {tokens [B, S], optional position_ids [B, S], optional attention_mask
    [B, 1, S, S] bool (True = masked)}; all batches share one shape (pipeline buffers are sized
    once). Returns, per batch, {"logp": [B, S-1]} (+ "entropy"). Runs Megatron-Core's
    forward-only schedule, so it works at any PP; results are broadcast from the last stage.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not batches:
        return []
    shape = tuple(batches[0]["tokens"].shape)
    for i, b in enumerate(batches):
        if tuple(b["tokens"].shape) != shape:
            raise ValueError(f"batch {i}: tokens shape {tuple(b['tokens'].shape)} != {shape}")
    was_training = model.training
    model.eval()
    step: Callable = partial(_forward_step, ps, vocab_size, temperature, with_entropy)
    try:
        outputs = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter(batches),
            model=[model],
            num_microbatches=len(batches),
            seq_length=shape[1],
            micro_batch_size=shape[0],
            forward_only=True,
            collect_non_loss_data=True,
        )
    finally:
        model.train(was_training)
    keys = ["logp"] + (["entropy"] if with_entropy else [])
    results = []
    for i in range(len(batches)):
        item = {}
        for key in keys:
            if ps.is_last_stage:
                tensor = outputs[i][key].float().contiguous()
            else:
                tensor = torch.empty(shape[0], shape[1] - 1, device=ps.device)
            if ps.pp_size > 1:
                dist.broadcast(tensor, src=ps.pp_global_rank(ps.pp_size - 1), group=ps.pp_group)
            item[key] = tensor
        results.append(item)
    return results
