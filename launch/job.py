"""One trainer job, resolved and validated: resources, layout, and the shell script it runs.

`resolve_job(...)` merges a recipe's defaults with command-line choices and checks the parallel
layout against nodes x GPUs before anything is submitted; `render_script(job)` is the bash script
each node runs: one `python -m torch.distributed.run` per node, with the c10d rendezvous on the
first node of the allocation, starting `python -m megatron_ace.cli <command> --recipe ...`.

Pure string work: no nemo-run, no torch, no subprocesses (see `launch.executors` for submission).
"""

from __future__ import annotations

import dataclasses
import enum
import re
import shlex

from launch.recipes import Command, LaunchRecipe, ParallelLayout, RolloutPlacement

_TIME_RE = re.compile(r"^(\d+-)?\d{1,2}:\d{2}:\d{2}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Trainer overrides that set the layout; read so the launcher validates what will really run.
_LAYOUT_KEYS = {"parallel.tp": "tp", "parallel.pp": "pp"}


class Device(enum.Enum):
    """What a job's ranks run on."""

    GPU = "gpu"
    """One rank per GPU; Slurm is asked for the GPUs; NCCL."""
    CPU = "cpu"
    """`gpus_per_node` ranks per node on CPU (gloo); no GPU request (tests, small clusters)."""


# Environment every GPU job gets (each can be overridden with --env KEY=VALUE).
GPU_ENV: dict[str, str] = {
    # Megatron's TP/SP communication overlap relies on kernels being issued to the GPU in
    # program order, which a single hardware work queue guarantees.
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    # Abort the communicator and kill the rank when a collective fails or times out, so torchrun
    # and Slurm see a failure instead of a job that hangs until its time limit.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    # InfiniBand: a longer retry window (4.096us * 2^22 ~ 17 s) rides out link flaps on big
    # jobs instead of failing the whole run.
    "NCCL_IB_TIMEOUT": "22",
    "NCCL_DEBUG": "WARN",
    # Tokenizers' thread pool forks badly under torchrun workers and data-loader processes.
    "TOKENIZERS_PARALLELISM": "false",
}
CPU_ENV: dict[str, str] = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobSpec:
    """Everything needed to run one trainer job; validated on construction."""

    name: str
    """Job name (letters, digits, '-', '_'); also the Slurm job name suffix."""
    command: Command
    """Trainer subcommand."""
    trainer_recipe: str
    """Passed as `--recipe`."""
    out_dir: str
    """Passed as `--out`: where the trainer writes checkpoints and metrics.jsonl."""
    nodes: int
    """Number of nodes."""
    gpus_per_node: int
    """GPUs per node requested from Slurm (rollout GPUs included); ranks per node on CPU."""
    layout: ParallelLayout
    """Trainer parallel layout."""
    device: Device = Device.GPU
    """GPU (NCCL) or CPU (gloo) ranks."""
    rollout: RolloutPlacement = RolloutPlacement.COLOCATED
    """Where vLLM runs (GRPO)."""
    rollout_gpus: int = 0
    """GPUs per node reserved for vLLM when `rollout` is SEPARATE."""
    overrides: tuple[str, ...] = ()
    """Dotted trainer overrides, passed through after the recipe (e.g. `--optim.lr=1e-6`)."""
    python: str = "python"
    """Interpreter of the job's environment (the container's, or the main .venv's)."""
    workdir: str | None = None
    """Directory the job changes into first (None: where the executor starts it)."""
    rdzv_port: int = 29500
    """TCP port of the c10d rendezvous on the first node (multi-node jobs only)."""
    time: str = "04:00:00"
    """Slurm time limit."""
    env: tuple[tuple[str, str], ...] = ()
    """Extra environment (KEY, VALUE) pairs, applied over the defaults."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ValueError(f"name {self.name!r}: use letters, digits, '.', '-', '_'")
        if self.nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 1:
            raise ValueError(f"gpus_per_node must be >= 1, got {self.gpus_per_node}")
        if not self.out_dir:
            raise ValueError("out_dir must be non-empty")
        if not _TIME_RE.match(self.time):
            raise ValueError(f"time {self.time!r}: expected HH:MM:SS or D-HH:MM:SS")
        if not 1 <= self.rdzv_port <= 65535:
            raise ValueError(f"rdzv_port must be in 1..65535, got {self.rdzv_port}")
        for key, _ in self.env:
            if not _ENV_NAME_RE.match(key):
                raise ValueError(f"env: {key!r} is not a valid environment variable name")
        self._check_rollout()
        self.layout.data_parallel_size(
            nodes=self.nodes, trainer_gpus_per_node=self.trainer_gpus_per_node
        )

    def _check_rollout(self) -> None:
        if self.command is not Command.GRPO and (
            self.rollout is not RolloutPlacement.COLOCATED or self.rollout_gpus
        ):
            raise ValueError(
                f"rollout_gpus / rollout placement apply to GRPO jobs only, not {self.command.value}"
            )
        if self.rollout is RolloutPlacement.COLOCATED and self.rollout_gpus:
            raise ValueError(
                f"rollout_gpus={self.rollout_gpus} needs rollout placement 'separate' "
                "(colocated vLLM shares the trainer's GPUs)"
            )
        if self.rollout is RolloutPlacement.SEPARATE and not (
            1 <= self.rollout_gpus < self.gpus_per_node
        ):
            raise ValueError(
                f"rollout_gpus={self.rollout_gpus} must be between 1 and gpus_per_node - 1 = "
                f"{self.gpus_per_node - 1}: vLLM needs a GPU and the trainer needs at least one"
            )

    @property
    def trainer_gpus_per_node(self) -> int:
        """Ranks torchrun starts per node: the GPUs not reserved for vLLM."""
        return self.gpus_per_node - self.rollout_gpus

    @property
    def data_parallel_size(self) -> int:
        return self.layout.data_parallel_size(
            nodes=self.nodes, trainer_gpus_per_node=self.trainer_gpus_per_node
        )

    def environment(self) -> dict[str, str]:
        """Environment of the job: device defaults, then `env` on top."""
        base = dict(GPU_ENV if self.device is Device.GPU else CPU_ENV)
        base.update(dict(self.env))
        return base


def layout_from_overrides(default: ParallelLayout, overrides: list[str]) -> ParallelLayout:
    """The layout that will run: the recipe's, updated by `--parallel.tp=`/`--parallel.pp=` overrides."""
    values = {"tp": default.tp, "pp": default.pp}
    for item in overrides:
        key, sep, raw = item.removeprefix("--").partition("=")
        if key in _LAYOUT_KEYS:
            if not sep or not raw.strip().isdigit():
                raise ValueError(f"override {item!r}: {key} must be a positive integer")
            values[_LAYOUT_KEYS[key]] = int(raw)
    return ParallelLayout(**values)


def trainer_args(job: JobSpec) -> list[str]:
    """Arguments after `-m megatron_ace.cli`; the layout is always passed explicitly."""
    args = [job.command.value, "--recipe", job.trainer_recipe, "--out", job.out_dir]
    layout_given = {item.removeprefix("--").partition("=")[0] for item in job.overrides}
    for key, attr in _LAYOUT_KEYS.items():
        if key not in layout_given:
            args.append(f"--{key}={getattr(job.layout, attr)}")
    if job.rollout is RolloutPlacement.SEPARATE:
        args += [f"--rollout.placement={job.rollout.value}",
                 f"--rollout.gpus_per_node={job.rollout_gpus}"]
    args += list(job.overrides)
    return args


def torchrun_args(job: JobSpec) -> list[str]:
    """`torch.distributed.run` flags (shell words; $VARS expand on the node)."""
    args = [f"--nproc-per-node={job.trainer_gpus_per_node}", "--max-restarts=0"]
    if job.nodes == 1:
        # A free port on localhost: single-node jobs never collide with a neighbour's rendezvous.
        return ["--standalone", *args]
    return [
        f"--nnodes={job.nodes}",
        '--node-rank="${SLURM_NODEID:-0}"',
        "--rdzv-backend=c10d",
        f'--rdzv-endpoint="${{MASTER_ADDR}}:{job.rdzv_port}"',
        '--rdzv-id="${SLURM_JOB_ID:-' + job.name + '}"',
        *args,
    ]


def render_script(job: JobSpec) -> str:
    """The bash script every node runs (one copy per node, started by srun or locally)."""
    lines = [
        "set -euo pipefail",
        f"# {job.name}: {job.nodes} node(s) x {job.trainer_gpus_per_node} trainer rank(s)"
        f" = tp {job.layout.tp} x pp {job.layout.pp} x dp {job.data_parallel_size}"
        + (f"; {job.rollout_gpus} vLLM GPU(s) per node" if job.rollout_gpus else ""),
    ]
    if job.workdir:
        lines.append(f"cd {shlex.quote(job.workdir)}")
    if job.nodes > 1:
        # The first node of the allocation hosts the rendezvous. The batch script exports
        # MASTER_ADDR from its head-node lookup; srun's launch node is the same host otherwise.
        # `hostname --ip-address` lists every address of a multi-homed node: keep the first.
        lines.append('MASTER_ADDR="${MASTER_ADDR:-${SLURM_LAUNCH_NODE_IPADDR:?not in a Slurm job}}"')
        lines.append('export MASTER_ADDR="${MASTER_ADDR%% *}"')
    targs = [shlex.quote(a) for a in trainer_args(job)]
    segments = [
        f"{shlex.quote(job.python)} -m torch.distributed.run",
        *torchrun_args(job),
        "-m megatron_ace.cli " + " ".join(targs[:5]),  # command --recipe R --out DIR
        *targs[5:],
    ]
    lines.append("exec " + " \\\n    ".join(segments))
    return "\n".join(lines) + "\n"


def resolve_job(
    recipe: LaunchRecipe,
    *,
    name: str,
    out_dir: str,
    overrides: list[str],
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    rollout_gpus: int | None = None,
    **fields,
) -> JobSpec:
    """A JobSpec from a recipe's defaults plus command-line choices (None keeps the default)."""
    if rollout_gpus is None:
        placement, reserved = recipe.rollout, recipe.rollout_gpus
    else:
        placement = RolloutPlacement.SEPARATE if rollout_gpus > 0 else RolloutPlacement.COLOCATED
        reserved = rollout_gpus
    fields.setdefault("time", recipe.time)
    return JobSpec(
        name=name,
        command=recipe.command,
        trainer_recipe=recipe.trainer_recipe,
        out_dir=out_dir,
        nodes=recipe.nodes if nodes is None else nodes,
        gpus_per_node=recipe.gpus_per_node if gpus_per_node is None else gpus_per_node,
        layout=layout_from_overrides(recipe.layout, overrides),
        rollout=placement,
        rollout_gpus=reserved,
        overrides=tuple(overrides),
        **fields,
    )
