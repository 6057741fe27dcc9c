"""`ace curriculum`: run GRPO stage after stage on one policy, resumable at any step.

The policy, its optimizer and the vLLM engine stay in memory for the whole curriculum, so each
stage starts from the previous stage's final weights; a stage keeps or resets the AdamW moments
(`StageConfig.optimizer`). Every step record carries `stage`, `stage_name` and `stage_step`
next to the GRPO metrics; a stage's last record carries `stage/stop_reason` (and the held-out
evaluation). Code-style stages drop prompts whose rollouts were all correct after each epoch
(`curriculum_state.PromptStream`).

Resume: a checkpoint (atomic step directory, `train/state.py`) stores the weights, optimizer,
lr schedule and RNG states, and here: stage index and step, whether the stage is done, the
prompt stream (epoch, position, removed and pending prompts), the plateau tracker, the
temperature controller, the weight version and a config fingerprint. Restarting the same
command continues from the newest readable checkpoint and reproduces the uninterrupted run's
metrics: the engine's per-request seeds derive from (seed, global step, prompt index), so the
same weights at the same step sample the same tokens. A checkpoint that cannot be read is moved
aside (`.corrupt-step_*`) and the previous one is used; a checkpoint whose fingerprint differs
from this run's config (other model weights, prompt files, stages, seeds...) is refused with the
list of differing fields. The parallel layout is not part of the fingerprint: restarting with
another `parallel.tp` / `parallel.pp` / world size (e.g. after a stage ends, when longer stages
want more model parallelism) resumes from the same checkpoint, resharded on load.

What it does not do: overlap stages, change the parallel layout or engine size within one
process, or give stages their own lr schedule (the base `optim` runs across the whole
curriculum).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import torch

from megatron_ace.algorithms.temperature import TemperaturePolicyKind
from megatron_ace.config.base import apply_overrides, save_json, to_dict
from megatron_ace.train.curriculum_config import (
    CURRICULA,
    CurriculumConfig,
    OptimizerCarry,
    curriculum_recipe,
    stage_grpo_config,
    stage_table,
)
from megatron_ace.train.curriculum_state import (
    PlateauTracker,
    PromptStream,
    fingerprint_fields,
    fingerprint_mismatch,
)
from megatron_ace.train.grpo import GRPORun
from megatron_ace.train.metrics import RL_HEADLINE, MetricsLogger
from megatron_ace.train.sft import export_hf
from megatron_ace.train.state import (
    META_FILE,
    UnreadableCheckpoint,
    finish_saves,
    list_checkpoints,
    load_training_state,
    refuse_to_overwrite,
    save_training_state,
)
from megatron_ace.utils.logging import get_logger

log = get_logger(__name__)

SUMMARY_FILE = "curriculum_summary.json"
# A checkpoint whose files are missing, truncated or damaged.
_UNREADABLE = (UnreadableCheckpoint, OSError, EOFError, pickle.UnpicklingError)


def reset_optimizer_moments(opt: Any) -> None:
    """Forget AdamW's moments and step counts (a fresh optimizer on the same parameters)."""
    inner = getattr(opt, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        inner.state.clear()
        return
    raise NotImplementedError(f"stage.optimizer=reset supports the torch optimizer backend, "
                              f"not {type(opt).__name__}")


class CurriculumRunner:
    """One GRPORun driven through the stages of a CurriculumConfig."""

    def __init__(self, cfg: CurriculumConfig, out: Path) -> None:
        self.cfg, self.out = cfg, out
        self.stage_cfgs = [stage_grpo_config(cfg.base, s) for s in cfg.stages]
        self.fingerprint = fingerprint_fields(to_dict(cfg), self._fingerprint_files())
        refuse_to_overwrite(out / "checkpoints", cfg.base.checkpoint.resume)
        found = list_checkpoints(out / "checkpoints")
        if found:  # before the costly set-up
            self._check_fingerprint(found[-1][1])
        self.run = GRPORun(self.stage_cfgs[0], out,
                           max_response_tokens=max(s.max_response_tokens for s in cfg.stages),
                           total_steps=cfg.max_total_steps)
        self.run.heldout_domain = cfg.base.data.domain  # held-out prompts are the base's
        self.stage = self.stage_step = 0
        self.stream: PromptStream | None = None
        self.plateau: PlateauTracker | None = None
        self.history: list[dict[str, Any]] = []
        self.logger: MetricsLogger | None = None
        self._resumed_done = False  # the loaded checkpoint ends its stage

    def _fingerprint_files(self) -> dict[str, str]:
        base = self.cfg.base
        files = {f"stage:{s.name}:prompts": c.data.train_path
                 for s, c in zip(self.cfg.stages, self.stage_cfgs)}
        if base.model.hf_path:
            for f in sorted(Path(base.model.hf_path).glob("*.safetensors")) + [
                    Path(base.model.hf_path) / "config.json"]:
                files[f"model:{f.name}"] = str(f)
        tok = Path(base.data.tokenizer or base.model.hf_path or ".") / "tokenizer.json"
        files["tokenizer"] = str(tok) if tok.is_file() else ""
        return files

    # ---- stages ----------------------------------------------------------------------------
    def _enter_stage(self, k: int, *, previous_temperature: float | None) -> None:
        """Point the run at stage k (fresh stream and stop rule; state loads may follow)."""
        stage, gcfg = self.cfg.stages[k], self.stage_cfgs[k]
        t = stage.temperature
        if (previous_temperature is not None and stage.carry_temperature
                and t.policy is TemperaturePolicyKind.ENTROPY_TARGET):
            start = min(t.max_temperature, max(t.min_temperature, previous_temperature))
            gcfg = dataclasses.replace(gcfg, rollout=dataclasses.replace(
                gcfg.rollout, temperature=dataclasses.replace(t, initial_temperature=start)))
        self.run.reconfigure(gcfg)
        self.stream = PromptStream(len(self.run.train_items), seed=self.cfg.base.seed, stage=k,
                                   drop_solved=stage.drop_solved_prompts,
                                   solved_min_accuracy=stage.solved_min_accuracy)
        self.plateau = PlateauTracker(stage.stop)
        self.stage, self.stage_step = k, 0

    def _start_stage(self, k: int, previous_temperature: float | None) -> None:
        """Begin stage k from its first step (after stage k-1 finished)."""
        self._enter_stage(k, previous_temperature=previous_temperature)
        stage = self.cfg.stages[k]
        if k > 0 and stage.optimizer is OptimizerCarry.RESET:
            reset_optimizer_moments(self.run.trainer.opt)
        log.info("stage %d/%d %r starts at step %d: %s, %d-token budget, n=%d, weights version "
                 "%d, optimizer %s, temperature %.3f", k + 1, len(self.cfg.stages), stage.name,
                 self.run.step_index + 1, stage.domain.value, stage.max_response_tokens,
                 stage.group_size, self.run.version, stage.optimizer.value,
                 self.run.temperature.temperature)

    def _step(self) -> dict[str, Any]:
        stage = self.cfg.stages[self.stage]
        indices = self.stream.next_indices(stage.prompts_per_step)
        metrics = self.run.step([self.run.train_items[i] for i in indices])
        accuracy = self.run.last_rewards_B.view(len(indices), -1).mean(dim=1).tolist()
        self.stream.record(indices, accuracy)
        self.stage_step += 1
        self.plateau.observe(metrics)
        metrics.update({"stage": self.stage, "stage_name": stage.name,
                        "stage_step": self.stage_step,
                        "prompts/active": float(self.stream.active_count),
                        "prompts/removed": float(len(self.stream.removed)),
                        "prompts/solved_pending": float(len(self.stream.pending))})
        if self.stage_step == 1:
            metrics["stage/first_step"] = 1.0
        return metrics

    def _stop_reason(self) -> str:
        reason = self.plateau.stop_reason(self.stage_step)
        if not reason and len(self.stream.removed | self.stream.pending) == self.stream.num_items:
            reason = "all_prompts_solved"
        return reason

    def _run_stage(self, kill_after: set[int]) -> None:
        stage = self.cfg.stages[self.stage]
        save_every = self.cfg.base.checkpoint.save_interval
        while True:
            metrics = self._step()
            reason = self._stop_reason()
            if reason:
                metrics["stage/stop_reason"] = reason
                if self.cfg.eval_after_each_stage and self.run.heldout:
                    self.run.sync_weights()
                    metrics.update(self.run.evaluate())
                self.history.append({"stage": self.stage, "name": stage.name,
                                     "steps": self.stage_step, "end_step": self.run.step_index,
                                     "stop_reason": reason,
                                     **{k: v for k, v in metrics.items() if k.startswith("eval/")}})
            self.logger.log(self.run.step_index, metrics)
            self._log_line(metrics)
            if reason or (save_every and self.run.step_index % save_every == 0):
                self.save(stage_done=bool(reason))
            self._maybe_kill(kill_after)
            if reason:
                log.info("stage %r ends after %d steps (%s)", stage.name, self.stage_step, reason)
                return

    def _log_line(self, m: dict[str, Any]) -> None:
        log.info("step %d %s[%d] T=%.3f target=%s measured=%.4f -> next T=%.3f | reward %.3f "
                 "len %.1f loss %s removed %d", self.run.step_index, m["stage_name"],
                 m["stage_step"], m["temperature/used"],
                 f"{m['temperature/entropy_target']:.2f}" if "temperature/entropy_target" in m
                 else "fixed", m["temperature/entropy_measured"],
                 m["temperature/temperature"], m["reward/mean"], m["rollout/response_length"],
                 f"{m['update/loss']:.4f}" if "update/loss" in m else "skipped",
                 int(m["prompts/removed"]))

    def _maybe_kill(self, kill_after: set[int]) -> None:
        """Testing hook: SIGKILL this process once after step N (a marker file makes it
        one-shot, so restarting the very same command runs through)."""
        if self.run.step_index not in kill_after or self.run.ps.rank != 0:
            return
        marker = self.out / f".killed_after_step_{self.run.step_index}"
        if marker.exists():
            return
        marker.write_text("killed\n")
        log.warning("--kill-after-step %d: SIGKILL", self.run.step_index)
        os.kill(os.getpid(), signal.SIGKILL)

    # ---- state -----------------------------------------------------------------------------
    def save(self, *, stage_done: bool) -> None:
        run = self.run
        extra = {"fingerprint": self.fingerprint, "stage": self.stage,
                 "stage_name": self.cfg.stages[self.stage].name, "stage_step": self.stage_step,
                 "stage_done": stage_done, "version": run.version,
                 "temperature": run.temperature.state_dict(),
                 "temperature_now": run.temperature.temperature,
                 "plateau": self.plateau.state_dict(), "history": self.history}
        ckpt = self.cfg.base.checkpoint
        last = stage_done and self.stage + 1 == len(self.cfg.stages)
        save_training_state(self.out / "checkpoints", step=run.step_index,
                            model_chunks=run.trainer.opt.model_chunks, opt=run.trainer.opt,
                            sched=run.trainer.sched, data_state=self.stream.state_dict(),
                            ps=run.ps, keep_last=ckpt.keep_last, extra=extra,
                            async_save=ckpt.async_save and not last)

    def _check_fingerprint(self, path: Path) -> dict[str, Any]:
        """The checkpoint's `extra`; ValueError listing the fields that differ from this run."""
        extra = json.loads((path / META_FILE).read_text()).get("extra", {})
        diffs = fingerprint_mismatch(extra.get("fingerprint", {}), self.fingerprint)
        if diffs:
            raise ValueError(f"cannot resume {self.out} from {path.name}: the run's config or "
                             f"inputs differ from the checkpoint's:\n  " + "\n  ".join(diffs[:20])
                             + "\nuse a new --out, or restore the original config")
        return extra

    def resume(self) -> bool:
        """Load the newest readable checkpoint; False when starting from scratch."""
        if self.cfg.base.checkpoint.resume.value == "never":
            return False
        for _, path in reversed(list_checkpoints(self.out / "checkpoints")):
            extra = self._check_fingerprint(path)
            self._enter_stage(int(extra["stage"]), previous_temperature=None)
            try:
                info = load_training_state(path, model_chunks=self.run.trainer.opt.model_chunks,
                                           opt=self.run.trainer.opt, sched=self.run.trainer.sched,
                                           ps=self.run.ps, seed=self.cfg.base.seed)
            except _UNREADABLE as exc:
                log.warning("checkpoint %s is unreadable (%s: %s); using the previous one",
                            path, type(exc).__name__, exc)
                if self.run.ps.rank == 0:
                    shutil.move(str(path), str(path.with_name(".corrupt-" + path.name)))
                continue
            self._restore(info, extra)
            return True
        return False

    def _restore(self, info: Any, extra: dict[str, Any]) -> None:
        run = self.run
        run.step_index, run.version = info.step, int(extra["version"])
        run.temperature.load_state_dict(extra["temperature"])
        self.stream.load_state_dict(info.data_state)
        self.plateau.load_state_dict(extra["plateau"])
        self.stage_step, self.history = int(extra["stage_step"]), list(extra["history"])
        log.info("resumed at step %d: stage %d %r step %d%s, weights version %d, %d prompts "
                 "removed", run.step_index, self.stage, extra["stage_name"], self.stage_step,
                 " (done)" if extra["stage_done"] else "", run.version, len(self.stream.removed))
        self._resumed_done = bool(extra["stage_done"])

    # ---- the whole curriculum ----------------------------------------------------------------
    def run_all(self, kill_after: set[int]) -> dict[str, Any]:
        resumed = self.resume()
        self.logger = MetricsLogger(self.out, self.cfg.base.logging, rank=self.run.ps.rank,
                                    total_steps=self.cfg.max_total_steps,
                                    start_step=self.run.step_index, run_config=to_dict(self.cfg),
                                    headline=RL_HEADLINE + ("stage",))
        if not resumed:
            self._start_stage(0, None)
            if self.cfg.base.eval.at_start and self.run.heldout:
                self.run.sync_weights()
                self.logger.log(0, {**self.run.evaluate(), "stage": 0,
                                    "stage_name": self.cfg.stages[0].name, "stage_step": 0})
        first = True
        while True:
            if not (first and self._resumed_done):
                self._run_stage(kill_after)
            first = False
            if self.stage + 1 == len(self.cfg.stages):
                break
            self._start_stage(self.stage + 1, self.run.temperature.temperature)
        finish_saves()
        self.logger.close()
        summary = {"steps": self.run.step_index, "stages": self.history}
        if self.cfg.base.checkpoint.export_hf:
            export_hf(self.run.trainer, self.out / "hf", tokenizer_dir=self.run._tokenizer_dir())
        if self.run.ps.rank == 0:
            (self.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def close(self) -> None:
        self.run.close()


def run_curriculum(cfg: CurriculumConfig, out: Path, *, kill_after: set[int] = frozenset()
                   ) -> dict[str, Any]:
    """Run every stage of `cfg` into `out` (resuming if `out` has checkpoints)."""
    out.mkdir(parents=True, exist_ok=True)
    runner = CurriculumRunner(cfg, out)
    try:
        if runner.run.ps.rank == 0:
            save_json(cfg, out / "curriculum.json")
        return runner.run_all(set(kill_after))
    finally:
        runner.close()


# ---- command line ----------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    names = "\n".join(f"  {k:<26}{h}" for k, (_, h) in CURRICULA.items())
    p = argparse.ArgumentParser(
        prog="ace curriculum", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Stage-wise GRPO (AceReason length curriculum), resumable at any step.",
        epilog=f"recipes:\n{names}\n\noverrides: base fields as in `ace grpo` "
               "(model.hf_path=..., optim.lr=...), stage fields as stage.<name>.<field>=value "
               "(stage.math-8k.group_size=16, stage.code.stop.max_steps=5)")
    p.add_argument("--recipe", default="tiny-curriculum", help="recipe name")
    p.add_argument("--out", help="run directory (required unless --print-config)")
    p.add_argument("--print-config", action="store_true", help="print the stage table and exit")
    p.add_argument("--kill-after-step", type=int, action="append", default=[],
                   help="testing: SIGKILL the run once after this global step (repeatable)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    return p


def apply_curriculum_overrides(cfg: CurriculumConfig, overrides: list[str]) -> CurriculumConfig:
    """`stage.<name>.<field>=v` overrides a stage; anything else overrides the base config."""
    base_items, stage_items = [], {}
    names = {s.name for s in cfg.stages}
    for item in overrides:
        item = item.removeprefix("--")
        if item.startswith("stage."):
            path, _, value = item.partition("=")
            name = next((n for n in sorted(names, key=len, reverse=True)
                         if path.startswith(f"stage.{n}.")), None)
            if name is None:
                raise ValueError(f"override {item!r}: no stage named like that; stages: "
                                 f"{', '.join(s.name for s in cfg.stages)}")
            stage_items.setdefault(name, []).append(f"{path[len('stage.') + len(name) + 1:]}={value}")
        else:
            base_items.append(item)
    stages = [apply_overrides(s, stage_items.get(s.name, [])) for s in cfg.stages]
    return dataclasses.replace(cfg, base=apply_overrides(cfg.base, base_items), stages=stages)


def _fill_out(cfg: CurriculumConfig, out: Path) -> CurriculumConfig:
    def fill(text: str) -> str:
        return text.replace("{out}", str(out))

    data = dataclasses.replace(cfg.base.data, **{
        f: fill(getattr(cfg.base.data, f)) for f in ("train_path", "heldout_path", "tokenizer")})
    stages = [dataclasses.replace(s, train_path=fill(s.train_path)) for s in cfg.stages]
    return dataclasses.replace(cfg, base=dataclasses.replace(cfg.base, data=data), stages=stages)


def main(argv: list[str]) -> int:
    args, unknown = _parser().parse_known_args(argv)
    cfg = apply_curriculum_overrides(curriculum_recipe(args.recipe), list(args.overrides) + unknown)
    if args.print_config:
        sys.stdout.write(f"recipe {args.recipe}: {len(cfg.stages)} stages, at most "
                         f"{cfg.max_total_steps} steps\n{stage_table(cfg)}\n")
        return 0
    if not args.out:
        raise SystemExit("ace curriculum: --out is required")
    out = Path(args.out).resolve()
    summary = run_curriculum(_fill_out(cfg, out), out, kill_after=set(args.kill_after_step))
    for s in summary["stages"]:
        log.info("stage %s: %d steps (%s) %s", s["name"], s["steps"], s["stop_reason"],
                 ", ".join(f"{k}={v:.4g}" for k, v in s.items() if k.startswith("eval/")))
    return 0
