"""Resumable pieces of a curriculum run: prompt stream with solved-prompt removal, plateau
stop rule, and the config fingerprint that guards a resume.

Everything here is pure Python (no torch, no I/O besides hashing the files a fingerprint names),
and every stateful object has `state_dict()` / `load_state_dict()` that round-trip through JSON,
so a resumed run continues with exactly the same prompts and the same stop decisions.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from megatron_ace.train.curriculum_config import StopRule


class PromptStream:
    """Seeded prompt order over epochs; optionally drops solved prompts at epoch boundaries.

    Epoch e visits the prompts still active when it starts, in the order
    permutation(seed, stage, e). A prompt whose group reached `solved_min_accuracy` is
    recorded as pending and leaves the active set when the next epoch is drawn ("after each
    epoch", as AceReason does for code). A step that crosses an epoch boundary draws the new
    epoch's order before that step is scored, so prompts solved in that step leave one epoch
    later. When every prompt is removed the stream is exhausted (`active_count == 0`).
    """

    def __init__(self, num_items: int, *, seed: int, stage: int, drop_solved: bool,
                 solved_min_accuracy: float = 1.0) -> None:
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        self.num_items, self.seed, self.stage = num_items, seed, stage
        self.drop_solved, self.solved_min_accuracy = drop_solved, solved_min_accuracy
        self.epoch, self.position = 0, 0
        self.removed: set[int] = set()
        self.pending: set[int] = set()
        self._order = self._draw_order()

    def _draw_order(self) -> list[int]:
        active = [i for i in range(self.num_items) if i not in self.removed]
        rng = np.random.default_rng([self.seed, self.stage, self.epoch])
        return [active[j] for j in rng.permutation(len(active))]

    @property
    def active_count(self) -> int:
        return self.num_items - len(self.removed)

    def next_indices(self, count: int) -> list[int]:
        """The next `count` prompt indices (fewer only if every prompt has been removed)."""
        out: list[int] = []
        while len(out) < count and self._order:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self.removed |= self.pending
                self.pending = set()
                self._order = self._draw_order()
                continue
            out.append(self._order[self.position])
            self.position += 1
        return out

    def record(self, indices: list[int], accuracy: list[float]) -> None:
        """Group accuracies of the prompts of one step (same order as `next_indices`)."""
        if len(indices) != len(accuracy):
            raise ValueError(f"{len(indices)} indices but {len(accuracy)} accuracies")
        if self.drop_solved:
            self.pending |= {i for i, a in zip(indices, accuracy) if a >= self.solved_min_accuracy}

    def state_dict(self) -> dict[str, Any]:
        return {"num_items": self.num_items, "seed": self.seed, "stage": self.stage,
                "epoch": self.epoch, "position": self.position,
                "removed": sorted(self.removed), "pending": sorted(self.pending)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("num_items", "seed", "stage"):
            if state[key] != getattr(self, key):
                raise ValueError(f"prompt stream state {key}={state[key]} does not match this "
                                 f"run's {getattr(self, key)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.removed, self.pending = set(state["removed"]), set(state["pending"])
        self._order = self._draw_order()


class PlateauTracker:
    """Decides when a stage stops: at `max_steps`, or when the moving average of the metric
    has not beaten its best by `min_delta` for `patience` steps (after `min_steps`)."""

    def __init__(self, rule: StopRule) -> None:
        self.rule = rule
        self.values: deque[float] = deque(maxlen=rule.window)
        self.best = -math.inf
        self.since_best = 0

    def observe(self, metrics: dict[str, Any]) -> None:
        if not self.rule.plateau_metric:
            return
        value = metrics.get(self.rule.plateau_metric)
        if value is None or not math.isfinite(float(value)):
            raise ValueError(f"stop.plateau_metric {self.rule.plateau_metric!r} is not a finite "
                             f"metric of this step (got {value!r})")
        self.values.append(float(value))
        smoothed = sum(self.values) / len(self.values)
        if smoothed > self.best + self.rule.min_delta:
            self.best, self.since_best = smoothed, 0
        else:
            self.since_best += 1

    def stop_reason(self, stage_step: int) -> str:
        """"" to go on, else why the stage ends after `stage_step` steps."""
        if stage_step >= self.rule.max_steps:
            return "max_steps"
        if (self.rule.plateau_metric and stage_step >= self.rule.min_steps
                and self.since_best >= self.rule.patience):
            return "plateau"
        return ""

    def state_dict(self) -> dict[str, Any]:
        return {"values": list(self.values), "best": None if math.isinf(self.best) else self.best,
                "since_best": self.since_best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = deque((float(v) for v in state["values"]), maxlen=self.rule.window)
        self.best = -math.inf if state["best"] is None else float(state["best"])
        self.since_best = int(state["since_best"])


# ---- fingerprint -----------------------------------------------------------------------------
# Config fields that may change between a run and its resume: they do not change what the run
# computes (where and how often it logs, evaluates or saves, and the parallel layout: checkpoints
# reshard on load and the layouts agree within float rounding).
RESUME_FREE_FIELDS = ("base.logging", "base.eval", "base.checkpoint", "base.parallel",
                      "eval_after_each_stage")
_PARTIAL_HASH_BYTES = 1 << 20


def file_digest(path: str | Path) -> str:
    """sha256 of a file; for files over 64 MiB only size + first and last MiB (cheap on 15 GB
    checkpoints, and still different for any retrained or re-generated file)."""
    path = Path(path)
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= 64 * _PARTIAL_HASH_BYTES:
            h.update(f.read())
        else:
            h.update(f.read(_PARTIAL_HASH_BYTES))
            f.seek(size - _PARTIAL_HASH_BYTES)
            h.update(f.read())
    return h.hexdigest()[:16]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(tree, list) and tree and isinstance(tree[0], dict):
        out = {}
        for i, value in enumerate(tree):
            out.update(_flatten(value, f"{prefix}[{i}]"))
        return out
    return {prefix: tree}


def fingerprint_fields(cfg_dict: dict[str, Any], files: dict[str, str]) -> dict[str, Any]:
    """The flat {field: value} a resume must match: the config minus RESUME_FREE_FIELDS, plus
    digests of the files that determine the computation (initial weights, prompt files)."""
    flat = _flatten(cfg_dict)
    kept = {k: v for k, v in flat.items()
            if not any(k == f or k.startswith(f + ".") for f in RESUME_FREE_FIELDS)}
    for name, path in sorted(files.items()):
        kept[f"file:{name}"] = file_digest(path) if path and Path(path).is_file() else "missing"
    return json.loads(json.dumps(kept))  # JSON-normalised, so a loaded copy compares equal


def fingerprint_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences (empty when the run may resume)."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key, "<absent>") != current.get(key, "<absent>"):
            diffs.append(f"{key}: checkpoint has {saved.get(key, '<absent>')!r}, "
                         f"this run has {current.get(key, '<absent>')!r}")
    return diffs
