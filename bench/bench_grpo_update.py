"""The trainer side of one GRPO step at a recipe-shaped length distribution: packed vs padded.

Synthetic rollouts shaped like an AceReason step, scaled to a CPU: `--prompts` x `--group`
rollouts (default 16 x 16 = 256), prompt lengths uniform in [64, 256], response lengths
log-normal with median `--median` (256) and sigma `--sigma` (0.9), capped at `--cap` (2,048),
rewards drawn per rollout (so some groups have no reward variance and are only measured).
Each layout runs in a fresh process on the same rollouts from the same initial weights (a
small Qwen2, vocabulary 4,096, float32): `train_on_rollouts` as `ace grpo` calls it (the
strictly on-policy default: one forward/backward for the kept rollouts, a forward-only pass for
the others), after one warm-up step on a slice of the rollouts.

- packed: micro-batches of at most `--max-tokens` positions (THD rows, SDPA core attention);
- padded: `--micro-batch-size` rollouts per micro-batch, each padded to the step's longest
  (the layout before packing), sized so one micro-batch holds about as many positions.

Reported per layout: real (prompt + response) positions per second of the whole trainer side,
the real-token share of the micro-batches, the process's peak RSS, and the loss (the same in
both, a check that they computed the same thing). The ratio packed / padded is the figure to
read; the goal is >= 2.5x with a real-token share >= 0.9.

    python bench/bench_grpo_update.py --out bench/out/grpo_update.json
    python bench/bench_grpo_update.py --prompts 4 --group 8 --cap 512 --out /tmp/u.json  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any directory
    sys.path.insert(0, str(REPO))

LAYOUTS = ("packed", "padded")


def make_rollouts(args, vocab: int):
    """The step's rollouts and keep mask, the same for every layout (seeded)."""
    import torch

    from megatron_ace.algorithms.grpo import (
        AdvantageEstimator,
        compute_advantages_B,
        zero_variance_filter_B,
    )
    from megatron_ace.train.grpo_batch import Rollouts

    g = torch.Generator().manual_seed(args.seed)
    prompts, responses, logps = [], [], []
    mu = float(torch.tensor(float(args.median)).log())
    for _ in range(args.prompts):
        prompt = torch.randint(3, vocab, (int(torch.randint(64, 257, (1,), generator=g)),),
                               generator=g).tolist()
        for _ in range(args.group):
            n = int(torch.empty(1).log_normal_(mu, args.sigma, generator=g).clamp(1, args.cap))
            prompts.append(prompt)
            responses.append(torch.randint(3, vocab, (n,), generator=g).tolist())
            logps.append((-torch.rand(n, generator=g) * 2).tolist())
    rewards = (torch.rand(len(responses), generator=g) < 0.5).float()
    adv = compute_advantages_B(AdvantageEstimator.GRPO, rewards, args.group).float()
    truncated = torch.tensor([len(r) >= args.cap for r in responses])
    rollouts = Rollouts(prompts=prompts, responses=responses, adv_B=adv, loss_on_B=~truncated,
                        engine_logp=logps)
    return rollouts, zero_variance_filter_B(rewards, args.group)


def _subset(rollouts, keep, rows):
    import torch

    from megatron_ace.train.grpo_batch import Rollouts

    pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
    return Rollouts(prompts=pick(rollouts.prompts), responses=pick(rollouts.responses),
                    adv_B=rollouts.adv_B[rows], loss_on_B=rollouts.loss_on_B[rows],
                    engine_logp=pick(rollouts.engine_logp)), keep[torch.tensor(rows)]


def make_trainer(model, cfg, ps, dtype):
    """A Trainer over `model` with torch AdamW (lr 1e-6, clip 1), as the GRPO loop holds it."""
    import torch

    from megatron_ace.train.config import LRDecay, OptimBackend, OptimConfig
    from megatron_ace.train.optim import LRSchedule, TorchAdamW
    from megatron_ace.train.sft import Trainer

    optim = OptimConfig(lr=1e-6, min_lr=1e-6, decay=LRDecay.CONSTANT, warmup_steps=0,
                        weight_decay=0.0, clip_grad=1.0, backend=OptimBackend.TORCH)
    # TorchAdamW directly: bf16 weights are fine for a throughput check (the trainer itself
    # asks for fp32 master weights, i.e. the megatron-core optimizer, in bf16).
    return Trainer(model_cfg=cfg, ps=ps, opt=TorchAdamW([model], optim, ps),
                   sched=LRSchedule(cfg=optim, total_steps=4), dtype=dtype)


def time_update(trainer, rollouts, keep, *, layout_name: str, max_tokens: int,
                micro_batch_size: int, warmup_rows: int, sync=lambda: None) -> dict:
    """Warm up on the first `warmup_rows` rollouts, then time the trainer side of one step."""
    from megatron_ace.algorithms.grpo import PolicyLossConfig
    from megatron_ace.data.packing import AttentionFormat, BatchMode
    from megatron_ace.train import grpo_batch
    from megatron_ace.train.grpo_update import UpdateSettings, train_on_rollouts

    layout = grpo_batch.LayoutConfig(mode=BatchMode(layout_name), max_tokens=max_tokens,
                                     micro_batch_size=micro_batch_size,
                                     attention=AttentionFormat.THD, pad_id=0)
    settings = UpdateSettings(loss=PolicyLossConfig(clip_low=0.2, clip_high=0.28),
                              num_updates=1, fuse_old_logprobs=True, layout=layout,
                              temperature=1.0, vocab_size=trainer.model_cfg.vocab_size)
    train_on_rollouts(trainer, *_subset(rollouts, keep, list(range(warmup_rows))), settings)
    sync()
    start = time.perf_counter()
    metrics = train_on_rollouts(trainer, rollouts, keep, settings)
    sync()
    seconds = time.perf_counter() - start
    real = rollouts.real_positions()
    return {"layout": layout_name, "seconds": seconds, "real_positions": real,
            "tokens_per_s": real / seconds,
            "real_token_share": metrics["update/real_token_share"],
            "loss": metrics.get("update/loss"), "entropy": metrics.get("rollout/entropy"),
            "num_rollouts": len(rollouts), "num_kept": int(keep.sum())}


def run_layout(args) -> dict:
    """One layout in this process (CPU, float32): the timed trainer side of one step."""
    import torch

    from megatron_ace.model.builder import build_model
    from megatron_ace.model.config import preset
    from megatron_ace.model.parallel import ParallelConfig, init_parallel

    torch.set_num_threads(args.threads)
    cfg = preset("tiny", vocab_size=4096, hidden_size=256, intermediate_size=704,
                 num_layers=4, num_attention_heads=4, num_query_groups=2,
                 max_position_embeddings=4096)
    ps = init_parallel(ParallelConfig(), seed=0)
    model = build_model(cfg, ps)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.dim() > 1 else 0.1)
                    + (1.0 if p.dim() == 1 and "norm" in name else 0.0))
    trainer = make_trainer(model, cfg, ps, torch.float32)
    rollouts, keep = make_rollouts(args, cfg.vocab_size)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = time_update(trainer, rollouts, keep, layout_name=args.child,
                         max_tokens=args.max_tokens, micro_batch_size=args.micro_batch_size,
                         warmup_rows=min(2 * args.group, len(rollouts)))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["rss_before_mb"] = rss_start
    return result


def _child(args, layout: str, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", layout, "--child-out", str(out)]
    for name in ("prompts", "group", "median", "sigma", "cap", "max_tokens",
                 "micro_batch_size", "seed", "threads"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{layout} run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--group", type=int, default=16, help="rollouts per prompt")
    p.add_argument("--median", type=int, default=256, help="median response length")
    p.add_argument("--sigma", type=float, default=0.9, help="log-normal sigma of lengths")
    p.add_argument("--cap", type=int, default=2048, help="response length cap")
    p.add_argument("--max-tokens", type=int, default=8192,
                   help="packed: positions per micro-batch")
    p.add_argument("--micro-batch-size", type=int, default=4,
                   help="padded: rollouts per micro-batch (default 4: about as many positions "
                        "as a packed micro-batch at the default cap)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--out", type=Path, default=Path("bench_grpo_update.json"))
    p.add_argument("--child", choices=LAYOUTS, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.child_out.write_text(json.dumps(run_layout(args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="ace-bench-update-") as tmp:
        runs = {layout: _child(args, layout, Path(tmp) / f"{layout}.json") for layout in LAYOUTS}
    packed, padded = runs["packed"], runs["padded"]
    result = {
        "packed_tokens_per_s": packed["tokens_per_s"],
        "padded_tokens_per_s": padded["tokens_per_s"],
        "speedup": packed["tokens_per_s"] / padded["tokens_per_s"],
        "packed_real_token_share": packed["real_token_share"],
        "padded_real_token_share": padded["real_token_share"],
        "packed_peak_rss_mb": packed["peak_rss_mb"],
        "padded_peak_rss_mb": padded["peak_rss_mb"],
        "goal": {"speedup_at_least": 2.5, "packed_share_at_least": 0.9},
        "runs": runs,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "child",
                                                                       "child_out")},
        "load_average": os.getloadavg(),
    }
    result["goal_met"] = result["speedup"] >= 2.5 and packed["real_token_share"] >= 0.9
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| layout | real tok/s | real-token share | peak RSS MB | s | loss |",
             "|---|---|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['real_token_share']:.3f} | "
                     f"{r['peak_rss_mb']:,.0f} | {r['seconds']:.1f} | {r['loss']:.6g} |")
    lines.append(f"\npacked / padded: {result['speedup']:.2f}x "
                 f"(goal >= 2.5x, packed share >= 0.9: "
                 f"{'met' if result['goal_met'] else 'NOT met'}); "
                 f"{packed['num_rollouts']} rollouts, {packed['real_positions']:,} real positions")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
