"""`ace grpo`: strictly on-policy GRPO with vLLM rollouts on a Megatron-Core policy.

One iteration, top to bottom (`GRPORun.step`):
  sync weights -> generate n rollouts per prompt (each group scored as soon as it finishes) ->
  filter (overlong, zero-variance groups) -> group-normalised advantages -> token-level clipped
  policy update on packed micro-batches, whose forward also gives the old logprobs, the entropy
  and the parity vs the engine (grpo_update.py) -> temperature policy -> log / checkpoint.

The temperature policy is fed, every step, the temperature-adjusted entropy of the response
tokens of the rollouts the update trains on (trainer-side, at the sampling temperature, overlong
ones included; every rollout with `grpo.measure_filtered_rollouts` or when none is trained on);
metrics carry `temperature/used` (this step's), `temperature/temperature` (the next step's),
the target and the measurement. `GRPORun.reconfigure` switches prompts, reward, sampling and
loss on the same policy, optimizer and engine (one curriculum stage after another, see
`curriculum.py`).

Global rank 0 hosts the rollout engine and the reward pools; the rollouts are broadcast to all
ranks, and every rank of the model replica takes part in the weight gather of a sync.
What it does not do (yet): run the engine on separate GPUs (see rollout/engine.py for the
colocated and separate modes), or overlap generation of step k+1 with the update of step k
(that would no longer be strictly on-policy).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_ace.algorithms.grpo import compute_advantages_B, zero_variance_filter_B
from megatron_ace.algorithms.temperature import build_temperature_policy
from megatron_ace.config.base import apply_overrides, save_json, to_dict
from megatron_ace.data.packing import AttentionFormat
from megatron_ace.model.parallel import destroy_parallel, init_parallel
from megatron_ace.model.weights import iter_hf_tensors
from megatron_ace.train import grpo_batch
from megatron_ace.train import prompts as prompt_data
from megatron_ace.train.grpo_config import RECIPES, FilteredEntropy, GRPOConfig, recipe
from megatron_ace.train.metrics import RL_HEADLINE, MetricsLogger
from megatron_ace.train.sft import build_trainer, export_hf, resolve_dtype
from megatron_ace.train.state import (
    finish_saves,
    latest_checkpoint,
    load_training_state,
    refuse_to_overwrite,
    save_training_state,
)
from megatron_ace.train.grpo_update import UpdateSettings, train_on_rollouts
from megatron_ace.utils.logging import get_logger

log = get_logger(__name__)


class PhaseTimer:
    """Wall time per phase of one iteration."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _broadcast(obj: Any, ps: Any) -> Any:
    if ps.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class GRPORun:
    """Holds the policy, the engine (rank 0), the reward pool (rank 0) and the run state."""

    def __init__(self, cfg: GRPOConfig, out: Path, *, max_response_tokens: int = 0,
                 total_steps: int = 0) -> None:
        """`max_response_tokens` / `total_steps`: sizes of the engine and the lr schedule when
        several configs run on this policy in turn (a curriculum); 0 = this config's."""
        self.cfg, self.out = cfg, out
        self.max_response_tokens = max_response_tokens or cfg.rollout.max_response_tokens
        self.ps = init_parallel(cfg.parallel, seed=cfg.seed)
        self.model_cfg = cfg.model.resolve()
        self.dtype = resolve_dtype(cfg.precision)
        self.trainer = build_trainer(self.model_cfg, self.ps, cfg.optim,
                                     total_steps=total_steps or cfg.steps,
                                     dtype=self.dtype, hf_path=cfg.model.hf_path,
                                     mcore_path=cfg.model.mcore_path)
        self.tokenizer = prompt_data.load_tokenizer(cfg.data.tokenizer or cfg.model.hf_path)
        self.train_items = prompt_data.load_prompts(cfg.data.train_path, cfg.data, self.tokenizer)
        self.heldout = (prompt_data.load_prompts(cfg.data.heldout_path, cfg.data, self.tokenizer)
                        if cfg.data.heldout_path else [])
        if cfg.eval.max_problems:
            self.heldout = self.heldout[: cfg.eval.max_problems]
        self.heldout_domain = cfg.data.domain
        """Reward of the held-out prompts (stays put when `reconfigure` changes the domain)."""
        self.sampler = prompt_data.PromptSampler(len(self.train_items), seed=cfg.seed)
        self.stop_ids = tuple(t for t in (self.tokenizer.convert_tokens_to_ids("<|im_end|>"),)
                              if isinstance(t, int) and t >= 0)
        self.temperature = build_temperature_policy(cfg.rollout.temperature)
        self.step_index = 0
        self.version = 0
        self.engine = self.syncer = self.rewards = None
        self._reward_pools: dict[Any, Any] = {}
        self.last_rewards_B: torch.Tensor | None = None
        init_dir = cfg.model.hf_path
        if not init_dir:  # the engine starts from an HF directory; every sync overwrites it
            init_dir = str(out / "rollout_init_hf")
            export_hf(self.trainer, init_dir, tokenizer_dir=self._tokenizer_dir())
        if self.ps.rank == 0:
            self._start_rollout_side(init_dir)

    # ---- set-up ---------------------------------------------------------------------------
    def _start_rollout_side(self, init_dir: str) -> None:
        from megatron_ace.rollout.engine import (
            DType,
            Placement,
            RolloutEngineConfig,
            VllmRolloutEngine,
        )
        from megatron_ace.rollout.weight_sync import (
            WeightSyncConfig,
            WeightSyncer,
            resolve_transport,
        )

        # The engine lives on rank 0's host and device: shared memory on CPU, CUDA IPC on GPU
        # (resolved first, so a choice this machine cannot run fails before the engine starts).
        transport = resolve_transport(self.cfg.rollout.weight_sync_transport,
                                      placement=Placement.COLOCATED,
                                      field="rollout.weight_sync_transport")
        max_response = max(self.max_response_tokens, self.cfg.eval.max_response_tokens)
        self.engine = VllmRolloutEngine(RolloutEngineConfig(
            model_path=init_dir,
            dtype=DType.FLOAT32 if self.dtype == torch.float32 else DType.BFLOAT16,
            cpu_kvcache_space_gib=self.cfg.rollout.kv_cache_gib, seed=self.cfg.rollout.seed,
            max_model_len=self.cfg.data.max_prompt_tokens + max_response + 8,
            gpu_memory_utilization=self.cfg.rollout.gpu_memory_utilization,
            # In-process vLLM would join this job's torch.distributed world; with several
            # trainer ranks its engine core runs in a process of its own.
            in_process=self.ps.world_size == 1))
        self.syncer = WeightSyncer(self.engine, WeightSyncConfig(
            bucket_bytes=self.cfg.rollout.bucket_mb << 20, transport=transport))
        if self.ps.tp_size == 1:
            # At TP1 the synced HF tensors are views of the parameters: in shared memory the
            # engine reads them where they lie, with no copy per sync (a no-op elsewhere).
            self.syncer.share_parameters(self._model().parameters())
        self.rewards = self._reward_pool(self.cfg.data.domain)

    def _reward_pool(self, domain: Any) -> Any:
        if domain not in self._reward_pools:  # one pool per domain, kept until close()
            self._reward_pools[domain] = prompt_data.build_reward_pool(domain)
        return self._reward_pools[domain]

    def reconfigure(self, cfg: GRPOConfig) -> None:
        """Switch to another config on the same policy, engine and optimizer (a new curriculum
        stage): prompts, reward domain, sampling, loss and temperature policy follow `cfg`;
        the model, parallel layout and engine must be the same."""
        if cfg.rollout.max_response_tokens > self.max_response_tokens:
            raise ValueError(f"rollout.max_response_tokens {cfg.rollout.max_response_tokens} "
                             f"exceeds the engine's budget {self.max_response_tokens}")
        if (cfg.data.train_path, cfg.data.domain) != (self.cfg.data.train_path, self.cfg.data.domain):
            self.train_items = prompt_data.load_prompts(cfg.data.train_path, cfg.data, self.tokenizer)
        self.cfg = cfg
        self.sampler = prompt_data.PromptSampler(len(self.train_items), seed=cfg.seed)
        self.temperature = build_temperature_policy(cfg.rollout.temperature)
        if self.ps.rank == 0:
            self.rewards = self._reward_pool(cfg.data.domain)

    def _model(self):
        chunk = self.trainer.opt.model_chunks[0]
        return getattr(chunk, "module", chunk)

    def _tokenizer_dir(self) -> str | None:
        path = self.cfg.data.tokenizer
        return path if path and Path(path).is_dir() else None

    def close(self) -> None:
        for pool in self._reward_pools.values():
            pool.close()
        if self.engine is not None:
            self.syncer.close()
            self.engine.close()
        destroy_parallel()

    # ---- phases ---------------------------------------------------------------------------
    def sync_weights(self) -> dict[str, float]:
        """Every rank drives the gather; rank 0 streams the HF-named tensors into the engine."""
        self.version += 1
        tensors = iter_hf_tensors(self._model(), self.model_cfg, self.ps)
        if self.ps.rank == 0:
            return self.syncer.sync(tensors, version=self.version).to_dict(prefix="")
        for _ in tensors:  # drive the collectives; only rank 0 receives tensors
            pass
        return {}

    def sampling(self, *, n: int, temperature: float, max_tokens: int, seed: int,
                 iteration: int = 0):
        """The engine's SamplingConfig of a rollout or evaluation batch."""
        from megatron_ace.rollout.types import SamplingConfig

        return SamplingConfig(n=n, temperature=temperature,
                              top_p=self.cfg.rollout.top_p if temperature > 0 else 1.0,
                              max_tokens=max_tokens, seed=seed, iteration=iteration,
                              stop_token_ids=self.stop_ids)

    def generate_and_score(self, items: list, sampling: Any, domain: Any = None,
                           timer: PhaseTimer | None = None) -> tuple[list[list[Any]], list[float], int]:
        """n samples per prompt and their rewards, on every rank (rank 0 generates and scores).

        Each prompt's group goes to the reward pool as soon as the engine finishes it, so
        scoring overlaps generation; "score" times only the wait for the last rewards.
        `domain` picks another reward than the current config's. Returns (groups, rewards in
        group order, number of samples whose scoring failed: reward 0)."""
        from megatron_ace.train.reward_stream import RewardStream

        timer = timer or PhaseTimer()
        result = None
        if self.ps.rank == 0:
            pool = self.rewards if domain is None else self._reward_pool(domain)
            stream = RewardStream(pool, items)
            with timer("generate"):
                groups = self.engine.generate([it.prompt_ids for it in items], sampling,
                                              on_group=stream.submit_group)
            with timer("score"):
                rewards, failed = stream.collect()
            result = (groups, rewards, failed)
        with timer("broadcast"):
            return _broadcast(result, self.ps)

    def evaluate(self) -> dict[str, float]:
        """Accuracy on the held-out prompts with the evaluation's sampling settings."""
        if not self.heldout:
            return {}
        ev = self.cfg.eval
        sampling = self.sampling(n=ev.num_samples, temperature=ev.temperature,
                                 max_tokens=ev.max_response_tokens or
                                 self.cfg.rollout.max_response_tokens,
                                 seed=self.cfg.rollout.seed, iteration=0)
        groups, rewards, _ = self.generate_and_score(self.heldout, sampling,
                                                     domain=self.heldout_domain)
        lengths = [len(s.response_token_ids) for g in groups for s in g]
        return {"eval/accuracy": sum(rewards) / max(len(rewards), 1),
                "eval/num_problems": float(len(self.heldout)),
                "eval/response_length": sum(lengths) / max(len(lengths), 1)}

    # ---- one iteration ---------------------------------------------------------------------
    def step(self, items: list | None = None) -> dict[str, float]:
        """One RL iteration on `items` (default: the sampler's next prompts)."""
        cfg, timer = self.cfg, PhaseTimer()
        temperature = self.temperature.temperature
        if items is None:
            items = [self.train_items[i]
                     for i in self.sampler.next_indices(cfg.rollout.prompts_per_step)]
        with timer("sync"):
            sync_metrics = self.sync_weights()
        sampling = self.sampling(n=cfg.rollout.group_size, temperature=temperature,
                                 max_tokens=cfg.rollout.max_response_tokens,
                                 seed=cfg.rollout.seed, iteration=self.step_index + 1)
        groups, rewards, num_failed = self.generate_and_score(items, sampling, timer=timer)
        rewards_B = torch.tensor(rewards, dtype=torch.float32)
        self.last_rewards_B = rewards_B
        samples = [s for g in groups for s in g]
        rollouts, keep_B = self._prepare(items, samples, rewards_B)
        trainer_metrics = train_on_rollouts(self.trainer, rollouts, keep_B,
                                            self._update_settings(temperature), timer=timer)
        # The controller sees the temperature-adjusted entropy measured by the update's forward
        # (see the module docstring), and picks the next step's temperature.
        self.temperature.update(trainer_metrics.pop("rollout/entropy", float("nan")))
        self.step_index += 1
        metrics = self._rollout_metrics(samples, rewards_B, keep_B)
        metrics["reward/num_failed"] = float(num_failed)
        metrics.update(trainer_metrics)
        metrics.update({f"sync/{k}": float(v) for k, v in sync_metrics.items()
                        if isinstance(v, (int, float))})
        metrics.update({f"time/{k}": v for k, v in timer.seconds.items()})
        metrics.update({f"temperature/{k}": v for k, v in self.temperature.metrics().items()})
        metrics["temperature/used"] = temperature  # "temperature/temperature" is the next step's
        metrics["entropy"] = metrics.get("temperature/entropy_measured", float("nan"))
        return metrics

    def _prepare(self, items, samples, rewards_B) -> tuple[grpo_batch.Rollouts, torch.Tensor]:
        """Advantages and filters: (the rollouts as the trainer takes them, keep mask [B])."""
        cfg = self.cfg
        group = cfg.rollout.group_size
        truncated_B = torch.tensor([s.status.value == "truncated" for s in samples])
        loss_on_B = ~truncated_B if cfg.grpo.overlong_filter else torch.ones_like(truncated_B)
        keep_B = torch.ones(len(samples), dtype=torch.bool)
        if cfg.grpo.drop_zero_variance_groups:
            keep_B = zero_variance_filter_B(rewards_B, group)
        adv_B = compute_advantages_B(cfg.grpo.advantage, rewards_B, group)
        rollouts = grpo_batch.Rollouts(
            prompts=[items[i // group].prompt_ids for i in range(len(samples))],
            responses=[s.response_token_ids for s in samples], adv_B=adv_B.float(),
            loss_on_B=loss_on_B, engine_logp=[list(s.logprobs) for s in samples])
        return rollouts, keep_B

    def _update_settings(self, temperature: float) -> UpdateSettings:
        from megatron_ace.model.spec import supports_packed_thd

        cfg, ps, model = self.cfg, self.ps, self._model()
        thd = supports_packed_thd(model.ace_spec, model.ace_core_attention)
        layout = grpo_batch.LayoutConfig(
            mode=cfg.grpo.batching, max_tokens=cfg.grpo.max_tokens_per_micro_batch,
            micro_batch_size=cfg.grpo.micro_batch_size,
            attention=AttentionFormat.THD if thd else AttentionFormat.DENSE_MASK,
            pad_id=self.tokenizer.pad_token_id or 0,
            multiple=grpo_batch.pad_multiple(ps.tp_size, ps.sequence_parallel),
            uniform_length=ps.pp_size > 1)
        return UpdateSettings(loss=cfg.grpo.loss, num_updates=cfg.grpo.num_updates,
                              fuse_old_logprobs=cfg.grpo.fuse_old_logprobs, layout=layout,
                              temperature=temperature, vocab_size=self.model_cfg.vocab_size,
                              check_parity=cfg.rollout.check_parity,
                              measure_filtered=cfg.grpo.measure_filtered_rollouts,
                              filtered_by_sampled_tokens=(cfg.grpo.filtered_entropy
                                                          is FilteredEntropy.SAMPLED))

    def _rollout_metrics(self, samples, rewards_B, keep_B) -> dict[str, float]:
        lengths = torch.tensor([len(s.response_token_ids) for s in samples], dtype=torch.float32)
        truncated = sum(s.status.value == "truncated" for s in samples)
        return {"reward/mean": rewards_B.mean().item(),
                "rollout/response_length": lengths.mean().item(),
                "rollout/response_length_max": lengths.max().item(),
                "rollout/truncation_rate": truncated / len(samples),
                "filter/kept_fraction": keep_B.float().mean().item()}

    # ---- state -----------------------------------------------------------------------------
    def state_extra(self) -> dict[str, Any]:
        return {"version": self.version, "temperature": self.temperature.state_dict()}

    def save(self, *, final: bool = False) -> None:
        """Checkpoint this step; interval saves may run in the background, the final one not."""
        cfg = self.cfg
        save_training_state(self.out / "checkpoints", step=self.step_index,
                            model_chunks=self.trainer.opt.model_chunks, opt=self.trainer.opt,
                            sched=self.trainer.sched, data_state=self.sampler.state_dict(),
                            ps=self.ps, keep_last=cfg.checkpoint.keep_last,
                            extra=self.state_extra(),
                            async_save=cfg.checkpoint.async_save and not final)

    def maybe_resume(self) -> None:
        path = latest_checkpoint(self.out / "checkpoints")
        if path is None or self.cfg.checkpoint.resume.value == "never":
            return
        info = load_training_state(path, model_chunks=self.trainer.opt.model_chunks,
                                   opt=self.trainer.opt, sched=self.trainer.sched, ps=self.ps,
                                   seed=self.cfg.seed)
        self.step_index = info.step
        self.sampler.load_state_dict(info.data_state)
        self.version = int(info.extra.get("version", 0))
        self.temperature.load_state_dict(info.extra["temperature"])


def run_grpo(cfg: GRPOConfig, out: Path) -> dict[str, Any]:
    """Run `cfg.steps` GRPO steps into `out`; returns the summary (also on disk)."""
    refuse_to_overwrite(out / "checkpoints", cfg.checkpoint.resume)
    out.mkdir(parents=True, exist_ok=True)
    run = GRPORun(cfg, out)
    try:
        run.maybe_resume()
        if run.ps.rank == 0:
            save_json(cfg, out / "config.json")
        logger = MetricsLogger(out, cfg.logging, rank=run.ps.rank, total_steps=cfg.steps,
                               start_step=run.step_index, run_config=to_dict(cfg),
                               headline=RL_HEADLINE)
        summary: dict[str, Any] = {}
        if cfg.eval.at_start and run.step_index == 0:
            run.sync_weights()
            summary["initial"] = run.evaluate()
            logger.log(0, {**summary["initial"], "step": 0})
        while run.step_index < cfg.steps:
            metrics = run.step()
            every = cfg.eval.every_steps
            if every and run.step_index % every == 0 and run.step_index < cfg.steps:
                run.sync_weights()
                metrics.update(run.evaluate())
            logger.log(run.step_index, metrics)
            if cfg.checkpoint.save_interval and run.step_index % cfg.checkpoint.save_interval == 0:
                run.save()
        run.sync_weights()
        summary["final"] = run.evaluate()
        logger.log(run.step_index, {**summary["final"], "step": run.step_index})
        if cfg.checkpoint.save_at_end and run.step_index and not (
                cfg.checkpoint.save_interval and run.step_index % cfg.checkpoint.save_interval == 0):
            run.save(final=True)
        finish_saves()
        if cfg.checkpoint.export_hf:
            export_hf(run.trainer, out / "hf", tokenizer_dir=run._tokenizer_dir())
        logger.close()
        if run.ps.rank == 0:
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    finally:
        run.close()


def _parser() -> argparse.ArgumentParser:
    names = "\n".join(f"  {k:<22}{h}" for k, (_, h) in RECIPES.items())
    p = argparse.ArgumentParser(
        prog="ace grpo", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="On-policy GRPO: vLLM rollouts, rule-based rewards, Megatron-Core updates.",
        epilog=f"recipes:\n{names}\n\noverrides: section.field=value, e.g. "
               "grpo.loss.clip_high=0.28 rollout.group_size=16 model.hf_path=/ckpt/hf")
    p.add_argument("--recipe", default="grpo-tiny", help="recipe name (default grpo-tiny)")
    p.add_argument("--out", required=True, help="run directory (config, metrics, checkpoints)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    return p


def parse_args(argv: list[str]) -> tuple[GRPOConfig, Path]:
    args, unknown = _parser().parse_known_args(argv)
    out = Path(args.out).resolve()
    cfg = apply_overrides(recipe(args.recipe), list(args.overrides) + unknown)
    data = dataclasses.replace(cfg.data, **{
        f: getattr(cfg.data, f).replace("{out}", str(out))
        for f in ("train_path", "heldout_path", "tokenizer")})
    return dataclasses.replace(cfg, data=data), out


def main(argv: list[str]) -> int:
    cfg, out = parse_args(argv)
    summary = run_grpo(cfg, out)
    for phase, values in summary.items():
        log.info("%s: %s", phase, ", ".join(f"{k}={v:.4g}" for k, v in values.items()))
    return 0
