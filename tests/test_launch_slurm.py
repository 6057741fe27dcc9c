"""Real Slurm: jobs submitted by `python -m launch.submit --executor slurm` (nemo-run
SlurmExecutor over a LocalTunnel) to a one-node cluster this module starts (tests/slurm_local.py)
and stops again.

Each outcome is checked twice: through the launcher (`python -m launch.status`, which reads
`Experiment.from_id(id).status(return_dict=True)`) and independently through Slurm's own
accounting (`sacct`). The job runs the real trainer command on 2 CPU ranks (gloo):
`python -m torch.distributed.run --nproc-per-node=2 -m megatron_ace.cli sft --recipe sft-tiny
--out DIR --parallel.tp=2` (capped at 30 steps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slurm_local  # noqa: E402  (the fixture module next to this file)

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[1]
# 30 steps are plenty for the loss to fall; skipping the HF export and event files saves time.
SHORT_RUN = ("--schedule.max_steps=30", "--checkpoint.export_hf=false",
             "--logging.tensorboard=false")


@pytest.fixture(scope="module")
def cluster():
    """The cluster, started here unless already running; stopped here only if started here."""
    already_up = all(pid is not None for pid in slurm_local.status().values())
    t0 = time.monotonic()
    c = slurm_local.start()
    sys.stderr.write(f"\n[slurm] cluster ready in {time.monotonic() - t0:.1f}s "
                     f"({'reused' if already_up else 'started'})\n")
    try:
        yield c
    finally:
        if not already_up:
            slurm_local.stop()
            assert all(pid is None for pid in slurm_local.status().values())


@pytest.fixture(scope="module")
def launch_env(cluster, tmp_path_factory):
    subprocess.run(["bash", str(REPO / "scripts" / "setup_launch_env.sh")], check=True)
    home = tmp_path_factory.mktemp("nemorun-home")
    env = {**os.environ, **cluster.env(), "NEMORUN_HOME": str(home)}
    return str(REPO / ".venv-launch" / "bin" / "python"), env


def _start(launch_env, *args: str) -> subprocess.Popen:
    """Submit with --wait in the background (the submission command ends when the jobs end)."""
    python, env = launch_env
    return subprocess.Popen(
        [python, "-m", "launch.submit", *args[:1], "--executor", "slurm", "--tunnel", "local",
         "--device", "cpu", "--account", "ace", "--partition", "debug", "--time", "00:10:00",
         "--wait", "--wait-timeout", "480", *args[1:]],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, t0: float, what: str) -> tuple[int, dict, list[dict]]:
    """(exit status, submission record, one record per job) of a `_start`ed submission."""
    stdout, stderr = proc.communicate(timeout=600)
    sys.stderr.write(f"[slurm] {what}: {time.monotonic() - t0:.1f}s\n")
    lines = [json.loads(l) for l in stdout.splitlines() if l.startswith("{")]
    assert lines, f"no submission record\nstdout:\n{stdout}\nstderr:\n{stderr}"
    return proc.returncode, lines[0], lines[1:]


def _submit(launch_env, *args: str) -> tuple[int, dict, list[dict]]:
    return _finish(_start(launch_env, *args), time.monotonic(), " ".join(args[:3]))


@pytest.fixture(scope="module")
def failing_runs(launch_env, tmp_path_factory):
    """A failing SFT job and a failing-first-stage curriculum, submitted at the same time (the
    node has room for both) to halve the wall time."""
    out = tmp_path_factory.mktemp("failing")
    t0 = time.monotonic()
    procs = {
        "sft": _start(launch_env, "sft", "--recipe", "sft-tiny", "--out", str(out / "bad"),
                      "--", "--no_such_section.field=1"),
        "curriculum": _start(launch_env, "curriculum", "--recipe", "tiny", "--out",
                             str(out / "cur"), "--", "--no_such_section.field=1"),
    }
    return {name: _finish(proc, t0, f"failing {name}") for name, proc in procs.items()}


def _launcher_states(launch_env, exp_id: str) -> dict[str, str]:
    python, env = launch_env
    out = subprocess.run([python, "-m", "launch.status", exp_id], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    return {r["job"]: r["state"] for r in map(json.loads, out.stdout.splitlines())}


def _sacct(cluster, job_id: str) -> tuple[str, list[str]]:
    """(State of the allocation, ids of the steps that ran), from Slurm's own accounting."""
    out = subprocess.run(["sacct", "-n", "-P", "-j", job_id, "-o", "JobID,State"],
                         env={**os.environ, **cluster.env()}, capture_output=True, text=True,
                         check=True)
    rows = [line.split("|") for line in out.stdout.strip().splitlines()]
    state = next(st for jid, st in rows if jid == job_id)
    return state.split()[0], [jid for jid, _ in rows if jid != job_id]


def _job_log(record: dict) -> str:
    logs = sorted(Path(record["dir"]).glob("*.out"))
    return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs)


def test_sft_job_succeeds_and_its_loss_goes_down(cluster, launch_env, tmp_path):
    out_dir = tmp_path / "sft"
    rc, sub, jobs = _submit(launch_env, "sft", "--recipe", "sft-tiny", "--out", str(out_dir),
                            "--", "--parallel.tp=2", *SHORT_RUN)
    assert [j["state"] for j in jobs] == ["SUCCEEDED"], _job_log(jobs[0])
    assert rc == 0
    assert _launcher_states(launch_env, sub["experiment"]) == {"sft-tiny": "SUCCEEDED"}
    assert _sacct(cluster, jobs[0]["scheduler_id"])[0] == "COMPLETED"
    records = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r and "step" in r]
    assert len(losses) >= 2, records
    assert losses[-1] < losses[0], losses


def test_failing_job_is_reported_failed(cluster, launch_env, failing_runs):
    rc, sub, jobs = failing_runs["sft"]
    assert rc == 1
    assert [j["state"] for j in jobs] == ["FAILED"]
    assert _launcher_states(launch_env, sub["experiment"]) == {"sft-tiny": "FAILED"}
    assert _sacct(cluster, jobs[0]["scheduler_id"])[0] == "FAILED"


def test_curriculum_stage_runs_only_after_its_predecessor_succeeded(cluster, launch_env,
                                                                    failing_runs):
    # Stage 1 fails; stage 2 was submitted with --dependency=afterok:<stage 1>, so Slurm must
    # never start it (and --kill-on-invalid-dep cancels it instead of leaving it pending).
    rc, sub, jobs = failing_runs["curriculum"]
    assert rc == 1
    assert [j["job"] for j in jobs] == ["s1-grpo-tiny", "s2-grpo-tiny"]
    first, second = jobs
    deadline = time.monotonic() + 60
    while _sacct(cluster, second["scheduler_id"])[0] == "PENDING" and time.monotonic() < deadline:
        time.sleep(1)
    assert _sacct(cluster, first["scheduler_id"])[0] == "FAILED"
    state, steps = _sacct(cluster, second["scheduler_id"])
    assert state == "CANCELLED" and steps == [], (state, steps)  # never started a batch step
    assert _launcher_states(launch_env, sub["experiment"]) == {
        "s1-grpo-tiny": "FAILED", "s2-grpo-tiny": "CANCELLED"}
