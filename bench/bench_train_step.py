"""Training throughput: the Megatron-Core SFT step vs HF transformers, same model, same batches.

Both sides train the same tiny Qwen2 (weights copied from one random-init
`transformers.Qwen2ForCausalLM`) with AdamW on the same [B, S] batches in float32:
  - megatron: `megatron_ace.train.step.train_step` (Megatron-Core forward/backward schedule,
    `--micro-batches` micro-batches per step, token-level loss, grad clipping, AdamW);
  - hf: a plain loop, `Qwen2ForCausalLM(labels=...)` loss, backward per micro-batch,
    clip_grad_norm_, torch AdamW; attention implementation from `--hf-attn`.
Reports positions per second (padding included; here there is none) from the median step time
after `--warmup` steps; the two implementations alternate step by step so that load from other
processes on a shared machine affects both alike. The Megatron side uses the loss `ace sft`
trains with (vocabulary padding masked), so both sides compute the same loss.

  python bench/bench_train_step.py --out bench/out/train_step.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _batches(num: int, B: int, S: int, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    causal = ~torch.ones(S, S, dtype=torch.bool).tril()
    out = []
    for _ in range(num):
        tokens = torch.randint(0, vocab, (B, S + 1), generator=g)
        out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(B, S),
                    "position_ids": torch.arange(S).expand(B, S),
                    "attention_mask": causal[None, None].expand(B, 1, S, S)})
    return out


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def megatron_stepper(hf_dir: Path, batches, args):
    """A function running one Megatron-Core SFT step (parallel state must be initialised)."""
    from megatron_ace.model.config import Qwen2Config
    from megatron_ace.model.parallel import ParallelConfig, init_parallel
    from megatron_ace.train.config import LRDecay, OptimConfig
    from megatron_ace.train.sft import build_trainer
    from megatron_ace.train.step import ModelOutput, masked_vocab_sft_loss, train_step

    ps = init_parallel(ParallelConfig(), seed=0)
    cfg = Qwen2Config.from_hf_config(hf_dir)
    optim = OptimConfig(lr=1e-4, decay=LRDecay.CONSTANT)
    trainer = build_trainer(cfg, ps, optim, total_steps=10**6, dtype=torch.float32,
                            hf_path=str(hf_dir))
    counter = iter(range(10**9))

    def step() -> float:
        i = next(counter) % (len(batches) // args.micro_batches)
        mbs = batches[i * args.micro_batches:(i + 1) * args.micro_batches]
        return train_step(trainer.opt, trainer.sched, mbs, ps, loss_fn=loss_fn,
                          output=ModelOutput.LOGITS).loss

    loss_fn = masked_vocab_sft_loss(ps, cfg.vocab_size)  # the loss `ace sft` trains with
    return step


def hf_stepper(hf_dir: Path, batches, args):
    """A function running one plain HF transformers training step on the same batches."""
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32,
                                             attn_implementation=args.hf_attn)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), foreach=False)
    counter = iter(range(10**9))

    def step() -> float:
        i = next(counter) % (len(batches) // args.micro_batches)
        mbs = batches[i * args.micro_batches:(i + 1) * args.micro_batches]
        total = sum(mb["labels"].numel() for mb in mbs)
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for mb in mbs:
            logits = model(input_ids=mb["tokens"]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                     mb["labels"].flatten(), reduction="sum")
            (loss / total).backward()
            loss_sum += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss_sum / total

    return step


def interleaved_step_times(steppers: dict, args) -> dict[str, list[float]]:
    """Per-step wall times, the implementations alternating round by round, so that load from
    other processes on a shared machine hits both alike."""
    times: dict[str, list[float]] = {name: [] for name in steppers}
    first_loss = {}
    for name, step in steppers.items():
        first_loss[name] = step()
        for _ in range(args.warmup - 1):
            step()
    for _ in range(args.steps):
        for name, step in steppers.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    times["first_loss"] = first_loss
    return times


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--out", default="bench/out/train_step.json")
    args = parser.parse_args(argv)

    import tempfile

    from transformers import Qwen2Config as HFQwen2Config, Qwen2ForCausalLM

    from megatron_ace.model.config import preset

    cfg = preset(args.preset)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        Qwen2ForCausalLM(HFQwen2Config(**cfg.to_hf_config())).save_pretrained(hf_dir)
        batches = _batches(4 * args.micro_batches, args.micro_batch_size, args.seq_length,
                           cfg.vocab_size, seed=1)
        steppers = {"megatron": megatron_stepper(hf_dir, batches, args),
                    "hf": hf_stepper(hf_dir, batches, args)}
        times = interleaved_step_times(steppers, args)
        from megatron_ace.model.parallel import destroy_parallel

        destroy_parallel()
    positions = args.micro_batches * args.micro_batch_size * args.seq_length
    first_loss = times.pop("first_loss")
    rate = {name: positions / _median(t) for name, t in times.items()}
    result = {
        "model": args.preset, "num_params": cfg.num_params(), "dtype": "float32",
        "micro_batch_size": args.micro_batch_size, "seq_length": args.seq_length,
        "micro_batches_per_step": args.micro_batches, "timed_steps": args.steps,
        "torch_threads": torch.get_num_threads(), "hf_attn": args.hf_attn,
        "megatron_tokens_per_s": rate["megatron"], "hf_tokens_per_s": rate["hf"],
        "megatron_over_hf": rate["megatron"] / rate["hf"],
        "first_step_loss": first_loss,
        "step_times_s": times,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
