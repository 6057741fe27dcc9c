"""torchrun worker: the trainer side of one GRPO step, run in several ways on the same rollouts.

Usage: grpo_update_worker.py TP PP OUT.pt CASE [CASE ...]

Every case starts from the same weights (a random HF Qwen2, loaded through the mapping table)
and the same synthetic rollouts (long-tailed lengths, one sequence longer than the packing
budget, groups with and without reward variance, truncated responses under the overlong
filter), runs `train_on_rollouts` once, and records on global rank 0: the step's metrics, the
full (HF-named, gathered over TP/PP) gradient and parameters after the update, and each DP
rank's real positions. Cases: `<mode>[-separate][-updates2][-nokeep][-measureall|-measuresampled]`
with mode `packed` or `padded`; `-separate` turns off the fused old-logprob forward, `-updates2`
runs two mini-batches, `-nokeep` drops every group (nothing to train on), `-measureall` also
measures the rollouts that are not trained on (a forward pass), `-measuresampled` measures them
from their engine logprobs (no forward).
"""

import sys

import torch
import torch.distributed as dist
from transformers import Qwen2Config as HFConfig
from transformers import Qwen2ForCausalLM

from megatron_ace.algorithms.grpo import PolicyLossConfig, compute_advantages_B, AdvantageEstimator
from megatron_ace.data.packing import AttentionFormat, BatchMode
from megatron_ace.model.builder import build_model
from megatron_ace.model.config import preset
from megatron_ace.model.parallel import ParallelConfig, destroy_parallel, init_parallel
from megatron_ace.model.weights import iter_hf_tensors, load_hf_into_model
from megatron_ace.train import grpo_batch
from megatron_ace.train.config import LRDecay, OptimBackend, OptimConfig
from megatron_ace.train.grpo_update import UpdateSettings, train_on_rollouts
from megatron_ace.train.optim import LRSchedule, build_optimizer
from megatron_ace.train.sft import Trainer

GROUP = 4
BUDGET = 96
LR = 1e-3


def rollouts(vocab: int, nokeep: bool) -> tuple[grpo_batch.Rollouts, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    num_prompts = 5
    prompts, responses, logps, truncated = [], [], [], []
    for p in range(num_prompts):
        prompt = torch.randint(3, vocab, (int(torch.randint(3, 12, (1,), generator=g)),),
                               generator=g).tolist()
        for j in range(GROUP):
            # log-normal-ish lengths; prompt 0's first response is longer than the budget
            n = 110 if (p, j) == (0, 0) else max(1, int(torch.empty(1).log_normal_(
                2.5, 0.8, generator=g).clamp(max=70)))
            prompts.append(prompt)
            responses.append(torch.randint(3, vocab, (n,), generator=g).tolist())
            logps.append((-torch.rand(n, generator=g) * 3).tolist())
            truncated.append(n >= 70)
    rewards = torch.tensor([1., 0, 1, 0, 1, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 1])
    adv = compute_advantages_B(AdvantageEstimator.GRPO, rewards, GROUP)
    keep = (rewards.view(-1, GROUP) != rewards.view(-1, GROUP)[:, :1]).any(1)
    keep = keep.repeat_interleave(GROUP) & (not nokeep)
    loss_on = ~torch.tensor(truncated)
    return grpo_batch.Rollouts(prompts=prompts, responses=responses, adv_B=adv.float(),
                               loss_on_B=loss_on, engine_logp=logps), keep


def full(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}


def run_case(case: str, cfg, sd, ps) -> dict:
    parts = case.split("-")
    mode = BatchMode(parts[0])
    model = build_model(cfg, ps)
    load_hf_into_model(model, lambda n: sd[n], cfg, ps)
    optim = OptimConfig(lr=LR, min_lr=LR, decay=LRDecay.CONSTANT, warmup_steps=0,
                        weight_decay=0.0, clip_grad=0.0, backend=OptimBackend.TORCH)
    opt = build_optimizer([model], optim, ps)
    trainer = Trainer(model_cfg=cfg, ps=ps, opt=opt, sched=LRSchedule(cfg=optim, total_steps=4),
                      dtype=torch.float32)
    batch, keep = rollouts(cfg.vocab_size, "nokeep" in parts)
    layout = grpo_batch.LayoutConfig(mode=mode, max_tokens=BUDGET, micro_batch_size=3,
                                     attention=AttentionFormat.THD, pad_id=0,
                                     uniform_length=ps.pp_size > 1)
    settings = UpdateSettings(loss=PolicyLossConfig(clip_low=0.2, clip_high=0.28),
                              num_updates=2 if "updates2" in parts else 1,
                              fuse_old_logprobs="separate" not in parts, layout=layout,
                              temperature=0.9, vocab_size=cfg.vocab_size,
                              measure_filtered="measureall" in parts or "measuresampled" in parts,
                              filtered_by_sampled_tokens="measuresampled" in parts)
    metrics = train_on_rollouts(trainer, batch, keep, settings)
    # Gradients by HF name: the same gather as the weights, run on a model holding the grads.
    holder = build_model(cfg, ps)
    with torch.no_grad():
        for (_, p), (_, h) in zip(model.named_parameters(), holder.named_parameters()):
            h.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    grads = full(dict(iter_hf_tensors(holder, cfg, ps)))
    params = full(dict(iter_hf_tensors(model, cfg, ps)))
    plan = grpo_batch.plan_micro_batches(batch, keep.nonzero().flatten().tolist(),
                                         dp_size=ps.dp_size, layout=layout)
    rank_positions = [sum(batch.num_positions(i) for mb in rank for i in mb) for rank in plan]
    return {"metrics": metrics, "grads": grads, "params": params, "keep": keep,
            "engine_logp": batch.engine_logp,
            "rank_positions": rank_positions, "num_micro_batches": [len(r) for r in plan]}


def main() -> None:
    tp, pp, out, cases = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    cfg = preset("tiny", max_position_embeddings=512)
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(HFConfig(**cfg.to_hf_config())).float()
    for p in hf.parameters():  # non-zero biases / norms so every mapping rule matters
        torch.nn.init.normal_(p, std=0.05 if p.dim() > 1 else 0.3)
    sd = hf.state_dict()
    ps = init_parallel(ParallelConfig(tp=tp, pp=pp), seed=0)
    results = {case: run_case(case, cfg, sd, ps) for case in cases}
    results["initial"] = {k: v for k, v in sd.items()}
    results["layout"] = {"tp": ps.tp_size, "pp": ps.pp_size, "dp": ps.dp_size}
    if ps.rank == 0:
        torch.save(results, out)
    if dist.is_initialized():
        dist.barrier()
    destroy_parallel()


if __name__ == "__main__":
    main()
