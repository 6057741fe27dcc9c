"""Training metrics: progress bar, `<out>/metrics.jsonl`, TensorBoard and optional wandb.

`MetricsLogger(out_dir, cfg, ...)` is created on every rank but writes only on global rank 0,
so call sites need no rank checks. `log(step, record)` appends one JSON line per step (the file
is opened in append mode: a resumed run continues the same file, and lines from steps that are
replayed after a resume are superseded by the later line of the same step), adds the scalars to
TensorBoard, and updates the progress bar.

What it does not do: reduce metrics across ranks (the training step already did).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from megatron_ace.train.config import LoggingConfig
from megatron_ace.utils.logging import get_logger

logger = get_logger(__name__)

METRICS_FILE = "metrics.jsonl"
SFT_HEADLINE = ("loss", "lr", "grad_norm", "tokens_per_s")
"""Keys shown on the progress bar / log line (all keys always go to JSONL and TensorBoard)."""
RL_HEADLINE = ("reward/mean", "eval/accuracy", "rollout/response_length", "entropy",
               "temperature/used", "update/loss", "mismatch/logp_abs_diff_max")


def read_metrics(path: str | Path) -> dict[int, dict[str, Any]]:
    """step -> record from a metrics.jsonl (the last line of a step wins after a resume)."""
    records: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[int(record["step"])] = record
    return records


class MetricsLogger:
    """Rank-0 sink for per-step scalars."""

    def __init__(self, out_dir: str | Path, cfg: LoggingConfig, *, rank: int, total_steps: int,
                 start_step: int = 0, run_config: dict[str, Any] | None = None,
                 headline: tuple[str, ...] = SFT_HEADLINE) -> None:
        self.cfg = cfg
        self.headline = headline
        self.enabled = rank == 0
        self.out_dir = Path(out_dir)
        self._file = None
        self._tb = None
        self._wandb = None
        self._bar = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.out_dir / METRICS_FILE, "a", encoding="utf-8")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"),
                                     purge_step=start_step + 1 if start_step else None)
        if cfg.wandb:
            self._wandb = self._start_wandb(run_config)
        if cfg.progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train",
                             dynamic_ncols=True, leave=True)

    def _start_wandb(self, run_config: dict[str, Any] | None):
        try:
            import wandb
        except ImportError:
            logger.warning("logging.wandb=true but wandb is not installed; skipping wandb")
            return None
        return wandb.init(project=self.cfg.wandb_project, dir=str(self.out_dir),
                          config=run_config or {}, resume="allow")

    def log(self, step: int, record: dict[str, Any]) -> None:
        """Write the scalars of optimizer step `step` (1-based) everywhere."""
        if not self.enabled:
            return
        line = {"step": step, "time": time.time(), **record}
        self._file.write(json.dumps(line, allow_nan=True) + "\n")
        self._file.flush()
        scalars = {k: v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(f"train/{name}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)
        shown = {key: record[key] for key in self.headline if isinstance(record.get(key), (int, float))}
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in shown.items()},
                                  refresh=False)
        elif step % self.cfg.log_interval == 0:
            logger.info("step %d %s", step, " ".join(f"{k} {v:.4g}" for k, v in shown.items()))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._file is not None:
            self._file.close()
            self._file = None
