"""A run killed with SIGKILL and resumed reproduces the uninterrupted run's losses exactly.

Both runs are `ace sft --recipe sft-tiny` subprocesses on the CPU in float32 with one thread.
The interrupted run is killed as soon as its metrics show a step past the first checkpoint,
so the resumed run must restore weights, AdamW moments, the lr schedule, the data position
and the RNGs, and replay the steps after the checkpoint. Every step's loss, lr and grad norm
must be bit-identical to the uninterrupted run. Then `checkpoint.resume=never` on that directory
is refused before any set-up, by SFT, GRPO and a curriculum alike, and nothing in it changes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dist_utils import REPO

NUM_STEPS = 30
SAVE_INTERVAL = 10
KILL_AFTER_STEP = 13


def _cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "megatron_ace.cli", "sft", "--recipe", "sft-tiny", "--out", str(out),
            f"schedule.max_steps={NUM_STEPS}", f"checkpoint.save_interval={SAVE_INTERVAL}",
            "arith.num_samples=600", "logging.progress_bar=false", "logging.tensorboard=false",
            "checkpoint.export_hf=false"]


# A single-process init_parallel earlier in this pytest process leaves these set; a child that
# inherited MASTER_PORT would try to listen on a port that may still be held.
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
            "ACE_CACHE_DIR": str(cache), "ACE_LOG_LEVEL": "WARNING"}


def _run_ok(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _metrics(out: Path) -> dict[int, dict]:
    from megatron_ace.train.metrics import read_metrics

    return read_metrics(out / "metrics.jsonl")


def _last_step(path: Path) -> int:
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except json.JSONDecodeError:  # a line being written
        return 0


def _run_and_kill(out: Path, env: dict[str, str]) -> int:
    """Start a run, SIGKILL it once a step after KILL_AFTER_STEP is logged; return that step."""
    proc = subprocess.Popen(_cmd(out), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while _last_step(out / "metrics.jsonl") < KILL_AFTER_STEP:
            if proc.poll() is not None:
                raise AssertionError(f"run ended before it could be killed:\n{proc.stderr.read()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("run did not reach the kill step in time")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return _last_step(out / "metrics.jsonl")


@pytest.mark.numerics
def test_sigkill_and_resume_reproduces_losses_exactly(tmp_path):
    from megatron_ace.train.state import list_checkpoints

    env = _env(tmp_path / "cache")
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    _run_ok(_cmd(straight), env)

    killed_at = _run_and_kill(broken, env)
    saved = [step for step, _ in list_checkpoints(broken / "checkpoints")]
    # Under load the kill can land a few steps late; it must land before the end of the run.
    assert saved and max(saved) <= killed_at < NUM_STEPS, (saved, killed_at)
    _run_ok(_cmd(broken), env)

    want, got = _metrics(straight), _metrics(broken)
    assert sorted(got) == sorted(want) == list(range(1, NUM_STEPS + 1))
    for step in range(1, NUM_STEPS + 1):
        for key in ("loss", "lr", "grad_norm", "num_loss_tokens", "epoch"):
            assert got[step][key] == want[step][key], (step, key, got[step], want[step])
    assert want[NUM_STEPS]["loss"] < 0.8 * want[1]["loss"]
    # Old checkpoints are pruned to keep_last (2 in the recipe); the final one is complete.
    final = [step for step, _ in list_checkpoints(broken / "checkpoints")]
    assert final[-1] == NUM_STEPS and len(final) <= 2

    # checkpoint.resume=never on a directory with checkpoints: refused before any set-up, and
    # nothing is touched (SFT from the command line, GRPO and a curriculum in this process).
    before = sorted(p.name for p in (broken / "checkpoints").iterdir())
    again = subprocess.run(_cmd(broken) + ["--resume", "never"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 2, again.stderr[-2000:]
    assert "ace sft: error:" in again.stderr and "checkpoint.resume=never" in again.stderr
    assert "Traceback" not in again.stderr
    _assert_refused_by_grpo_and_curriculum(broken)
    assert sorted(p.name for p in (broken / "checkpoints").iterdir()) == before
    assert sorted(_metrics(broken)) == list(range(1, NUM_STEPS + 1))


def _assert_refused_by_grpo_and_curriculum(out: Path) -> None:
    from megatron_ace.train.config import ResumeMode
    from megatron_ace.train.curriculum import run_curriculum
    from megatron_ace.train.curriculum_config import curriculum_recipe
    from megatron_ace.train.grpo import run_grpo
    from megatron_ace.train.grpo_config import recipe

    grpo = recipe("grpo-tiny")
    grpo.checkpoint.resume = ResumeMode.NEVER
    with pytest.raises(ValueError, match="holds checkpoints but checkpoint.resume=never"):
        run_grpo(grpo, out)
    curriculum = curriculum_recipe("tiny-curriculum")
    curriculum.base.checkpoint.resume = ResumeMode.NEVER
    with pytest.raises(ValueError, match="holds checkpoints but checkpoint.resume=never"):
        run_curriculum(curriculum, out)
