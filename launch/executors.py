"""nemo-run plumbing: executors for each backend, experiments of chained jobs, dry runs, state.

- `build_executor(kind, job, cluster)`: a nemo-run executor for one job (registry by
  `ExecutorKind`): LOCAL runs the node script on this machine; SLURM submits it with sbatch through
  a tunnel (SSH to a login node, or a LocalTunnel when sbatch is local).
- `experiment(title, jobs, ...)` / `submit(...)`: one experiment; with `chain=True` each job depends on the
  previous one, which Slurm enforces with `sbatch --dependency=afterok:<previous job id>`.
- `render_dryrun(...)`: the sbatch scripts nemo-run would submit, without a cluster.
- `job_statuses(exp_id)`: typed job states read back with `Experiment.from_id(...).status()`.

Runs in the light launcher environment: imports nemo-run, never torch.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nemo_run as run

from launch.cluster import (ClusterConfig, CodeSource, ExecutorKind, JobState, JobStatus,
                            TunnelKind)
from launch.job import Device, JobSpec, render_script


def _local_executor(job: JobSpec, cluster: ClusterConfig | None) -> run.Executor:
    if job.nodes != 1:
        raise ValueError(f"nodes={job.nodes}: the local executor runs on this machine only (1 node)")
    return run.LocalExecutor(ntasks_per_node=1, env_vars=job.environment())


def _tunnel(cluster: ClusterConfig) -> run.SSHTunnel | run.LocalTunnel:
    if cluster.tunnel is TunnelKind.SSH:
        return run.SSHTunnel(host=cluster.host, user=cluster.user, job_dir=cluster.job_dir,
                             identity=cluster.identity)
    return run.LocalTunnel(job_dir=cluster.job_dir)


def _slurm_executor(job: JobSpec, cluster: ClusterConfig | None) -> run.Executor:
    if cluster is None:
        raise ValueError("the Slurm executor needs a ClusterConfig (account, tunnel, ...)")
    if not cluster.container_image:
        # Without a container nemo-run rewrites every "/nemo_run" in the batch script to the job
        # directory (the container path of it), mangling a job directory that contains it.
        base = cluster.job_dir or run.config.get_nemorun_home()
        if f"/{run.config.RUNDIR_NAME}" in base:
            raise ValueError(
                f"job directory {base!r} contains '/{run.config.RUNDIR_NAME}', which nemo-run "
                "rewrites in non-container jobs; use another NEMORUN_HOME / --job-dir")
    gpu = job.device is Device.GPU
    packager = run.GitArchivePackager() if cluster.code is CodeSource.GIT else run.Packager()
    return run.SlurmExecutor(
        account=cluster.account,
        partition=cluster.partition,
        nodes=job.nodes,
        # One torchrun per node; torchrun starts the ranks.
        ntasks_per_node=1,
        gpus_per_node=job.gpus_per_node if gpu else None,
        exclusive=True if gpu else None,
        time=job.time,
        container_image=cluster.container_image,
        container_mounts=list(cluster.mounts),
        env_vars=job.environment(),
        # `head_node_ip` is computed by nemo-run's batch script; exporting it makes the first node
        # of the allocation the rendezvous host of every node's torchrun.
        setup_lines="export MASTER_ADDR=${head_node_ip}" if job.nodes > 1 else None,
        tunnel=_tunnel(cluster),
        packager=packager,
        job_name_prefix="ace.",
        # A stage whose predecessor failed is cancelled instead of pending forever.
        additional_parameters={"kill_on_invalid_dep": "yes"},
        poll_estimated_start_time=False,
    )


ExecutorBuilder = Callable[[JobSpec, "ClusterConfig | None"], run.Executor]
EXECUTORS: dict[ExecutorKind, ExecutorBuilder] = {
    ExecutorKind.LOCAL: _local_executor,
    ExecutorKind.SLURM: _slurm_executor,
}


def build_executor(kind: ExecutorKind, job: JobSpec, cluster: ClusterConfig | None) -> run.Executor:
    return EXECUTORS[kind](job, cluster)


@contextlib.contextmanager
def experiment(
    title: str, jobs: list[JobSpec], *, kind: ExecutorKind, cluster: ClusterConfig | None,
    chain: bool,
) -> Iterator[run.Experiment]:
    """An open experiment holding `jobs`; with `chain`, job i+1 starts only after job i succeeded.

    Leaving the block waits for jobs that were run without detaching (the local executor)."""
    # clean_mode: nemo-run's console output would interleave with this CLI's JSON lines.
    exp = run.Experiment(title, log_level="WARNING", clean_mode=True,
                         enable_goodbye_message=False, skip_status_at_exit=True)
    with exp:
        previous: str | None = None
        for job in jobs:
            script = run.Script(inline=render_script(job))
            deps = [previous] if (chain and previous) else None
            previous = exp.add(script, executor=build_executor(kind, job, cluster),
                               name=job.name, dependencies=deps)
        yield exp


def render_dryrun(
    title: str, jobs: list[JobSpec], *, kind: ExecutorKind, cluster: ClusterConfig | None,
    chain: bool,
) -> str:
    """What would be submitted: each job's sbatch script (Slurm) or node script (local)."""
    if kind is ExecutorKind.LOCAL:
        parts = []
        for job in jobs:
            env = "".join(f"export {k}={v}\n" for k, v in job.environment().items())
            parts.append(f"# ---- job {job.name} (local) ----\n{env}{render_script(job)}")
        return "\n".join(parts)
    # nemo-run renders into its home; use a scratch home so a dry run leaves nothing behind.
    scratch = tempfile.mkdtemp(prefix="ace-dryrun-")
    saved_home = run.config.get_nemorun_home()
    run.config.set_nemorun_home(scratch)
    try:
        with experiment(title, jobs, kind=kind, cluster=cluster, chain=chain) as exp:
            exp.dryrun(log=False, delete_exp_dir=False)
            parts = []
            for i, (job, task) in enumerate(zip(jobs, exp.jobs)):
                sbatch = Path(exp._exp_dir, f"{task.id}_sbatch.sh").read_text()
                node_script = Path(task.executor.job_dir, "scripts", f"{task.id}.sh")
                header = f"# ==== job {job.name}: sbatch script ===="
                if chain and i > 0:
                    header += (f"\n# submitted with: sbatch --dependency=afterok:<job id of "
                               f"{jobs[i - 1].name}>")
                parts.append(f"{header}\n{sbatch}")
                if node_script.exists():
                    parts.append(f"# ==== job {job.name}: node script ({node_script.name}) ====\n"
                                 f"{node_script.read_text()}")
        # Show the paths a real submission would use, not the scratch directory.
        return "\n".join(parts).replace(scratch, saved_home)
    finally:
        run.config.set_nemorun_home(saved_home)
        shutil.rmtree(scratch, ignore_errors=True)


def submit(
    title: str, jobs: list[JobSpec], *, kind: ExecutorKind, cluster: ClusterConfig | None,
    chain: bool,
) -> str:
    """Launch the jobs and return the experiment id. Slurm: returns once sbatch accepted every
    job; local: returns when the job has ended."""
    with experiment(title, jobs, kind=kind, cluster=cluster, chain=chain) as exp:
        exp.run(detach=kind is ExecutorKind.SLURM)
    return exp._id


def job_statuses(exp_id: str) -> list[JobStatus]:
    """Current state of every job of experiment `exp_id` (asks Slurm through sacct)."""
    exp = run.Experiment.from_id(exp_id)
    raw = exp.status(return_dict=True) or {}
    statuses = []
    for task in exp.jobs:
        info = raw.get(task.id, {})
        state = getattr(info.get("status"), "name", str(info.get("status", "UNKNOWN")))
        statuses.append(JobStatus(
            name=task.id,
            state=JobState[state] if state in JobState.__members__ else JobState.UNKNOWN,
            scheduler_id=str(info.get("job_id", "")),
            local_dir=str(info.get("local_dir", "")),
        ))
    return statuses


def wait(exp_id: str, *, timeout_s: float, poll_s: float = 3.0) -> list[JobStatus]:
    """Poll until every job is terminal (a failed job makes its dependants never start: those are
    reported as they stand once the failure is seen) or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = job_statuses(exp_id)
        done = all(s.state.terminal for s in statuses)
        failed = any(s.state in (JobState.FAILED, JobState.CANCELLED) for s in statuses)
        if done or failed or time.monotonic() > deadline:
            return statuses
        time.sleep(poll_s)
