"""`python -m launch.submit {sft,grpo,curriculum}`: submit trainer jobs with nemo-run.

One command per job kind. A job runs one `python -m torch.distributed.run` per node, which starts
`python -m megatron_ace.cli <sft|grpo> --recipe NAME --out DIR [overrides]` on every rank. The
parallel layout comes from the recipe table (launch/recipes.py) and trainer overrides
(`-- --parallel.tp=4`); it is checked against nodes x GPUs before anything is submitted. A
curriculum submits one job per stage, each depending on the previous one (afterok).

Runs in the light launcher environment (.venv-launch: nemo-run, no torch). Exit status: 0 when
submitted (or, with --wait, when every job SUCCEEDED), 1 when a job failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from launch.cluster import ClusterConfig, CodeSource, ExecutorKind, JobState, TunnelKind
from launch.job import Device, JobSpec, resolve_job
from launch.recipes import CURRICULA, RECIPES, Command, get_curriculum, get_recipe

REPO = Path(__file__).resolve().parents[1]

EPILOG = """\
examples:
  # 2 nodes x 8 GPUs of SFT on Slurm from a login node, in the project container:
  python -m launch.submit sft --recipe acereason-sft-7b --executor slurm --nodes 2 --gpus-per-node 8 \\
      --account my_acct --partition batch --time 04:00:00 \\
      --container-image /shared/images/megatron-ace.sqsh --mounts /lustre:/lustre \\
      --out /lustre/runs/sft-7b -- --optim.lr=1e-5

  # the same through SSH from a laptop, shipping the current git commit:
  python -m launch.submit sft --recipe acereason-sft-7b --executor slurm --tunnel ssh --host login.example \\
      --user me --job-dir /lustre/me/nemo-jobs --account my_acct ... --dryrun

  # the whole GRPO length curriculum, one dependent job per stage:
  python -m launch.submit curriculum --recipe acereason-1.1 --executor slurm --account my_acct \\
      --container-image IMG --out /lustre/runs/rl

  # two CPU ranks on this machine:
  python -m launch.submit sft --recipe sft-tiny --executor local --device cpu -- --train.steps=5

Everything after `--` is passed to the trainer as dotted overrides.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.submit", description=__doc__.split("\n\n")[0],
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["sft", "grpo", "curriculum"], help="what to run")
    p.add_argument("--recipe", required=True, help=(
        f"recipe (sft/grpo: {', '.join(sorted(RECIPES))}; curriculum: {', '.join(sorted(CURRICULA))})"))
    p.add_argument("--executor", choices=["local", "slurm"], default="local",
                   help="local: torchrun on this machine; slurm: sbatch through a tunnel")
    p.add_argument("--dryrun", action="store_true",
                   help="print the sbatch (or local) scripts instead of submitting")
    p.add_argument("--wait", action="store_true",
                   help="after submitting, wait until every job ends; exit 1 unless all SUCCEEDED")
    p.add_argument("--wait-timeout", type=float, default=24 * 3600.0, metavar="S",
                   help="give up waiting after S seconds (default: one day)")
    r = p.add_argument_group("resources (default: the recipe's)")
    r.add_argument("--nodes", type=int, help="number of nodes")
    r.add_argument("--gpus-per-node", type=int, metavar="G",
                   help="GPUs per node (rollout GPUs included); ranks per node with --device cpu")
    r.add_argument("--rollout-gpus", type=int, metavar="K", help=(
        "GRPO: GPUs per node reserved for the vLLM rollout engine (0: colocated on the trainer's GPUs)"))
    r.add_argument("--time", help="Slurm time limit, HH:MM:SS or D-HH:MM:SS")
    r.add_argument("--device", choices=[d.value for d in Device], default="gpu",
                   help="gpu (NCCL, asks Slurm for GPUs) or cpu (gloo, no GPU request)")
    s = p.add_argument_group("Slurm")
    s.add_argument("--account", help="Slurm account (required with --executor slurm)")
    s.add_argument("--partition", help="Slurm partition")
    s.add_argument("--container-image", metavar="IMG", help="run in this image through pyxis")
    s.add_argument("--mounts", action="append", default=[], metavar="SRC:DST",
                   help="container mount (repeatable, or comma-separated)")
    s.add_argument("--tunnel", choices=["local", "ssh"], default="local",
                   help="local: sbatch on this machine; ssh: on --host over SSH")
    s.add_argument("--host", help="SSH login host")
    s.add_argument("--user", help="SSH user")
    s.add_argument("--identity", help="SSH private key")
    s.add_argument("--job-dir", default="", metavar="D",
                   help="job scripts and logs on the cluster (SSH only; must be absolute)")
    s.add_argument("--code", choices=["installed", "git"],
                   help="installed: the job environment's megatron-ace (default, except over SSH); "
                        "git: ship the current git commit")
    j = p.add_argument_group("job")
    j.add_argument("--out", help="trainer output directory (default: runs/<name>-<time> here; "
                                 "required when the job does not see this filesystem)")
    j.add_argument("--name", help="experiment name (default: ace-<kind>-<recipe>)")
    j.add_argument("--python", help="interpreter of the job (default: the container's python, "
                                    "else this checkout's .venv when the job runs here)")
    j.add_argument("--workdir", help="directory the job starts in")
    j.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra job environment (repeatable)")
    j.add_argument("--rdzv-port", type=int, default=29500, help="c10d rendezvous port (multi-node)")
    return p


def _split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def _cluster(args: argparse.Namespace):
    if not args.account:
        raise ValueError("--account is required with --executor slurm")
    tunnel = TunnelKind(args.tunnel)
    code = args.code or ("git" if tunnel is TunnelKind.SSH else "installed")
    mounts = tuple(m for item in args.mounts for m in item.split(",") if m)
    return ClusterConfig(
        account=args.account, partition=args.partition, tunnel=tunnel, host=args.host,
        user=args.user, identity=args.identity, job_dir=args.job_dir,
        container_image=args.container_image, mounts=mounts, code=CodeSource(code))


def _jobs(args: argparse.Namespace, overrides: list[str], *, out: str, python: str,
          workdir: str | None) -> tuple[list[JobSpec], bool]:
    env = []
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--env {item!r}: expected KEY=VALUE")
        env.append((key, value))
    common = dict(nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                  rollout_gpus=args.rollout_gpus, device=Device(args.device), python=python,
                  workdir=workdir, rdzv_port=args.rdzv_port, env=tuple(env))
    if args.time:
        common["time"] = args.time
    if args.kind != "curriculum":
        recipe = get_recipe(args.recipe, command=Command(args.kind))
        return [resolve_job(recipe, name=recipe.name, out_dir=out, overrides=overrides,
                            **common)], False
    curriculum = get_curriculum(args.recipe)
    jobs: list[JobSpec] = []
    for i, stage in enumerate(curriculum.stages, start=1):
        stage_out = f"{out.rstrip('/')}/s{i}-{stage}"
        stage_overrides = list(overrides)
        if jobs:
            previous = f"{jobs[-1].out_dir}/{curriculum.init_subdir}"
            stage_overrides.append(f"--{curriculum.init_override}={previous}")
        jobs.append(resolve_job(get_recipe(stage), name=f"s{i}-{stage}", out_dir=stage_out,
                                overrides=stage_overrides, **common))
    return jobs, True


def _default_workdir(kind, cluster) -> str | None:
    """This checkout, when the job runs the installed package on this machine's filesystem
    (so relative paths in overrides mean the same as here); otherwise where the executor starts."""
    if kind is ExecutorKind.LOCAL:
        return str(REPO)
    if (cluster.tunnel is TunnelKind.LOCAL and not cluster.container_image
            and cluster.code is CodeSource.INSTALLED):
        return str(REPO)
    return None


def _default_python(kind: ExecutorKind, cluster: ClusterConfig | None) -> str:
    """The job's interpreter: the container's `python`, else this checkout's .venv when the job
    runs on this machine's filesystem, else `python` from the job's PATH."""
    if cluster is not None and cluster.container_image:
        return "python"
    local_fs = kind is ExecutorKind.LOCAL or cluster.tunnel is TunnelKind.LOCAL
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if local_fs and os.access(venv, os.X_OK) else "python"


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
    kind = ExecutorKind(args.executor)
    cluster = _cluster(args) if kind is ExecutorKind.SLURM else None
    title = args.name or f"ace-{args.kind}-{args.recipe}"
    workdir = args.workdir or _default_workdir(kind, cluster)
    if args.out:
        out = args.out
    elif workdir:
        out = str(Path(workdir) / "runs" / f"{title}-{time.strftime('%Y%m%d-%H%M%S')}")
    else:
        raise ValueError("--out is required when the job does not run on this filesystem "
                         "(give a path on the cluster's shared filesystem)")
    python = args.python or _default_python(kind, cluster)
    jobs, chain = _jobs(args, overrides, out=out, python=python, workdir=workdir)
    # nemo-run is imported only now, after every check: --help and mistakes answer instantly.
    from launch.executors import render_dryrun, submit, wait

    if args.dryrun:
        sys.stdout.write(render_dryrun(title, jobs, kind=kind, cluster=cluster, chain=chain))
        return 0
    exp_id = submit(title, jobs, kind=kind, cluster=cluster, chain=chain)
    sys.stdout.write(json.dumps({"experiment": exp_id, "jobs": [j.name for j in jobs],
                                 "out": out}) + "\n")
    if not args.wait:
        return 0
    statuses = wait(exp_id, timeout_s=args.wait_timeout)
    for s in statuses:
        sys.stdout.write(json.dumps({"job": s.name, "state": s.state.value,
                                     "scheduler_id": s.scheduler_id, "dir": s.local_dir}) + "\n")
    return 0 if all(s.state is JobState.SUCCEEDED for s in statuses) else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, overrides = _split_argv(argv)
    parser = _parser()
    args = parser.parse_args(ours)
    logging.basicConfig(level=logging.WARNING, format="[%(levelname)s launch] %(message)s")
    try:
        return _run(args, overrides)
    except ValueError as exc:
        parser.print_usage(sys.stderr)
        sys.stderr.write(f"{parser.prog}: error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
