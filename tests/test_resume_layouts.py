"""Resume at another TP / PP / DP layout continues the run, and the checkpoint is megatron-core's.

`ace sft` (sft-tiny, 6 steps, checkpoints at steps 3 and 6, float32, gloo on CPU) runs straight
through at TP2, and at DP2 with megatron-core's DistributedOptimizer (state saved fully
reshardable); then from their step-3 checkpoints at TP1 and PP2 (from TP2) and DP1 (from DP2).
Steps 4-6 of a resumed run must match the original run's: the lr and the data (number of loss
tokens, i.e. the sampler position) exactly, the loss within 1e-5 relative. Why that tolerance:
the layouts compute the same math in another order (TP splits matmuls and the vocab-parallel
softmax, DP splits the gradient sum), which moves the loss by ~1e-7 relative per step (seen:
7e-8 at step 4, 0 to 3e-8 after; 2026-12, CPU); three Adam steps amplify it, and 1e-5 leaves
two orders of magnitude. Then a separate script loads the TP2 run's checkpoint with
megatron-core's own `dist_checkpointing.load` into a freshly built GPTModel (no megatron-ace
model or checkpoint code) and its logits must equal HF transformers' on an HF export of the
same checkpoint (1e-4: two float32 implementations of the same model).

All 2-process runs share one torchrun launch and the 1-process runs one process
(tests/workers/layout_resume_worker.py): start-up dominates on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_utils import REPO, free_port, torchrun

NUM_STEPS, SAVE_AT = 6, 3
LOSS_RTOL = 1e-5
WORKER = REPO / "tests" / "workers" / "layout_resume_worker.py"
COMMON = [f"schedule.max_steps={NUM_STEPS}", f"checkpoint.save_interval={SAVE_AT}",
          "checkpoint.keep_last=5", "arith.num_samples=600", "logging.progress_bar=false",
          "logging.tensorboard=false", "checkpoint.export_hf=false"]
DIST_OPT = ["optim.backend=mcore", "optim.distributed=true"]
# resumed run -> (original run, its overrides)
RESUMES = {"tp1": ("tp2", []), "pp2": ("tp2", ["parallel.pp=2"]), "dp1": ("dp2", DIST_OPT)}


def _ckpt(root: Path, run: str, step: int) -> Path:
    return root / run / "checkpoints" / f"step_{step:08d}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    env = {"ACE_CACHE_DIR": str(root / "cache"), "ACE_LOG_LEVEL": "WARNING"}

    def job(name, overrides, resume_from=None):
        return {"out": str(root / name), "overrides": COMMON + overrides,
                "resume_from": str(_ckpt(root, resume_from, SAVE_AT)) if resume_from else None}

    two = [job("tp2", ["parallel.tp=2"]), job("dp2", DIST_OPT),
           job("pp2", RESUMES["pp2"][1], resume_from="tp2")]
    one = [job("tp1", RESUMES["tp1"][1], resume_from="tp2"),
           job("dp1", RESUMES["dp1"][1], resume_from="dp2")]
    (root / "two.json").write_text(json.dumps(two))
    (root / "one.json").write_text(json.dumps(one))
    torchrun(WORKER, root / "two.json", nproc=2, env=env)
    proc = subprocess.run([sys.executable, str(WORKER), str(root / "one.json")],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env})
    assert proc.returncode == 0, proc.stderr[-6000:]
    return root


def _metrics(run_dir: Path) -> dict[int, dict]:
    from megatron_ace.train.metrics import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


@pytest.mark.dist
@pytest.mark.numerics
@pytest.mark.parametrize("resumed", sorted(RESUMES))
def test_resumed_at_another_layout_continues_the_curve(runs, resumed):
    from megatron_ace.train.state import read_meta

    original = RESUMES[resumed][0]
    want, got = _metrics(runs / original), _metrics(runs / resumed)
    assert sorted(want) == list(range(1, NUM_STEPS + 1))
    assert sorted(got) == list(range(SAVE_AT + 1, NUM_STEPS + 1))  # continued, not restarted
    assert want[NUM_STEPS]["loss"] < want[1]["loss"]
    for step in got:
        assert got[step]["lr"] == want[step]["lr"], step
        assert got[step]["num_loss_tokens"] == want[step]["num_loss_tokens"], step
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=LOSS_RTOL), step
    saved, final = read_meta(_ckpt(runs, original, SAVE_AT)), read_meta(_ckpt(runs, resumed, NUM_STEPS))
    assert saved["layout"] != final["layout"]
    assert final["data_state"]["consumed"] == read_meta(_ckpt(runs, original, NUM_STEPS))[
        "data_state"]["consumed"]


@pytest.mark.dist
def test_checkpoint_loads_with_megatron_core_into_a_fresh_model(runs, tmp_path):
    import torch

    from megatron_ace.checkpoint.convert import mcore_to_hf

    ckpt = _ckpt(runs, "tp2", NUM_STEPS)
    hf = mcore_to_hf(ckpt, tmp_path / "hf")
    out = tmp_path / "logits.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "workers" / "mcore_load_check.py"), str(ckpt),
         str(hf), str(out), str(free_port())], capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    logits = json.loads(out.read_text())
    mcore, ref = torch.tensor(logits["mcore"]), torch.tensor(logits["hf"])
    assert mcore.shape == ref.shape and ref.abs().max() > 0.1
    torch.testing.assert_close(mcore, ref, atol=1e-4, rtol=0)


# ---- GRPO -----------------------------------------------------------------------------------
# `ace grpo` (real vLLM engine, math-verify) at TP2 for 4 steps with a checkpoint at step 2, then
# from that checkpoint at another layout. Step 3's rollouts come from the very weights of the
# checkpoint (per-request seeds), so rewards must be equal; the policy loss then differs only
# by the layouts' float rounding (same bound as SFT). Slow (each case starts vLLM in two runs,
# ~2-3 minutes on 2 cores): `make test-slow`, or
#     PYTHONPATH=. .venv/bin/python -m pytest -q -m slow tests/test_resume_layouts.py -k grpo
GRPO_STEPS, GRPO_SAVE_AT = 4, 2
GRPO_RESUMES = {"tp1": ("tp2", 1, []), "pp2": ("tp2", 2, ["parallel.pp=2"]),
                "dp1": ("dp2", 1, [])}
GRPO_ORIGINALS = {"tp2": ["parallel.tp=2"], "dp2": []}


@pytest.fixture(scope="module")
def grpo_inputs(tmp_path_factory):
    import torch
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2ForCausalLM

    from megatron_ace.data import tiny_tokenizer as tt
    from megatron_ace.model.config import preset

    root = tmp_path_factory.mktemp("grpo-layouts")
    hf_dir = root / "policy"
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=tt.VOCAB_SIZE, eos_token_id=tt.IM_END_ID)
    Qwen2ForCausalLM(HFConfig(**cfg.to_hf_config())).float().save_pretrained(hf_dir)
    tt.build_tiny_tokenizer(hf_dir)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Compute {i}-{i - 1}.", "answer": "1"}) + "\n"
                               for i in range(1, 25)))
    return {"root": root, "hf": hf_dir, "prompts": prompts, "runs": {}}


def _grpo(inputs, name: str, nproc: int, overrides: list[str], resume_from: Path | None = None):
    import shutil

    out = inputs["root"] / name
    if resume_from is not None:
        shutil.copytree(resume_from, out / "checkpoints" / resume_from.name)
    cli = ["-m", "megatron_ace.cli", "grpo", "--recipe", "grpo-tiny", "--out", str(out),
           f"model.hf_path={inputs['hf']}", f"data.tokenizer={inputs['hf']}",
           f"data.train_path={inputs['prompts']}", "data.heldout_path=", f"steps={GRPO_STEPS}",
           f"checkpoint.save_interval={GRPO_SAVE_AT}", "checkpoint.keep_last=5",
           "checkpoint.export_hf=false", "rollout.prompts_per_step=8", "rollout.group_size=4",
           "rollout.max_response_tokens=12", "grpo.overlong_filter=false",
           "grpo.drop_zero_variance_groups=false", "grpo.micro_batch_size=8", "optim.lr=1e-3",
           "optim.min_lr=1e-3", "eval.at_start=false", "logging.progress_bar=false",
           "logging.tensorboard=false", *overrides]
    cmd = [sys.executable, *cli] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}", *cli]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-6000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    return {r["step"]: r for r in records if "reward/mean" in r}  # the step records, not evals


def _grpo_case(inputs, resumed: str) -> tuple[dict, dict]:
    original, nproc, overrides = GRPO_RESUMES[resumed]
    runs = inputs["runs"]
    if original not in runs:
        runs[original] = _grpo(inputs, original, 2, GRPO_ORIGINALS[original])
    ckpt = inputs["root"] / original / "checkpoints" / f"step_{GRPO_SAVE_AT:08d}"
    return runs[original], _grpo(inputs, resumed, nproc, overrides, resume_from=ckpt)


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.dist
@pytest.mark.numerics
@pytest.mark.parametrize("resumed", sorted(GRPO_RESUMES))
def test_grpo_resumed_at_another_layout_continues(grpo_inputs, resumed):
    want, got = _grpo_case(grpo_inputs, resumed)
    assert sorted(want) == list(range(1, GRPO_STEPS + 1))
    assert sorted(got) == list(range(GRPO_SAVE_AT + 1, GRPO_STEPS + 1))
    assert any(want[s]["update/grad_norm"] > 0 for s in got)
    for step in got:
        for key in ("reward/mean", "rollout/response_length", "temperature/used", "update/lr",
                    "update/tokens"):
            assert got[step][key] == want[step][key], (step, key, got[step][key], want[step][key])
        assert got[step]["update/loss"] == pytest.approx(want[step]["update/loss"], rel=LOSS_RTOL,
                                                         abs=1e-7), step
