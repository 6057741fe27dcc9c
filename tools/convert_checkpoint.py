"""Convert Qwen2 checkpoints between HF safetensors and megatron-core torch_dist checkpoints.

  hf-to-mcore  --hf-dir H --out M [--tp T --pp P] [--rope-theta X]
  mcore-to-hf  --mcore-dir M --out H2 [--max-shard-gb G]
  relayout     --mcore-dir M --out M2 [--tp T --pp P]

M is megatron-core's distributed checkpoint format (`torch_dist`, what Megatron-LM,
Megatron-Bridge and NeMo-RL read and write): it loads into a model at any TP/PP with
`megatron.core.dist_checkpointing.load`, and `ace sft` / `ace grpo` start from it with
`model.mcore_path=M`. --tp / --pp only choose how the tensors are chunked on disk.
`--mcore-dir` also takes a training checkpoint (`<run>/checkpoints/step_*`): its model is
exported, the optimizer state left out. The previous release's safetensors-per-rank layout is
still read; `relayout` rewrites it as torch_dist.

Conversion streams one tensor at a time (memory ~ one layer) and never casts dtypes;
HF -> Megatron -> HF is bit-identical. Outputs are committed atomically: an existing output
directory is replaced only by a complete new one.
"""

from __future__ import annotations

import argparse
import sys

from megatron_ace.checkpoint import convert


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF directory -> torch_dist checkpoint")
    a.add_argument("--hf-dir", required=True, help="HF model directory (config.json, *.safetensors)")
    a.add_argument("--out", required=True, help="output torch_dist checkpoint directory")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel chunking on disk")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel size recorded")
    a.add_argument("--rope-theta", type=float, default=None, help="override rope_theta")
    b = sub.add_parser("mcore-to-hf", help="Megatron checkpoint -> HF safetensors directory")
    b.add_argument("--mcore-dir", required=True,
                   help="torch_dist (or previous-format) model checkpoint, or a training checkpoint")
    b.add_argument("--out", required=True)
    b.add_argument("--max-shard-gb", type=float, default=5.0, help="HF shard size limit")
    c = sub.add_parser("relayout", help="Megatron checkpoint -> torch_dist at another chunking "
                                        "(also upgrades the previous safetensors-per-rank layout)")
    c.add_argument("--mcore-dir", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--tp", type=int, default=1)
    c.add_argument("--pp", type=int, default=1)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "hf-to-mcore":
            convert.hf_to_mcore(args.hf_dir, args.out, tp=args.tp, pp=args.pp,
                                rope_theta=args.rope_theta)
        elif args.cmd == "mcore-to-hf":
            convert.mcore_to_hf(args.mcore_dir, args.out, int(args.max_shard_gb * 2**30))
        else:
            convert.relayout(args.mcore_dir, args.out, tp=args.tp, pp=args.pp)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
