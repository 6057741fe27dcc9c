"""Atomic checkpoint directories: a half-written directory is never taken for a checkpoint.

Writers fill `<name>.tmp-<pid>` (every rank of a distributed save writes into the same tmp dir,
then a barrier, then rank 0 calls `commit`), which fsyncs and renames it to `<name>`. The
`latest` pointer file is replaced atomically (write + rename). This module does not coordinate
ranks itself: the caller owns the barrier.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

LATEST = "latest"
COMPLETE_MARKER = "ace_checkpoint.json"


def tmp_dir_for(final: str | Path, pid: int | None = None) -> Path:
    final = Path(final)
    return final.with_name(f"{final.name}.tmp-{os.getpid() if pid is None else pid}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: str | Path, final: str | Path) -> Path:
    """fsync every file under `tmp`, then rename it to `final` (replacing an old `final`)."""
    tmp, final = Path(tmp), Path(final)
    for root, _, files in os.walk(tmp):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(root))
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync_dir(final.parent)
    return final


def write_latest(root: str | Path, name: str) -> None:
    """Point `root/latest` at checkpoint `name` atomically."""
    root = Path(root)
    tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    tmp.write_text(name + "\n")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


def is_complete(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and ".tmp-" not in path.name and (path / COMPLETE_MARKER).is_file()


def find_latest(root: str | Path) -> Path | None:
    """The checkpoint `latest` names if complete, else the newest complete one by mtime."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if is_complete(cand):
            return cand
    done = [p for p in root.iterdir() if is_complete(p)] if root.is_dir() else []
    return max(done, key=lambda p: p.stat().st_mtime) if done else None
