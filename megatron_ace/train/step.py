"""One training step through Megatron-Core's forward/backward schedule, with token-level loss.

What it does:
- `train_step(opt, sched, micro_batches, ps, loss_fn=sft_loss)`: runs every micro-batch of
  this DP rank through `megatron.core.pipeline_parallel.get_forward_backward_func()` (1F1B
  across pipeline stages, plain accumulation without PP), finalizes gradients (DP all-reduce),
  clips and steps the optimizer, and returns globally reduced `StepMetrics`.
- Token-level normalisation: a loss function returns SUMS over its micro-batch,
  `(loss_sum, num_tokens, metric_sums)`. Before the schedule runs, the number of loss tokens is
  counted over all micro-batches and all DP ranks (one all-reduce), and every micro-batch's
  loss_sum is divided by that global count. The gradient is then exactly that of one big batch
  holding every token of the step, whatever the split into micro-batches and DP ranks; the DP
  reduction SUMS gradients (`calculate_per_token_loss=True`, so neither the schedule nor
  megatron-core's DDP divides again).
- `forward_only(...)`: the same schedule without backward (evaluation, logprobs).

The GRPO trainer reuses this with its own `loss_fn` (e.g. a clipped policy loss) over
micro-batches that carry extra keys (advantages, old logprobs). The model output handed to the
loss is chosen by `ModelOutput`: the per-token negative log-likelihood of `labels` [B, S]
(NLL, the SFT default), or this TP rank's vocabulary slice of the logits (LOGITS, for losses
that need temperature-scaled logprobs or entropy).

What it does not do: build batches, move the lr schedule on its own (the caller's
`LRSchedule.apply` is invoked here, once per step), or checkpoint.

Shape legend: B rows of a micro-batch, S positions per row.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from megatron_ace.train.optim import LRSchedule, TrainOptimizer

LossFn = Callable[[torch.Tensor, Mapping[str, Any]],
                  tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]
"""(nll_BS, micro_batch) -> (loss_sum scalar, num_tokens scalar, metric sums {name: scalar}).

Metric sums are summed over micro-batches and DP ranks (`StepMetrics.sums`) and divided by the
global number of loss tokens, like the loss (`StepMetrics.extra`). A metric named `*_max` /
`*_min` is an extreme instead: combined with max / min, never divided."""



class ModelOutput(enum.Enum):
    """What the model returns to the loss function."""

    NLL = "nll"
    """Per-token negative log-likelihood of `labels` [B, S], from megatron-core's fused
    vocab-parallel cross entropy (softmax over the TP-padded vocabulary, as Megatron-LM trains)."""
    LOGITS = "logits"
    """This TP rank's vocabulary slice of the logits [B, S, V/tp]; the loss computes logprobs
    itself (e.g. `megatron_ace.model.forward.token_logprobs_from_logits`, temperature, entropy)."""


def sft_loss(nll_BS: torch.Tensor, batch: Mapping[str, Any]
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Masked token-level cross entropy: sum of nll over positions with loss_mask == 1."""
    mask_BS = batch["loss_mask"].to(nll_BS.dtype)
    loss_sum = (nll_BS.float() * mask_BS.float()).sum()
    return loss_sum, mask_BS.sum().to(torch.int64), {}


def masked_vocab_sft_loss(ps: Any, vocab_size: int) -> LossFn:
    """SFT loss over LOGITS with the TP vocabulary padding masked out of the softmax.

    The NLL of `sft_loss` comes from megatron-core's cross entropy over the padded vocabulary
    (pad columns count in the softmax and their number depends on TP); this one equals the loss
    of the exported HF model exactly and is the same at every TP degree. Use with
    `output=ModelOutput.LOGITS`.
    """
    from megatron_ace.model.forward import token_logprobs_from_logits

    def loss(logits_BSVl: torch.Tensor, batch: Mapping[str, Any]):
        logp_BS = token_logprobs_from_logits(logits_BSVl, batch["labels"], ps, vocab_size)
        mask_BS = batch["loss_mask"].to(logp_BS.dtype)
        return -(logp_BS * mask_BS).sum(), mask_BS.sum().to(torch.int64), {}

    return loss


@dataclasses.dataclass(frozen=True)
class StepMetrics:
    """One optimizer step, reduced over all ranks (identical on every rank)."""

    loss: float
    """Mean loss per loss token over the whole global batch."""
    num_loss_tokens: int
    """Loss tokens in the global batch (the normaliser)."""
    num_tokens: int
    """All positions of the global batch, padding included (throughput counts these)."""
    grad_norm: float
    """Global gradient L2 norm before clipping."""
    lr: float
    """Learning rate used for this step."""
    skipped: bool
    """True when the update was skipped (non-finite gradient)."""
    elapsed_s: float
    """Wall time of the step."""
    extra: dict[str, float] = dataclasses.field(default_factory=dict)
    """Loss-function metrics, per loss token (extremes `*_max` / `*_min` as they are)."""
    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    """Loss-function metrics as reduced over micro-batches and DP ranks, before dividing."""

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / max(self.elapsed_s, 1e-9)


def count_loss_tokens(micro_batches: Sequence[Mapping[str, Any]], ps: Any,
                      key: str = "loss_mask") -> int:
    """Loss tokens over this rank's micro-batches and all DP ranks (one all-reduce)."""
    local = sum(int(mb[key].sum()) for mb in micro_batches)
    count = torch.tensor([local], dtype=torch.int64, device=_comm_device())
    if ps.dp_size > 1:
        dist.all_reduce(count, group=ps.dp_group)
    return int(count.item())


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()}


def _loss_wrapper(nll_BS: torch.Tensor, *, batch: Mapping[str, Any], loss_fn: LossFn,
                  num_global_tokens: int, sums: dict[str, torch.Tensor]):
    """Called by the schedule on the last stage: divide once by the global token count."""
    loss_sum, num_tokens, metrics = loss_fn(nll_BS, batch)
    if "loss" in metrics:
        raise ValueError("loss_fn metrics must not be named 'loss' (the step reports it)")
    scaled = loss_sum / max(num_global_tokens, 1)
    # Accumulate detached copies: the schedule may rescale the tensors it is handed in place.
    accumulate_sums(sums, {"loss": loss_sum, **metrics})
    return scaled, num_tokens.detach().to(torch.int), {}


def _extreme_op(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    return torch.maximum if name.endswith("_max") else torch.minimum if name.endswith("_min") \
        else None


def accumulate_sums(sums: dict[str, torch.Tensor], values: Mapping[str, torch.Tensor]) -> None:
    """Add `values` into `sums` (detached, float64); `*_max` / `*_min` keep the extreme."""
    for name, value in values.items():
        value = torch.as_tensor(value).detach().double()
        if name not in sums:
            sums[name] = value
        else:
            op = _extreme_op(name)
            sums[name] = op(sums[name], value) if op else sums[name] + value


def _forward_step(data_iterator, model, *, loss_fn: LossFn, num_global_tokens: int,
                  sums: dict[str, torch.Tensor], device: torch.device, output: ModelOutput):
    from megatron_ace.model.forward import model_inputs

    batch = _to_device(next(data_iterator), device)
    labels = batch["labels"] if output is ModelOutput.NLL else None
    tokens_BS, position_ids_BS, mask, packed = model_inputs(batch, device)
    out = model(tokens_BS, position_ids_BS, mask, labels=labels, packed_seq_params=packed)
    return out, partial(_loss_wrapper, batch=batch, loss_fn=loss_fn,
                           num_global_tokens=num_global_tokens, sums=sums)


def _check_shapes(micro_batches: Sequence[Mapping[str, Any]], ps: Any) -> tuple[int, int]:
    if not micro_batches:
        raise ValueError("micro_batches is empty")
    shapes = {tuple(mb["tokens"].shape) for mb in micro_batches}
    if ps.pp_size > 1 and len(shapes) > 1:
        raise ValueError(f"pipeline parallelism needs one micro-batch shape per step, got {shapes}")
    B, S = micro_batches[0]["tokens"].shape
    return int(B), int(S)


def run_schedule(model_chunks: list[torch.nn.Module], micro_batches: Sequence[Mapping[str, Any]],
                 ps: Any, *, loss_fn: LossFn, num_global_tokens: int, forward_only: bool,
                 output: ModelOutput = ModelOutput.NLL) -> dict[str, torch.Tensor]:
    """Run megatron-core's forward/backward schedule; returns this rank's metric sums."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    B, S = _check_shapes(micro_batches, ps)
    for chunk in model_chunks:
        # Per-token loss: the schedule must not divide by the number of micro-batches.
        chunk.config.calculate_per_token_loss = True
    sums: dict[str, torch.Tensor] = {}
    step_fn = partial(_forward_step, loss_fn=loss_fn, num_global_tokens=num_global_tokens,
                      sums=sums, device=_comm_device(), output=output)
    forward_backward = get_forward_backward_func()
    forward_backward(
        forward_step_func=step_fn,
        data_iterator=iter(list(micro_batches)),
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=S,
        micro_batch_size=B,
        forward_only=forward_only,
    )
    return sums


def reduce_metric_sums(sums: dict[str, torch.Tensor], ps: Any) -> dict[str, float]:
    """Combine over DP ranks on the last stage (sum; max / min for `*_max` / `*_min`), then
    share with all stages. Every DP rank must hold the same names (the loss function's)."""
    result: dict[str, float] | None = None
    if ps.is_last_stage:
        result = {}
        groups: dict[Any, list[str]] = {}
        for name in sorted(sums):
            groups.setdefault(_extreme_op(name), []).append(name)
        reduce_ops = {None: dist.ReduceOp.SUM, torch.maximum: dist.ReduceOp.MAX,
                      torch.minimum: dist.ReduceOp.MIN}
        for op, names in groups.items():
            values = torch.stack([torch.as_tensor(sums[n], dtype=torch.float64) for n in names])
            values = values.to(_comm_device())
            if ps.dp_size > 1:
                dist.all_reduce(values, op=reduce_ops[op], group=ps.dp_group)
            result.update(zip(names, values.tolist()))
    if ps.pp_size > 1:
        box = [result]
        dist.broadcast_object_list(box, src=ps.pp_global_rank(ps.pp_size - 1), group=ps.pp_group)
        result = box[0]
    assert result is not None
    return result


def per_token(sums: dict[str, float], num_global_tokens: int) -> dict[str, float]:
    """Sums divided by the global loss-token count; extremes stay as they are."""
    denom = max(num_global_tokens, 1)
    return {n: v if _extreme_op(n) else v / denom for n, v in sums.items()}


def train_step(opt: TrainOptimizer, sched: LRSchedule, micro_batches: Sequence[Mapping[str, Any]],
               ps: Any, *, loss_fn: LossFn = sft_loss, output: ModelOutput = ModelOutput.NLL,
               token_key: str = "loss_mask") -> StepMetrics:
    """Forward/backward over `micro_batches` (this DP rank's share), then one optimizer step.

    `token_key` names the [B, S] mask whose global sum normalises the loss (the loss function's
    own `num_tokens` must count the same positions).
    """
    start = time.perf_counter()
    num_global_tokens = count_loss_tokens(micro_batches, ps, token_key)
    num_positions = torch.tensor([sum(mb["tokens"].numel() for mb in micro_batches)],
                                 dtype=torch.int64, device=_comm_device())
    if ps.dp_size > 1:
        dist.all_reduce(num_positions, group=ps.dp_group)
    opt.zero_grad()
    sums = run_schedule(opt.model_chunks, micro_batches, ps, loss_fn=loss_fn,
                        num_global_tokens=num_global_tokens, forward_only=False, output=output)
    opt.finalize_grads()
    lr = sched.apply(opt.param_groups)
    outcome = opt.step()
    sched.advance()
    reduced = reduce_metric_sums(sums, ps)
    metrics = per_token(reduced, num_global_tokens)
    loss = metrics.pop("loss")
    return StepMetrics(
        loss=loss, num_loss_tokens=num_global_tokens, num_tokens=int(num_positions.item()),
        grad_norm=outcome.grad_norm, lr=lr, skipped=outcome.skipped,
        elapsed_s=time.perf_counter() - start, extra=metrics, sums=reduced,
    )


@torch.no_grad()
def forward_only_sums(model_chunks: list[torch.nn.Module],
                      micro_batches: Sequence[Mapping[str, Any]], ps: Any, *,
                      loss_fn: LossFn = sft_loss, output: ModelOutput = ModelOutput.NLL,
                      token_key: str = "loss_mask") -> tuple[dict[str, float], int]:
    """Loss-function sums over micro-batches and DP ranks without backward, and the global
    loss-token count."""
    num_global_tokens = count_loss_tokens(micro_batches, ps, token_key)
    for chunk in model_chunks:
        chunk.eval()
    try:
        sums = run_schedule(model_chunks, micro_batches, ps, loss_fn=loss_fn,
                            num_global_tokens=num_global_tokens, forward_only=True, output=output)
    finally:
        for chunk in model_chunks:
            chunk.train()
    return reduce_metric_sums(sums, ps), num_global_tokens


def forward_only(model_chunks: list[torch.nn.Module], micro_batches: Sequence[Mapping[str, Any]],
                 ps: Any, *, loss_fn: LossFn = sft_loss, output: ModelOutput = ModelOutput.NLL,
                 token_key: str = "loss_mask") -> dict[str, float]:
    """Mean loss (and loss-function metrics) per loss token, without backward."""
    sums, num_global_tokens = forward_only_sums(model_chunks, micro_batches, ps, loss_fn=loss_fn,
                                                output=output, token_key=token_key)
    return per_token(sums, num_global_tokens)
