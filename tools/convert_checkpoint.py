"""Convert Qwen2 checkpoints between HF safetensors and the megatron-ace Megatron layout.

  hf-to-mcore  --hf-dir H --out M --tp T --pp P [--rope-theta X] [--spec local|te]
  mcore-to-hf  --mcore-dir M --out H2 [--max-shard-gb G]
  relayout     --mcore-dir M --out M2 --tp T --pp P [--spec local|te]

Conversion streams one tensor at a time (memory ~ one layer) and never casts dtypes;
HF -> Megatron -> HF is bit-identical. Outputs are committed atomically.
"""

from __future__ import annotations

import argparse
import sys

from megatron_ace.checkpoint import convert
from megatron_ace.model.mapping import Spec


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF directory -> Megatron checkpoint at TP/PP")
    a.add_argument("--hf-dir", required=True, help="HF model directory (config.json, *.safetensors)")
    a.add_argument("--out", required=True, help="output Megatron checkpoint directory")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    a.add_argument("--rope-theta", type=float, default=None, help="override rope_theta")
    a.add_argument("--spec", choices=[s.value for s in Spec], default="local",
                   help="layer spec the parameter names follow (te on GPU with TE)")
    b = sub.add_parser("mcore-to-hf", help="Megatron checkpoint -> HF safetensors directory")
    b.add_argument("--mcore-dir", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--max-shard-gb", type=float, default=5.0, help="HF shard size limit")
    c = sub.add_parser("relayout", help="Megatron checkpoint -> another TP/PP layout")
    c.add_argument("--mcore-dir", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--tp", type=int, default=1)
    c.add_argument("--pp", type=int, default=1)
    c.add_argument("--spec", choices=[s.value for s in Spec], default=None)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "hf-to-mcore":
            convert.hf_to_mcore(args.hf_dir, args.out, tp=args.tp, pp=args.pp,
                                rope_theta=args.rope_theta, spec=Spec(args.spec))
        elif args.cmd == "mcore-to-hf":
            convert.mcore_to_hf(args.mcore_dir, args.out, int(args.max_shard_gb * 2**30))
        else:
            convert.relayout(args.mcore_dir, args.out, tp=args.tp, pp=args.pp,
                             spec=None if args.spec is None else Spec(args.spec))
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
