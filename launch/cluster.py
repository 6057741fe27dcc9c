"""Where and how jobs are submitted, and how their state reads back: enums and typed records.

Pure data with validation (no nemo-run import), so the command line can reject a bad cluster
description instantly, before the slower nemo-run import; `launch.executors` turns these into
nemo-run objects.
"""

from __future__ import annotations

import dataclasses
import enum


class ExecutorKind(enum.Enum):
    LOCAL = "local"
    """This machine: the node script runs under nemo-run's LocalExecutor."""
    SLURM = "slurm"
    """A Slurm cluster through a tunnel."""


class TunnelKind(enum.Enum):
    LOCAL = "local"
    """sbatch is on this machine (a login node, or the test cluster)."""
    SSH = "ssh"
    """sbatch runs on a login node reached over SSH."""


class CodeSource(enum.Enum):
    INSTALLED = "installed"
    """Run the megatron-ace installed in the job's environment (container image or .venv)."""
    GIT = "git"
    """Ship the current git commit (nemo-run GitArchivePackager) and run from that copy."""


class JobState(enum.Enum):
    """A job's state as the launcher reports it (nemo-run / torchx AppState names)."""

    UNSUBMITTED = "UNSUBMITTED"
    SUBMITTED = "SUBMITTED"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobStatus:
    """One job of an experiment, as read back from nemo-run."""

    name: str
    """nemo-run task name (the job's name)."""
    state: JobState
    """Current state."""
    scheduler_id: str
    """Slurm job id (empty for local jobs)."""
    local_dir: str
    """Directory holding the job's script and logs on the submitting machine."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """Where and how Slurm jobs are submitted (unused by the local executor)."""

    account: str
    """Slurm account (`#SBATCH --account`)."""
    partition: str | None = None
    """Slurm partition (None: the cluster default)."""
    tunnel: TunnelKind = TunnelKind.LOCAL
    """How sbatch is reached."""
    host: str | None = None
    """SSH login host (SSH tunnel only)."""
    user: str | None = None
    """SSH user (SSH tunnel only)."""
    identity: str | None = None
    """SSH private key file (SSH tunnel only; None: agent or default keys)."""
    job_dir: str = ""
    """Directory for job scripts and logs on the cluster; must be "" for a LocalTunnel (nemo-run
    then uses NEMORUN_HOME, which sbatch can read) and an absolute path for SSH."""
    container_image: str | None = None
    """Container image run through pyxis (srun --container-image); None runs on the host."""
    mounts: tuple[str, ...] = ()
    """Container mounts `src:dst[:flags]` (pyxis --container-mounts)."""
    code: CodeSource = CodeSource.INSTALLED
    """Which copy of megatron-ace the job runs."""

    def __post_init__(self) -> None:
        if not self.account:
            raise ValueError("account must be non-empty (Slurm --account)")
        if self.tunnel is TunnelKind.SSH:
            if not self.host or not self.user:
                raise ValueError("an SSH tunnel needs host and user (--host, --user)")
            if not self.job_dir.startswith("/"):
                raise ValueError(
                    f"job_dir {self.job_dir!r}: an SSH tunnel needs an absolute job directory "
                    "on the cluster (--job-dir)"
                )
        elif self.job_dir:
            raise ValueError(
                f"job_dir {self.job_dir!r}: leave it empty with a local tunnel (nemo-run keeps "
                "jobs under NEMORUN_HOME; with a LocalTunnel job_dir, sbatch cannot find its script)"
            )
        for mount in self.mounts:
            if mount.count(":") not in (1, 2) or not mount.split(":")[0]:
                raise ValueError(f"mounts: {mount!r} is not src:dst[:flags]")
        if self.mounts and not self.container_image:
            raise ValueError("mounts need a container image (--container-image)")
