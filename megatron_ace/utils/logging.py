"""One rank-aware logger for the library (no `print` in library code).

Only global rank 0 logs at INFO by default; other ranks log warnings and errors, prefixed with
their rank, so a multi-process run reads like a single one.
"""

from __future__ import annotations

import logging
import os
import sys

_CONFIGURED = False


def _rank() -> int:
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return 0


def get_logger(name: str = "megatron_ace") -> logging.Logger:
    global _CONFIGURED
    if not _CONFIGURED:
        rank = _rank()
        root = logging.getLogger("megatron_ace")
        handler = logging.StreamHandler(sys.stderr)
        fmt = "[%(asctime)s %(levelname)s ace" + (f" r{rank}" if rank else "") + "] %(message)s"
        handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
        root.addHandler(handler)
        level = os.environ.get("ACE_LOG_LEVEL", "INFO" if rank == 0 else "WARNING")
        root.setLevel(level)
        root.propagate = False
        _CONFIGURED = True
    if not name.startswith("megatron_ace"):
        name = f"megatron_ace.{name}"
    return logging.getLogger(name)
