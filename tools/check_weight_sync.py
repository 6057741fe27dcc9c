#!/usr/bin/env python
"""Sync a Megatron checkpoint into a FRESH vLLM engine, sample, and compare logprobs.

  python tools/check_weight_sync.py --mcore-dir M                       # TP1 / PP1
  torchrun --nproc-per-node 2 tools/check_weight_sync.py --mcore-dir M --tp 2 --pp 1

Steps: load the checkpoint into a Megatron-Core model at --tp/--pp (resharded in memory when the
checkpoint's layout differs); start a vLLM engine on rank 0 from an HF directory holding the
model's config and tokenizer but RANDOM weights (so only a working sync can match); stream the
Megatron weights into it with the bucketed WeightSyncer (the same gather -> HF names -> buckets
path the GRPO loop uses); sample a few prompts; score the sampled tokens with the Megatron model
and print the max / mean absolute logprob difference and importance-ratio statistics. Exits 1
when the max difference exceeds --tolerance (default 1e-4, float32).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mcore-dir", required=True, help="Megatron checkpoint (tools/convert_checkpoint.py)")
    p.add_argument("--tp", type=int, default=1, help="trainer tensor-parallel size for this check")
    p.add_argument("--pp", type=int, default=1, help="trainer pipeline-parallel size for this check")
    p.add_argument("--bucket-mb", type=float, default=64, help="weight-sync bucket size (MB)")
    p.add_argument("--num-prompts", type=int, default=4, help="prompts to sample")
    p.add_argument("--samples-per-prompt", type=int, default=2, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens per sample")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max allowed |logp diff|")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, help="also write the report to this JSON file")
    p.add_argument("--no-sync", action="store_true",
                   help="control run: skip the sync, so the engine keeps its random weights and "
                        "the check must fail")
    return p


def _fresh_hf_dir(mcore_dir: str, cfg, out: Path) -> Path:
    """Config + tokenizer of the checkpoint, random weights."""
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(12345)
    Qwen2ForCausalLM(HFConfig(**cfg.to_hf_config())).float().save_pretrained(out)
    tok = Path(mcore_dir) / "tokenizer"
    if tok.is_dir():
        for f in tok.iterdir():
            if f.is_file():
                shutil.copy2(f, out / f.name)
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from megatron_ace.checkpoint import mcore_format as F
    from megatron_ace.checkpoint.convert import load_into_model
    from megatron_ace.model.builder import build_model
    from megatron_ace.model.forward import forward_logprobs
    from megatron_ace.model.parallel import ParallelConfig, destroy_parallel, init_parallel
    from megatron_ace.model.weights import iter_hf_tensors
    from megatron_ace.rollout.types import SamplingConfig
    from megatron_ace.rollout.weight_sync import logprob_parity_metrics

    meta = F.read_meta(args.mcore_dir)
    cfg = meta.model
    ps = init_parallel(ParallelConfig(tp=args.tp, pp=args.pp), seed=args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="ace-sync-check-"))
    engine = syncer = None
    try:
        model = build_model(cfg, ps, dtype=torch.float32)
        load_into_model(model, args.mcore_dir, cfg, ps)
        if ps.rank == 0:
            from megatron_ace.rollout.engine import DType, RolloutEngineConfig, VllmRolloutEngine
            from megatron_ace.rollout.weight_sync import WeightSyncConfig, WeightSyncer

            hf_dir = _fresh_hf_dir(args.mcore_dir, cfg, tmp / "fresh")
            engine = VllmRolloutEngine(RolloutEngineConfig(
                model_path=str(hf_dir), dtype=DType.FLOAT32, cpu_kvcache_space_gib=1,
                max_model_len=16 + args.max_tokens, in_process=ps.world_size == 1))
            syncer = WeightSyncer(engine, WeightSyncConfig(bucket_bytes=int(args.bucket_mb * 2**20)))
        sync = None
        if not args.no_sync:
            tensors = iter_hf_tensors(model, cfg, ps)
            if ps.rank == 0:
                sync = syncer.sync(tensors, version=1).to_dict(prefix="")
            else:
                for _ in tensors:  # drive the gather collectives
                    pass
        samples = None
        if ps.rank == 0:
            gen = torch.Generator().manual_seed(args.seed)
            prompts = torch.randint(0, cfg.vocab_size, (args.num_prompts, 8), generator=gen).tolist()
            groups = engine.generate(prompts, SamplingConfig(
                n=args.samples_per_prompt, temperature=args.temperature, max_tokens=args.max_tokens,
                seed=args.seed, stop_on_eos=False))
            samples = [(s.prompt_token_ids + s.response_token_ids, len(s.prompt_token_ids), s.logprobs)
                       for g in groups for s in g]
        box = [samples]
        if ps.world_size > 1:
            torch.distributed.broadcast_object_list(box, src=0)
        samples = box[0]
        length = max(len(t) for t, _, _ in samples)
        tokens = torch.tensor([t + [0] * (length - len(t)) for t, _, _ in samples])
        logp = forward_logprobs(model, [{"tokens": tokens}], ps, vocab_size=cfg.vocab_size,
                                temperature=args.temperature)[0]["logp"]
        if ps.rank != 0:
            return 0
        trainer = torch.cat([logp[i, p - 1: p - 1 + len(lp)] for i, (_, p, lp) in enumerate(samples)])
        engine_lp = torch.tensor([v for _, _, lp in samples for v in lp])
        parity = logprob_parity_metrics(trainer, engine_lp, prefix="")
        report = {"tp": args.tp, "pp": args.pp, "sync": sync, "parity": parity}
        print(json.dumps(report, indent=2))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
        ok = parity["logp_abs_diff_max"] <= args.tolerance
        print(f"max |logp diff| = {parity['logp_abs_diff_max']:.3e} "
              f"({'OK' if ok else 'FAIL'}, tolerance {args.tolerance:g})")
        return 0 if ok else 1
    finally:
        if syncer is not None:
            syncer.close()
        if engine is not None:
            engine.close()
        shutil.rmtree(tmp, ignore_errors=True)
        destroy_parallel()


if __name__ == "__main__":
    sys.exit(main())
