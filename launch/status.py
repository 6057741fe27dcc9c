"""`python -m launch.status EXPERIMENT_ID [--wait S]`: print the state of an experiment's jobs.

One JSON line per job (name, state, Slurm job id, local job directory), read with nemo-run's
`Experiment.from_id(id).status(return_dict=True)` (Slurm answers through sacct). Exit status 0
when every job SUCCEEDED, 1 otherwise. Light launcher environment only (no torch).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.status", description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", help="experiment id printed by launch.submit")
    p.add_argument("--wait", type=float, default=0.0, metavar="S",
                   help="poll up to S seconds until every job has ended")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from launch.cluster import JobState
    from launch.executors import job_statuses, wait

    statuses = (wait(args.experiment, timeout_s=args.wait) if args.wait
                else job_statuses(args.experiment))
    for s in statuses:
        sys.stdout.write(json.dumps({"job": s.name, "state": s.state.value,
                                     "scheduler_id": s.scheduler_id, "dir": s.local_dir}) + "\n")
    return 0 if statuses and all(s.state is JobState.SUCCEEDED for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
