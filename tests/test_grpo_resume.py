"""Exact resume of a GRPO curriculum killed with SIGKILL, against the uninterrupted run.

Real components end to end: Megatron-Core policy (fp32, CPU), the real vLLM engine with
per-request seeds, math-verify rewards. The tiny curriculum (4 stages: 3 + 3 + 3 + up to 4
steps, checkpoints every 2 steps and at each stage end) runs twice from the same random tiny
Qwen2: once straight through, once killed after steps 5 (mid-stage: replays from step 4),
7 (first step of the code stage; the newest checkpoint is then damaged, so the resume falls
back to the previous one and replays across a stage boundary and the optimizer reset),
8 (mid code stage with prompts removed) and 9 (the code stage's last step: resumes from a
finished stage into the next). The default run kills after step 7 only (its resume from step 4
is mid-stage, as kill 5's is); all four kills run with the slow checks.
Each restart is the very same command. Tolerance: exact equality of every non-timing metric:
on one CPU in fp32 with fixed thread counts the computation is deterministic, so any
difference is a resume bug, not noise.
"""

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from dist_utils import REPO

from megatron_ace.train.metrics import read_metrics

KILLS = (5, 7, 8, 9)
RESUMED_FROM = {5: "4", 7: "4", 8: "8", 9: "9"}  # kill 7: step 6 is damaged, so back to 4
TIMING_PREFIXES = ("time", "sync/")


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2ForCausalLM

    from megatron_ace.data import tiny_tokenizer as tt
    from megatron_ace.model.config import preset

    root = tmp_path_factory.mktemp("curriculum")
    cfg = preset("tiny", vocab_size=tt.VOCAB_SIZE, eos_token_id=tt.IM_END_ID)
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        hf_dir = root / f"policy{seed}"
        Qwen2ForCausalLM(HFConfig(**cfg.to_hf_config())).float().save_pretrained(hf_dir)
        tt.build_tiny_tokenizer(hf_dir)
        dirs.append(hf_dir)
    # A random policy ends its answers with "1" often enough for reward variance; 12 prompts
    # make an epoch every 1.5 steps, so the code stage removes solved prompts.
    rows = [{"prompt": f"Compute {i}-{i - 1}.", "answer": "1"} for i in range(1, 13)]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, dirs, prompts


def _command(hf_dir, prompts, out, extra=()):
    overrides = [
        f"model.hf_path={hf_dir}", f"data.tokenizer={hf_dir}", f"data.train_path={prompts}",
        f"data.heldout_path={prompts}", "eval.max_problems=4", "eval.max_response_tokens=8",
        "logging.progress_bar=false", "logging.tensorboard=false", "checkpoint.export_hf=false",
        "optim.lr=1e-3", "optim.min_lr=1e-3", "grpo.micro_batch_size=16",
        "stage.math-short.max_response_tokens=8", "stage.math-long.max_response_tokens=12",
        "stage.code.max_response_tokens=12", "stage.math-final.max_response_tokens=12",
        "stage.code.solved_min_accuracy=0.25", *extra,
    ]
    return [sys.executable, "-m", "megatron_ace.cli", "curriculum", "--recipe", "tiny-curriculum",
            "--out", str(out), *overrides]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
       "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
       "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _run(cmd, timeout=300):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=REPO,
                          check=False)


def _comparable(record):
    return {k: v for k, v in record.items() if not k.startswith(TIMING_PREFIXES)}


def _same(a, b):
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _adam_steps(ckpt):
    """AdamW's step count as stored in the torch_dist checkpoint (read by megatron-core)."""
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    meta = json.loads((ckpt / "meta.json").read_text())
    if not meta["optimizer"]["saved"]:
        return 0
    return int(load_common_state_dict(ckpt)["optimizer"]["num_steps"])


@pytest.mark.vllm
@pytest.mark.numerics
@pytest.mark.parametrize("kills", [(7,), pytest.param(KILLS, marks=pytest.mark.slow)],
                         ids=["kill7", "kills4"])
def test_killed_curriculum_resumes_step_for_step(tiny_policy, tmp_path, kills):
    _, (hf_dir, other_hf), prompts = tiny_policy
    straight_out, killed_out = tmp_path / "straight", tmp_path / "killed"
    started = time.perf_counter()
    # Uninterrupted reference, with every checkpoint kept (save cadence is not fingerprinted).
    straight = subprocess.Popen(
        _command(hf_dir, prompts, straight_out,
                 ["checkpoint.save_interval=1", "checkpoint.keep_last=50"]),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=REPO)
    try:
        cmd = _command(hf_dir, prompts, killed_out) + [
            a for k in kills for a in ("--kill-after-step", str(k))]
        resumed_lines = []
        for attempt in range(len(kills) + 1):
            proc = _run(cmd)
            resumed_lines += [ln for ln in proc.stderr.splitlines() if "resumed at step" in ln]
            if attempt < len(kills):
                assert proc.returncode == -9, proc.stderr[-4000:]
            else:
                assert proc.returncode == 0, proc.stderr[-4000:]
            if attempt < len(kills) and kills[attempt] == 7:
                # Killed after step 7: damage the newest checkpoint (step 6) ...
                ckpts = sorted((killed_out / "checkpoints").glob("step_*"))
                assert [c.name for c in ckpts] == ["step_00000004", "step_00000006"]
                shard = next(ckpts[-1].glob("*.distcp"))
                shard.write_bytes(shard.read_bytes()[:1000])
                # ... and leave a half-written one behind, as a kill during a save does.
                half = killed_out / "checkpoints" / ".tmp-step_00000008"
                half.mkdir()
                (half / "__0_0.distcp").write_bytes(b"\0" * 100)
        out, _ = straight.communicate(timeout=300)
        assert straight.returncode == 0, out[-4000:]
    finally:
        if straight.poll() is None:
            straight.kill()
            straight.wait()
    wall = time.perf_counter() - started

    assert [ln.split("resumed at step ")[1].split(":")[0] for ln in resumed_lines] == [
        RESUMED_FROM[k] for k in kills], resumed_lines
    assert (killed_out / "checkpoints" / ".corrupt-step_00000006").is_dir()

    ref, got = read_metrics(straight_out / "metrics.jsonl"), read_metrics(killed_out / "metrics.jsonl")
    assert sorted(ref) == sorted(got) == list(range(1, max(ref) + 1))
    for step in sorted(ref):
        a, b = _comparable(ref[step]), _comparable(got[step])
        assert a.keys() == b.keys(), (step, a.keys() ^ b.keys())
        diff = {k: (a[k], b[k]) for k in a if not _same(a[k], b[k])}
        assert not diff, f"step {step}: {diff}"
    stages = [ref[s]["stage"] for s in sorted(ref)]
    assert stages == sorted(stages) and set(stages) == {0, 1, 2, 3}, stages
    # The code stage really removed prompts, and the run resumed with them removed.
    assert max(r["prompts/removed"] for r in ref.values() if r["stage_name"] == "code") > 0
    assert ref[9]["prompts/removed"] > 0
    summary = json.loads((straight_out / "curriculum_summary.json").read_text())
    print(f"\nresume equivalence: {len(ref)} steps identical across {len(kills)} kills "
          f"({wall:.0f} s wall, both runs)")
    for step in sorted(ref):
        r = ref[step]
        print(f"  step {step:2d} {r['stage_name']:<10} reward {r['reward/mean']:.4f} "
              f"loss {r.get('update/loss', float('nan')):+.6f} len {r['rollout/response_length']:.3f} "
              f"T {r['temperature/used']:.4f} H {r['temperature/entropy_measured']:.5f} "
              f"removed {int(r['prompts/removed'])}")
    assert [s["name"] for s in summary["stages"]] == ["math-short", "math-long", "code", "math-final"]

    # The entropy-target controller steers toward its target in the curriculum: every step of
    # an entropy-target stage moves the temperature in the direction of target - smoothed
    # entropy (unless clamped), and the measured entropy falls toward the target overall.
    steered = [ref[s] for s in sorted(ref) if "temperature/entropy_target" in ref[s]]
    assert steered
    for r in steered:
        error = r["temperature/entropy_target"] - r["temperature/entropy_smoothed"]
        move = r["temperature/temperature"] - r["temperature/used"]
        assert move * error > 0 or r["temperature/temperature"] in (0.1, 1.5), r
    assert steered[-1]["temperature/entropy_measured"] < steered[0]["temperature/entropy_measured"]

    # Optimizer carried within and across stages, and reset where the code stage says so:
    # AdamW's step counter at every checkpoint = updates applied since the last reset.
    expected, count = {}, 0
    for step in sorted(ref):
        if ref[step].get("stage/first_step") and ref[step]["stage_name"] == "code":
            count = 0
        count += 0 if ref[step].get("update/skipped") else 1
        expected[step] = count
    for step, count in expected.items():
        assert _adam_steps(straight_out / "checkpoints" / f"step_{step:08d}") == count, step

    # Resuming with another initial model (or other changed inputs) is refused, by field.
    proc = _run(_command(other_hf, prompts, killed_out))
    assert proc.returncode != 0
    assert "cannot resume" in proc.stderr and "model.hf_path" in proc.stderr, proc.stderr[-3000:]
