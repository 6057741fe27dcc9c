"""Runs `ace sft` (run_sft) several times in one process, one run directory per job.

    python -m torch.distributed.run --nproc-per-node N layout_resume_worker.py JOBS_JSON

JOBS_JSON lists {"out": dir, "overrides": [...], "resume_from": checkpoint dir or absent} in
order; a job with `resume_from` starts from a copy of that checkpoint (written by an earlier job,
perhaps at another layout). Every job is a whole `ace sft` run
(its own TP/PP/DP groups), so one launch pays the interpreter and import start-up once. The
default process group is kept between jobs (re-creating it under torchrun is not supported).
"""

import json
import os
import shutil
import sys
import time
from pathlib import Path


def _copy_checkpoint(src: Path, dst_root: Path) -> None:
    """Rank 0 copies (tmp + rename); every rank returns once the copy is complete."""
    dst = dst_root / src.name
    if int(os.environ.get("RANK", "0")) == 0:
        shutil.copytree(src, dst_root / f".copy-{src.name}")
        os.rename(dst_root / f".copy-{src.name}", dst)
    deadline = time.monotonic() + 300
    while not dst.is_dir():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{dst} never appeared")
        time.sleep(0.05)


def main(jobs_file: str) -> None:
    from megatron.core import parallel_state as mpu

    from megatron_ace.config.base import apply_overrides
    from megatron_ace.model import parallel
    from megatron_ace.train.config import recipe
    from megatron_ace.train.sft import _fill_out, run_sft

    destroy = parallel.destroy_parallel
    parallel.destroy_parallel = mpu.destroy_model_parallel
    try:
        for job in json.loads(Path(jobs_file).read_text()):
            out = Path(job["out"])
            if job.get("resume_from"):
                _copy_checkpoint(Path(job["resume_from"]), out / "checkpoints")
            cfg = _fill_out(apply_overrides(recipe("sft-tiny"), job["overrides"]), out)
            run_sft(cfg, out)
    finally:
        destroy()


if __name__ == "__main__":
    main(sys.argv[1])
