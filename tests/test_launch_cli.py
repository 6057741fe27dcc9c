"""`python -m launch.submit` as users run it: in the light launcher environment (.venv-launch,
created by scripts/setup_launch_env.sh), with nemo-run rendering the real sbatch scripts.

No cluster is needed: --dryrun renders what would be submitted, and bad layouts must fail
before anything is submitted.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def launch_python() -> str:
    subprocess.run(["bash", str(REPO / "scripts" / "setup_launch_env.sh")], check=True)
    return str(REPO / ".venv-launch" / "bin" / "python")


def _submit(launch_python, *args, tmp_path, check=True, timeout=120):
    env = {**os.environ, "NEMORUN_HOME": str(tmp_path / "nemo_run")}
    env.pop("SLURM_CONF", None)
    out = subprocess.run([launch_python, "-m", "launch.submit", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, out.stderr
    return out


MULTI_NODE = ["sft", "--recipe", "acereason-sft-7b", "--executor", "slurm", "--nodes", "2",
              "--gpus-per-node", "8", "--account", "acct", "--partition", "batch",
              "--time", "04:00:00", "--container-image", "/img/ace.sqsh",
              "--mounts", "/lustre:/lustre", "--out", "/lustre/runs/sft"]


def test_launcher_environment_has_no_torch(launch_python):
    out = subprocess.run([launch_python, "-c", "import nemo_run, importlib.util as u; "
                          "print(u.find_spec('torch') is None)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_help_lists_commands_and_recipes(launch_python, tmp_path):
    out = _submit(launch_python, "--help", tmp_path=tmp_path)
    for word in ("sft", "grpo", "curriculum", "--rollout-gpus", "--container-image",
                 "acereason-sft-7b", "acereason-1.1", "--dryrun"):
        assert word in out.stdout


def test_multi_node_slurm_dryrun_renders_sbatch_and_node_script(launch_python, tmp_path):
    out = _submit(launch_python, *MULTI_NODE, "--dryrun", "--", "--optim.lr=1e-5",
                  tmp_path=tmp_path).stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --account=acct", "#SBATCH --partition=batch", "#SBATCH --time=04:00:00",
                 "export CUDA_DEVICE_MAX_CONNECTIONS=1", "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
                 "export MASTER_ADDR=${head_node_ip}"):
        assert line in out, line
    srun = next(l for l in out.splitlines() if l.startswith("srun ") and "--container-image" in l)
    assert "--container-image /img/ace.sqsh" in srun and "/lustre:/lustre" in srun
    assert "--nnodes=2" in out and "--rdzv-backend=c10d" in out and "--nproc-per-node=8" in out
    assert "-m megatron_ace.cli sft --recipe acereason-sft-7b --out /lustre/runs/sft" in out
    assert "--parallel.tp=4" in out and "--optim.lr=1e-5" in out
    # A dry run leaves no experiment behind.
    assert not (tmp_path / "nemo_run" / "experiments").exists() or not any(
        (tmp_path / "nemo_run" / "experiments").rglob("*_sbatch.sh"))


def test_curriculum_dryrun_chains_stages(launch_python, tmp_path):
    out = _submit(launch_python, "curriculum", "--recipe", "acereason-1.1", "--executor", "slurm",
                  "--account", "acct", "--container-image", "/img/ace.sqsh", "--out", "/r",
                  "--dryrun", tmp_path=tmp_path).stdout
    stages = re.findall(r"^# ==== job (s\d-[\w.-]+): sbatch script", out, flags=re.M)
    assert stages == ["s1-acereason-math-8k", "s2-acereason-math-16k", "s3-acereason-math-24k",
                      "s4-acereason-math-32k", "s5-acereason-code-24k", "s6-acereason-code-32k",
                      "s7-acereason-math-32k-final"]
    assert out.count("--dependency=afterok:") == 6
    assert out.count("--model.hf_path=") == 6
    assert "--model.hf_path=/r/s1-acereason-math-8k/hf" in out
    assert "--model.hf_path=/r/s6-acereason-code-32k/hf" in out


@pytest.mark.parametrize("extra,message", [
    (["--", "--parallel.tp=3"], "parallel.tp=3"),
    (["--nodes", "3", "--", "--parallel.pp=2", "--parallel.tp=8"], "parallel.pp"),
    (["--rollout-gpus", "2"], "GRPO"),
    (["--time", "4h"], "time"),
])
def test_bad_layout_fails_before_submitting(launch_python, tmp_path, extra, message):
    out = _submit(launch_python, *MULTI_NODE, *extra, tmp_path=tmp_path, check=False)
    assert out.returncode == 2
    assert message in out.stderr
    assert not (tmp_path / "nemo_run" / "experiments").exists()


def test_slurm_arguments_are_checked(launch_python, tmp_path):
    base = ["sft", "--recipe", "sft-tiny", "--executor", "slurm", "--dryrun"]
    cases = [([], "--account"),
             (["--account", "a", "--tunnel", "ssh", "--host", "h", "--user", "u"], "job_dir"),
             (["--account", "a", "--job-dir", "/x"], "LocalTunnel"),
             (["--account", "a", "--mounts", "/a:/b"], "container image")]
    for extra, message in cases:
        out = _submit(launch_python, *base, *extra, tmp_path=tmp_path, check=False)
        assert out.returncode == 2 and message in out.stderr, (extra, out.stderr)


def test_grpo_rollout_gpus_reserve_gpus_for_vllm(launch_python, tmp_path):
    out = _submit(launch_python, "grpo", "--recipe", "acereason-math-8k", "--executor", "slurm",
                  "--account", "a", "--nodes", "2", "--gpus-per-node", "8", "--rollout-gpus", "4",
                  "--container-image", "/i", "--out", "/r", "--dryrun", tmp_path=tmp_path).stdout
    assert "#SBATCH --gpus-per-node=8" in out and "--nproc-per-node=4" in out
    assert "--rollout.placement=separate" in out and "--rollout.gpus_per_node=4" in out
    bad = _submit(launch_python, "grpo", "--recipe", "acereason-math-8k", "--executor", "slurm",
                  "--account", "a", "--rollout-gpus", "8", "--out", "/r", "--dryrun",
                  tmp_path=tmp_path, check=False)
    assert bad.returncode == 2 and "rollout_gpus=8" in bad.stderr


def test_local_dryrun_prints_the_node_script(launch_python, tmp_path):
    out = _submit(launch_python, "sft", "--recipe", "sft-tiny", "--device", "cpu", "--out", "/o",
                  "--dryrun", tmp_path=tmp_path).stdout
    assert "--standalone" in out and "--nproc-per-node=2" in out
    assert "export OMP_NUM_THREADS=1" in out and "CUDA_DEVICE_MAX_CONNECTIONS" not in out


@pytest.mark.slow
@pytest.mark.dist
def test_local_executor_runs_two_rank_sft_and_reports_success(launch_python, tmp_path):
    """nemo-run's LocalExecutor runs the node script here: torchrun, 2 gloo ranks, real trainer."""
    out_dir = tmp_path / "sft"
    out = _submit(launch_python, "sft", "--recipe", "sft-tiny", "--executor", "local",
                  "--device", "cpu", "--out", str(out_dir), "--wait", "--", "--parallel.tp=2",
                  "--schedule.max_steps=30", "--checkpoint.export_hf=false",
                  "--logging.tensorboard=false", tmp_path=tmp_path, check=False, timeout=600)
    records = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
    assert [r.get("state") for r in records[1:]] == ["SUCCEEDED"], out.stdout + out.stderr
    assert out.returncode == 0
    metrics = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m and "step" in m]
    assert len(losses) >= 2 and losses[-1] < losses[0], losses


def test_ssh_tunnel_dryrun_renders_remote_paths_without_connecting(launch_python, tmp_path):
    out = _submit(launch_python, "sft", "--recipe", "acereason-sft-7b", "--executor", "slurm",
                  "--tunnel", "ssh", "--host", "login.invalid", "--user", "me",
                  "--job-dir", "/lustre/me/jobs", "--account", "a", "--code", "installed",
                  "--container-image", "/i.sqsh", "--out", "/lustre/o", "--dryrun",
                  tmp_path=tmp_path).stdout
    assert re.search(r"^#SBATCH --output=/lustre/me/jobs/ace-sft-acereason-sft-7b/", out, re.M)
    assert "/lustre/me/jobs/ace-sft-acereason-sft-7b/" in out and ":/nemo_run " in out
