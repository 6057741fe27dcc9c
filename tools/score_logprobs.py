"""Per-token log-probabilities of given token sequences, from a Megatron or an HF checkpoint.

  torchrun --nproc-per-node N tools/score_logprobs.py --mcore-dir M --tp T --pp P \
      --tokens-file seqs.json --out logp.json
  python tools/score_logprobs.py --hf-dir H --tokens-file seqs.json --out logp.json

`--tokens-file` is a JSON list of token-id lists; `--out` gets a JSON list of lists with one
log-probability per token after the first. The run's TP/PP may differ from the checkpoint's:
the weights are then re-sharded in memory through the mapping (each rank un-shards only the
tensors of its own stage, one at a time); with equal layouts each rank loads its own rank file
after a strict key check. Sequences are right-padded to one length (causal attention: padding
never changes earlier positions) and scored in float32 by default. `--hf-dir` scores with
transformers (float32, eager attention), the reference to compare against.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--mcore-dir", help="megatron-ace checkpoint directory (run under torchrun)")
    src.add_argument("--hf-dir", help="HF model directory (scored with transformers)")
    ap.add_argument("--tokens-file", required=True, help="JSON list of token-id lists")
    ap.add_argument("--out", required=True, help="output JSON list of logprob lists")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size of this run")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of this run")
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    return ap


def read_tokens(path: str) -> list[list[int]]:
    seqs = json.loads(Path(path).read_text())
    if not isinstance(seqs, list) or not seqs:
        raise ValueError(f"{path}: expected a non-empty JSON list of token-id lists")
    for i, s in enumerate(seqs):
        if not isinstance(s, list) or len(s) < 2 or not all(isinstance(t, int) for t in s):
            raise ValueError(f"{path}: row {i}: expected a list of >= 2 integer token ids")
    return seqs


def score_hf(hf_dir: str, seqs: list[list[int]]) -> list[list[float]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    out = []
    with torch.no_grad():
        for s in seqs:
            x = torch.tensor([s])
            logp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
            out.append(logp.gather(-1, x[0, 1:, None])[:, 0].tolist())
    return out


def score_mcore(args, seqs: list[list[int]]) -> list[list[float]] | None:
    from megatron_ace.checkpoint import mcore_format as F
    from megatron_ace.checkpoint.convert import load_into_model
    from megatron_ace.model.builder import build_model
    from megatron_ace.model.forward import forward_logprobs
    from megatron_ace.model.parallel import ParallelConfig, destroy_parallel, init_parallel

    meta = F.read_meta(args.mcore_dir)
    ps = init_parallel(ParallelConfig(tp=args.tp, pp=args.pp))
    try:
        model = build_model(meta.model, ps, dtype=getattr(torch, args.dtype))
        load_into_model(model, args.mcore_dir, meta.model, ps)
        length, mbs = max(len(s) for s in seqs), args.micro_batch_size
        rows = seqs + [[0]] * (-len(seqs) % mbs)
        tokens = torch.tensor([s + [0] * (length - len(s)) for s in rows])
        batches = [{"tokens": tokens[i:i + mbs]} for i in range(0, len(rows), mbs)]
        res = forward_logprobs(model, batches, ps, vocab_size=meta.model.vocab_size)
        logp = torch.cat([r["logp"] for r in res]).cpu()
        return [logp[i, :len(s) - 1].tolist() for i, s in enumerate(seqs)] if ps.rank == 0 \
            else None
    finally:
        destroy_parallel()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    seqs = read_tokens(args.tokens_file)
    result = score_hf(args.hf_dir, seqs) if args.hf_dir else score_mcore(args, seqs)
    if result is not None:
        Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
