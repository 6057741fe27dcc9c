"""TP2, PP2 and DP2 training equal TP1 on the same data and weights (torchrun, gloo, float32).

DP2 runs twice: with torch AdamW and our reductions, and with megatron-core's DDP + optimizer.

Each layout starts from the same HF checkpoint (a random-init transformers Qwen2ForCausalLM),
trains 5 AdamW steps on the same global batches (4 rows with different numbers of loss tokens,
split into micro-batches and DP shards as the layout requires) and writes its loss curve and
its final weights gathered back to HF names. The test compares every layout with TP1.

This file is also the worker: `python -m torch.distributed.run ... test_sft_parallel.py ARGS`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

NUM_STEPS = 5
ROWS, SEQ = 4, 32
# TP splits matmuls and the vocab-parallel softmax (sums in another order, ~1e-6 relative on the
# logits), DP splits the gradient sum; 5 Adam steps amplify that. Measured (2026-11, CPU):
# loss rel. diff 0 / 0 / 9e-8 and weight abs. diff 7e-7 / 7e-9 / 1.2e-7 for TP2 / PP2 / DP2;
# the bounds leave ~10x margin (the largest single update is lr = 1e-3).
LOSS_RTOL = 1e-6
WEIGHT_ATOL = 5e-6
# tp, pp, nproc, optimizer backend ("mcore": megatron-core DDP + optimizer, CPU-patched)
LAYOUTS = {"tp1": (1, 1, 1, "torch"), "tp2": (2, 1, 2, "torch"), "pp2": (1, 2, 2, "torch"), "dp2": (1, 1, 2, "torch"),
           "dp2_mcore": (1, 1, 2, "mcore")}


def global_batch(step: int, vocab: int) -> list[dict]:
    """The 4 rows of step `step` (same on every rank and layout): fixed tokens, so the loss
    falls, and loss masks that change with the step."""
    import torch

    g = torch.Generator().manual_seed(1000)
    causal = ~torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    rows = []
    for i in range(ROWS):
        tokens = torch.randint(0, vocab, (1, SEQ), generator=g)
        mask = torch.zeros(1, SEQ)
        mask[0, SEQ - (2 + 9 * i + step):] = 1.0
        rows.append({"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": mask,
                     "position_ids": torch.arange(SEQ)[None], "attention_mask": causal[None, None]})
    return rows


def train_layout(tp: int, pp: int, backend: str, hf_dir: str, out: Path) -> None:
    """Train NUM_STEPS steps in layout (tp, pp) and write result.json + weights to `out`."""
    import torch
    from safetensors.torch import save_file

    from megatron_ace.model.config import Qwen2Config
    from megatron_ace.model.parallel import ParallelConfig, init_parallel
    from megatron_ace.model.weights import iter_hf_tensors
    from megatron_ace.train.config import OptimBackend, OptimConfig
    from megatron_ace.train.sft import build_trainer
    from megatron_ace.train.step import train_step

    # Re-initialising reuses the process group and rebuilds the TP/PP/DP groups.
    ps = init_parallel(ParallelConfig(tp=tp, pp=pp), seed=3)
    cfg = Qwen2Config.from_hf_config(hf_dir)
    optim = OptimConfig(lr=1e-3, warmup_steps=2, adam_eps=1e-6, weight_decay=0.01, clip_grad=1.0,
                        backend=OptimBackend(backend), distributed=False)
    trainer = build_trainer(cfg, ps, optim, total_steps=NUM_STEPS, dtype=torch.float32,
                            hf_path=hf_dir)
    losses, norms = [], []
    for step in range(NUM_STEPS):
        mine = global_batch(step, cfg.vocab_size)[ps.dp_rank::ps.dp_size]  # this DP shard
        m = train_step(trainer.opt, trainer.sched, mine, ps)
        losses.append(m.loss)
        norms.append(m.grad_norm)
    tensors = {}
    if ps.dp_rank == 0:
        tensors = {k: v.contiguous() for k, v in iter_hf_tensors(trainer.model, cfg, ps)}
    if ps.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / "weights.safetensors"))
        (out / "result.json").write_text(json.dumps({"losses": losses, "grad_norms": norms}))
    torch.distributed.barrier()


def worker(hf_dir: str, out: str, names: list[str]) -> None:
    from megatron_ace.model.parallel import destroy_parallel

    for name in names:
        tp, pp, _, backend = LAYOUTS[name]
        train_layout(tp, pp, backend, hf_dir, Path(out) / name)
    destroy_parallel()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    import torch
    from transformers import Qwen2Config as HFQwen2Config, Qwen2ForCausalLM

    from megatron_ace.model.config import preset

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf")
    model = Qwen2ForCausalLM(HFQwen2Config(**preset("tiny").to_hf_config()))
    model.save_pretrained(path, safe_serialization=True)
    return path


def _launch(out: Path, names: list[str], nproc: int, hf_dir: Path) -> None:
    from dist_utils import torchrun

    torchrun(Path(__file__), hf_dir, out, ",".join(names), nproc=nproc)


def _load(layout_dir: Path):
    from safetensors.torch import load_file

    return (json.loads((layout_dir / "result.json").read_text()),
            load_file(str(layout_dir / "weights.safetensors")))


@pytest.fixture(scope="module")
def runs(hf_dir, tmp_path_factory):
    """TP1 in one process, then every 2-process layout in one torchrun launch."""
    out = tmp_path_factory.mktemp("layouts")
    _launch(out, ["tp1"], 1, hf_dir)
    _launch(out, [n for n in LAYOUTS if n != "tp1"], 2, hf_dir)
    return out


@pytest.mark.dist
@pytest.mark.parametrize("layout", [n for n in LAYOUTS if n != "tp1"])
def test_layout_matches_tp1(layout, hf_dir, runs):
    import torch
    from safetensors.torch import load_file

    ref_result, ref_weights = _load(runs / "tp1")
    result, weights = _load(runs / layout)
    assert ref_result["losses"][-1] < ref_result["losses"][0]  # training moved
    for got, want in zip(result["losses"], ref_result["losses"]):
        assert got == pytest.approx(want, rel=LOSS_RTOL), (result, ref_result)
    for got, want in zip(result["grad_norms"], ref_result["grad_norms"]):
        assert got == pytest.approx(want, rel=1e-5)
    initial = load_file(str(next(hf_dir.glob("*.safetensors"))))
    assert set(weights) == set(ref_weights)
    moved = 0.0
    for name, want in ref_weights.items():
        torch.testing.assert_close(weights[name], want, atol=WEIGHT_ATOL, rtol=0)
        moved = max(moved, float((want - initial[name]).abs().max()))
    assert moved > 1e-3


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], sys.argv[3].split(","))
