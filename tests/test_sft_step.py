"""The SFT training step in one process (real megatron-core on gloo, float32).

- gradient accumulation: one micro-batch of 4 rows and 4 micro-batches of 1 row give the same
  loss, the same gradients and the same weights after an AdamW step;
- token-level normalisation: the step's loss equals a plain PyTorch mean of the per-token NLL
  over every loss token of the batch (rows carry different numbers of loss tokens, so a mean of
  per-row or per-micro-batch means would differ and fail this test);
- the learning-rate schedule's warmup / cosine endpoints, and weight decay groups.
"""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import adamw_first_step_bound, reorder_atol, reorder_rtol

from megatron_ace.train.config import LRDecay, OptimConfig
from megatron_ace.train.optim import LRSchedule, build_optimizer, lr_at

LR = 1e-3


@pytest.fixture(scope="module")
def ps():
    from megatron_ace.model.parallel import ParallelConfig, destroy_parallel, init_parallel

    state = init_parallel(ParallelConfig(), seed=7)
    yield state
    destroy_parallel()


def _rows(num_rows: int, S: int, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Rows with a causal mask and a different number of loss tokens each."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    causal_SS = ~torch.ones(S, S, dtype=torch.bool).tril()
    for i in range(num_rows):
        tokens = torch.randint(0, vocab, (1, S), generator=g)
        mask = torch.zeros(1, S)
        mask[0, S - (3 + 7 * i):] = 1.0  # 3, 10, 17, 24 loss tokens
        rows.append({"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": mask,
                     "position_ids": torch.arange(S)[None], "attention_mask": causal_SS[None, None]})
    return rows


def _tensors(state):
    """Tensor entries of a state dict, cloned (megatron-core adds `_extra_state` = None)."""
    return {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}


def _cat(rows):
    return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}


def _build(ps, cfg, state=None):
    from megatron_ace.model.builder import build_model

    model = build_model(cfg, ps)
    if state is not None:
        model.load_state_dict(state, strict=False)
    return model


@pytest.mark.numerics
def test_grad_accumulation_1x4_equals_4x1(ps):
    from megatron_ace.model.config import preset
    from megatron_ace.train.step import run_schedule, sft_loss, train_step

    cfg = preset("tiny", vocab_size=128)
    optim_cfg = OptimConfig(lr=LR, adam_eps=1e-6, clip_grad=0.0, weight_decay=0.1)
    rows = _rows(4, 32, 128, seed=0)
    one_x4 = [_cat(rows)]
    four_x1 = rows
    ref = _build(ps, cfg)
    init = _tensors(ref.state_dict())

    # The plain reference: one forward over all rows, mean NLL over every loss token.
    with torch.no_grad():
        b = one_x4[0]
        nll = ref(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"])
        plain = float((nll * b["loss_mask"]).sum() / b["loss_mask"].sum())
        per_row_mean = float(((nll * b["loss_mask"]).sum(1) / b["loss_mask"].sum(1)).mean())
    assert abs(plain - per_row_mean) > 1e-3  # the rows' weighting matters for this data

    results, grads, weights = [], [], []
    for micro_batches in (one_x4, four_x1):
        model = _build(ps, cfg, init)
        opt = build_optimizer([model], optim_cfg, ps)
        # Gradients alone first (schedule + DP finalize), then a full step from the same init.
        opt.zero_grad()
        n = sum(int(mb["loss_mask"].sum()) for mb in micro_batches)
        run_schedule(opt.model_chunks, micro_batches, ps, loss_fn=sft_loss,
                     num_global_tokens=n, forward_only=False)
        opt.finalize_grads()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        sched = LRSchedule(cfg=optim_cfg, total_steps=10)
        results.append(train_step(opt, sched, micro_batches, ps))
        weights.append(_tensors(model.state_dict()))

    # Tolerances (tests/tolerances.py): the loss sums 54 tokens, a gradient element 4 x 32
    # positions, in another grouping; the weights follow from AdamW's first step on each side's
    # gradients. A skipped micro-batch or a per-micro-batch mean moves gradients by ~10% of
    # their scale, 10^4 times these bounds.
    num_loss_tokens = 3 + 10 + 17 + 24
    assert results[0].num_loss_tokens == results[1].num_loss_tokens == num_loss_tokens
    assert math.isclose(results[0].loss, plain, rel_tol=reorder_rtol(num_loss_tokens))
    assert math.isclose(results[1].loss, plain, rel_tol=reorder_rtol(num_loss_tokens))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0,
                                   atol=reorder_atol(grads[0][name], 4 * 32))
    moved, loose = 0.0, 0
    for name in weights[0]:
        bound = adamw_first_step_bound(grads[0][name], grads[1][name], init[name],
                                       lr=results[0].lr, eps=optim_cfg.adam_eps)
        diff = (weights[0][name] - weights[1][name]).double().abs()
        assert bool((diff <= bound).all()), (name, float((diff - bound).max()))
        loose += int((bound > 1e-2 * results[0].lr).sum())
        moved = max(moved, float((weights[0][name] - init[name]).abs().max()))
    assert moved > 1e-4  # the step really changed the weights
    assert loose < 1e-3 * sum(w.numel() for w in weights[0].values())  # the bound is tight


def test_lr_schedule_endpoints():
    common = dict(lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=14)
    assert lr_at(0, decay=LRDecay.COSINE, **common) == pytest.approx(0.25)
    assert lr_at(3, decay=LRDecay.COSINE, **common) == pytest.approx(1.0)
    assert lr_at(4, decay=LRDecay.COSINE, **common) == pytest.approx(1.0)
    assert lr_at(9, decay=LRDecay.COSINE, **common) == pytest.approx(0.55)
    assert lr_at(14, decay=LRDecay.COSINE, **common) == pytest.approx(0.1)
    assert lr_at(9, decay=LRDecay.LINEAR, **common) == pytest.approx(0.55)
    assert lr_at(13, decay=LRDecay.CONSTANT, **common) == pytest.approx(1.0)


def test_weight_decay_skips_biases_and_norms(ps):
    from megatron_ace.model.config import preset

    model = _build(ps, preset("tiny", vocab_size=128))
    optim_cfg = OptimConfig(lr=1e-3, weight_decay=0.1)
    opt = build_optimizer([model], optim_cfg, ps)
    LRSchedule(cfg=optim_cfg, total_steps=10).apply(opt.param_groups)
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        expected = 0.0 if (p.dim() == 1 or name.endswith(".bias")) else 0.1
        assert decay_of[id(p)] == expected, name


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="optim.min_lr"):
        OptimConfig(lr=1e-3, min_lr=1e-2)


def _train(ps, model_cfg, init, optim_cfg, batches, num_steps, *, save_to=None, load_from=None):
    """Losses of `num_steps` steps from `init` (or from checkpoint `load_from`)."""
    from megatron_ace.train.state import load_training_state, save_training_state
    from megatron_ace.train.step import train_step

    model = _build(ps, model_cfg, init)
    opt = build_optimizer([model], optim_cfg, ps)
    sched = LRSchedule(cfg=optim_cfg, total_steps=8)
    start = 0
    if load_from is not None:
        start = load_training_state(load_from, model_chunks=opt.model_chunks, opt=opt,
                                    sched=sched, ps=ps).step
    losses = []
    for step in range(start, start + num_steps):
        losses.append(train_step(opt, sched, batches[step % len(batches)], ps).loss)
    if save_to is not None:
        save_training_state(save_to, step=start + num_steps, model_chunks=opt.model_chunks,
                            opt=opt, sched=sched, data_state={}, ps=ps, keep_last=1)
    return losses


@pytest.mark.numerics
@pytest.mark.parametrize("backend", ["torch", "mcore"])
def test_state_round_trip_continues_exactly(ps, tmp_path, backend):
    """2 steps, save, 2 steps == 2 steps, save, (fresh model) load, 2 steps: bit-identical."""
    from megatron_ace.model.config import preset
    from megatron_ace.train.config import OptimBackend

    model_cfg = preset("tiny", vocab_size=128)
    optim_cfg = OptimConfig(lr=1e-3, warmup_steps=1, weight_decay=0.1,
                            backend=OptimBackend(backend), distributed=False)
    batches = [[_cat(_rows(2, 32, 128, seed=s))] for s in range(4)]
    init = _tensors(_build(ps, model_cfg).state_dict())
    straight = _train(ps, model_cfg, init, optim_cfg, batches, 4)
    first = _train(ps, model_cfg, init, optim_cfg, batches, 2, save_to=tmp_path / "ckpt")
    ckpt = tmp_path / "ckpt" / "step_00000002"
    other_init = _tensors(_build(ps, model_cfg).state_dict())  # different weights until loaded
    second = _train(ps, model_cfg, other_init, optim_cfg, batches, 2, load_from=ckpt)
    assert first + second == straight


@pytest.mark.numerics
def test_mcore_backend_equals_torch_backend(ps):
    """megatron-core DDP + FP32Optimizer (CPU-patched) trains like torch AdamW + our reductions."""
    from megatron_ace.model.config import preset
    from megatron_ace.train.config import OptimBackend

    model_cfg = preset("tiny", vocab_size=128)
    batches = [[_cat(_rows(2, 32, 128, seed=s))] for s in range(4)]
    init = _tensors(_build(ps, model_cfg).state_dict())
    curves = {}
    for backend in (OptimBackend.TORCH, OptimBackend.MCORE):
        optim_cfg = OptimConfig(lr=1e-3, warmup_steps=1, weight_decay=0.1, clip_grad=0.5,
                                backend=backend, distributed=False)
        curves[backend] = _train(ps, model_cfg, init, optim_cfg, batches, 4)
    # Same math on one rank; the backends sum the gradient norm in another order, and the clip
    # factor scales every gradient alike (AdamW's update is scale-invariant but for eps): the
    # losses (13 loss tokens each) agree to the rounding of their sums.
    assert curves[OptimBackend.MCORE] == pytest.approx(curves[OptimBackend.TORCH],
                                                       rel=reorder_rtol(3 + 10))
    assert curves[OptimBackend.TORCH][-1] < curves[OptimBackend.TORCH][0]


def test_distributed_optimizer_on_cpu_is_refused(ps):
    from megatron_ace.model.config import preset
    from megatron_ace.train.config import OptimBackend

    if torch.cuda.is_available():
        pytest.skip("the refusal is CPU-only")
    model = _build(ps, preset("tiny", vocab_size=128))
    with pytest.raises(ValueError, match="optim.distributed"):
        build_optimizer([model], OptimConfig(backend=OptimBackend.MCORE, distributed=True), ps)


@pytest.mark.numerics
def test_masked_vocab_loss_ignores_tp_padding(ps):
    """The LOGITS-path SFT loss equals cross entropy over the real vocabulary only."""
    from megatron_ace.model.config import preset
    from megatron_ace.train.step import ModelOutput, forward_only, masked_vocab_sft_loss

    vocab = 100  # padded to 128 columns in the model
    model = _build(ps, preset("tiny", vocab_size=vocab))
    batch = _cat(_rows(2, 32, vocab, seed=3))
    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
        assert logits.shape[-1] == 128
        nll = -torch.log_softmax(logits[..., :vocab].float(), -1).gather(
            -1, batch["labels"][..., None])[..., 0]
        reference = float((nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum())
        padded = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                       labels=batch["labels"])
        padded_loss = float((padded * batch["loss_mask"]).sum() / batch["loss_mask"].sum())
    got = forward_only([model], [batch], ps, loss_fn=masked_vocab_sft_loss(ps, vocab),
                       output=ModelOutput.LOGITS)["loss"]
    # Same logits, two log-softmax implementations: sums over the 128 columns in another order.
    assert got == pytest.approx(reference, rel=reorder_rtol(128))
    assert abs(padded_loss - reference) > 1e-3  # the padding columns do change the NLL path
