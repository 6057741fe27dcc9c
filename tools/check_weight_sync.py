#!/usr/bin/env python
"""Sync a Megatron checkpoint into a FRESH vLLM engine, sample, and compare logprobs.

  python tools/check_weight_sync.py --mcore-dir M                       # TP1 / PP1
  torchrun --nproc-per-node 2 tools/check_weight_sync.py --mcore-dir M --tp 2 --pp 1

Steps: load the checkpoint into a Megatron-Core model at --tp/--pp (resharded in memory when the
checkpoint's layout differs); start a vLLM engine on rank 0 from an HF directory holding the
model's config and tokenizer but RANDOM weights (so only a working sync can match); stream the
Megatron weights into it with the bucketed WeightSyncer over --transport (the same gather -> HF
names -> buckets path, and by default the same transport, that the GRPO loop uses; at TP1 over
shared memory the engine reads the parameters where they lie, as in GRPO); sample a few
prompts; score the sampled tokens with the Megatron model and print the max / mean absolute
logprob difference and importance-ratio statistics. Exits 1 when the max difference exceeds
--tolerance (default 1e-4, float32).

Prompts: fixed short texts encoded with the tokenizer (--tokenizer, else the checkpoint's own
tokenizer directory) when it fits the model's vocabulary, else random token ids. Under several
ranks the engine core runs in its own process (vLLM's in-process mode would share torch's
distributed state with the trainer ranks).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

PROMPT_TEXTS = ("What is 17 + 25?", "Write a haiku about rain.", "Solve for x: 3x - 5 = 10.",
                "List three prime numbers.", "def fibonacci(n):", "The capital of France is",
                "Explain recursion in one sentence.", "2, 4, 8, 16,")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mcore-dir", required=True, help="Megatron checkpoint (tools/convert_checkpoint.py)")
    p.add_argument("--tp", type=int, default=1, help="trainer tensor-parallel size for this check")
    p.add_argument("--pp", type=int, default=1, help="trainer pipeline-parallel size for this check")
    p.add_argument("--bucket-mb", type=float, default=64, help="weight-sync bucket size (MB)")
    p.add_argument("--transport", default="auto",
                   choices=["auto", "bytes", "shared_memory", "cuda_ipc"],
                   help="weight-sync transport (auto: shared memory on CPU, CUDA IPC on GPU, as "
                        "`ace grpo` resolves rollout.weight_sync_transport)")
    p.add_argument("--num-prompts", type=int, default=4, help="prompts to sample")
    p.add_argument("--samples-per-prompt", type=int, default=2, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens per sample")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max allowed |logp diff|")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory (default: the checkpoint's tokenizer, if any)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, help="also write the report to this JSON file")
    p.add_argument("--no-sync", action="store_true",
                   help="control run: skip the sync, so the engine keeps its random weights and "
                        "the check must fail")
    return p


def _validate(args, meta) -> None:
    cfg = meta.model
    for name in ("tp", "pp", "num_prompts", "samples_per_prompt", "max_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.num_query_groups % args.tp:
        raise ValueError(f"--tp {args.tp}: the model's {cfg.num_query_groups} query groups do not "
                         "split evenly; pick a TP size that divides them")
    if cfg.num_layers % args.pp:
        raise ValueError(f"--pp {args.pp}: the model's {cfg.num_layers} layers do not split "
                         "evenly into pipeline stages")


def _tokenizer_dir(args, meta) -> Path | None:
    if args.tokenizer:
        path = Path(args.tokenizer)
        if not (path / "tokenizer.json").is_file() and not (path / "vocab.json").is_file():
            raise ValueError(f"--tokenizer {path}: no tokenizer.json or vocab.json there")
        return path
    for rel in (meta.tokenizer_dir, "tokenizer"):
        path = Path(args.mcore_dir) / rel if rel else None
        # The converter may keep only generation_config.json there: not a tokenizer.
        if path is not None and any((path / f).is_file() for f in ("tokenizer.json", "vocab.json")):
            return path
    return None


def _fresh_hf_dir(cfg, tokenizer: Path | None, out: Path) -> Path:
    """Config + tokenizer of the checkpoint, random weights."""
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(12345)
    Qwen2ForCausalLM(HFConfig(**cfg.to_hf_config())).float().save_pretrained(out)
    if tokenizer is not None:
        for f in tokenizer.iterdir():
            if f.is_file():
                shutil.copy2(f, out / f.name)
    return out


def _prompts(args, cfg, tokenizer: Path | None) -> tuple[list[list[int]], str]:
    """Token ids of the prompts, and where they came from."""
    tok = None
    if tokenizer is not None:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(tokenizer))
        except (OSError, ValueError) as exc:
            if args.tokenizer:  # asked for explicitly: a broken one is an error
                raise ValueError(f"--tokenizer {tokenizer}: cannot load ({exc})") from exc
            tok = None  # a checkpoint's partial tokenizer files: fall back to random ids
    if tokenizer is not None and tok is not None:
        texts = [PROMPT_TEXTS[i % len(PROMPT_TEXTS)] for i in range(args.num_prompts)]
        ids = [tok.encode(t, add_special_tokens=False) or [0] for t in texts]
        if max(max(i) for i in ids) < cfg.vocab_size:
            return ids, f"text via {tokenizer}"
    gen = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, cfg.vocab_size, (args.num_prompts, 8), generator=gen).tolist(), "random ids"


def _start_engine(args, cfg, ps, tokenizer: Path | None, tmp: Path, transport):
    from megatron_ace.rollout.engine import DType, RolloutEngineConfig, VllmRolloutEngine
    from megatron_ace.rollout.weight_sync import WeightSyncConfig, WeightSyncer

    hf_dir = _fresh_hf_dir(cfg, tokenizer, tmp / "fresh")
    engine = VllmRolloutEngine(RolloutEngineConfig(
        model_path=str(hf_dir), dtype=DType.FLOAT32, cpu_kvcache_space_gib=1,
        max_model_len=64 + args.max_tokens, in_process=ps.world_size == 1))
    return engine, WeightSyncer(engine, WeightSyncConfig(
        bucket_bytes=int(args.bucket_mb * 2**20), transport=transport))


def _sync(model, cfg, ps, syncer) -> dict | None:
    """Every rank drives the gather collectives; rank 0 streams into the engine."""
    from megatron_ace.model.weights import iter_hf_tensors

    tensors = iter_hf_tensors(model, cfg, ps)
    if ps.rank == 0:
        return syncer.sync(tensors, version=1).to_dict(prefix="")
    for _ in tensors:
        pass
    return None


def _sample(args, engine, prompts, ps) -> list:
    """(tokens, prompt length, engine logprobs) per sample, on every rank."""
    from megatron_ace.rollout.types import SamplingConfig

    samples = None
    if ps.rank == 0:
        groups = engine.generate(prompts, SamplingConfig(
            n=args.samples_per_prompt, temperature=args.temperature, max_tokens=args.max_tokens,
            seed=args.seed, stop_on_eos=False))
        samples = [(s.prompt_token_ids + s.response_token_ids, len(s.prompt_token_ids), s.logprobs)
                   for g in groups for s in g]
    box = [samples]
    if ps.world_size > 1:
        torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _compare(args, model, cfg, ps, samples) -> dict:
    from megatron_ace.model.forward import forward_logprobs
    from megatron_ace.rollout.weight_sync import logprob_parity_metrics

    length = max(len(t) for t, _, _ in samples)
    tokens = torch.tensor([t + [0] * (length - len(t)) for t, _, _ in samples])
    logp = forward_logprobs(model, [{"tokens": tokens}], ps, vocab_size=cfg.vocab_size,
                            temperature=args.temperature)[0]["logp"]
    # logp[:, s] scores token s+1, so the response tokens start at column prompt_len - 1.
    trainer = torch.cat([logp[i, p - 1: p - 1 + len(lp)] for i, (_, p, lp) in enumerate(samples)])
    engine = torch.tensor([v for _, _, lp in samples for v in lp])
    return logprob_parity_metrics(trainer, engine, prefix="")


def _report(args, report: dict) -> int:
    parity = report["parity"]
    print(json.dumps(report, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    ok = parity["logp_abs_diff_max"] <= args.tolerance
    print(f"{int(parity['num_tokens'])} tokens: max |logp diff| = {parity['logp_abs_diff_max']:.3e}, "
          f"mean {parity['logp_abs_diff_mean']:.3e}; ratio mean {parity['ratio_mean']:.6f}, "
          f"min {parity['ratio_min']:.6f}, max {parity['ratio_max']:.6f} "
          f"({'OK' if ok else 'FAIL'}, tolerance {args.tolerance:g})")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from megatron_ace.checkpoint import mcore_format as F
    from megatron_ace.checkpoint.convert import load_into_model
    from megatron_ace.model.builder import build_model
    from megatron_ace.model.parallel import ParallelConfig, destroy_parallel, init_parallel
    from megatron_ace.rollout.engine import Placement
    from megatron_ace.rollout.weight_sync import resolve_transport

    meta = F.read_meta(args.mcore_dir)
    cfg = meta.model
    try:
        _validate(args, meta)
        tokenizer = _tokenizer_dir(args, meta)
        # The engine runs beside rank 0 (its process or one it starts), as in `ace grpo`.
        transport = resolve_transport(args.transport, placement=Placement.COLOCATED,
                                      field="--transport")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ps = init_parallel(ParallelConfig(tp=args.tp, pp=args.pp), seed=args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="ace-sync-check-"))
    engine = syncer = None
    try:
        model = build_model(cfg, ps, dtype=torch.float32)
        load_into_model(model, args.mcore_dir, cfg, ps)  # reshards when the layouts differ
        prompts, source = _prompts(args, cfg, tokenizer) if ps.rank == 0 else (None, None)
        if ps.rank == 0:
            engine, syncer = _start_engine(args, cfg, ps, tokenizer, tmp, transport)
            if ps.tp_size == 1:  # as `ace grpo` does: the engine reads the parameters in place
                syncer.share_parameters(model.parameters())
        sync = None if args.no_sync else _sync(model, cfg, ps, syncer)
        samples = _sample(args, engine, prompts, ps)
        parity = _compare(args, model, cfg, ps, samples)
        if ps.rank != 0:
            return 0
        return _report(args, {"tp": args.tp, "pp": args.pp, "checkpoint_tp": meta.tp,
                              "checkpoint_pp": meta.pp, "prompts": source,
                              "transport": transport.value, "sync": sync, "parity": parity})
    finally:
        if syncer is not None:
            syncer.close()
        if engine is not None:
            engine.close()
        shutil.rmtree(tmp, ignore_errors=True)
        destroy_parallel()


if __name__ == "__main__":
    sys.exit(main())
