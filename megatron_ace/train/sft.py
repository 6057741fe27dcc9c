"""`ace sft`: supervised fine-tuning of a Qwen2 model on Megatron-Core.

    ace sft --recipe sft-tiny --out runs/tiny [optim.lr=1e-3 --schedule.max_steps=100 ...]
    python -m torch.distributed.run --nproc-per-node 2 -m megatron_ace.cli sft \\
        --recipe sft-tiny --out runs/tiny-tp2 parallel.tp=2

One run = one output directory: `config.json` (the resolved config), `metrics.jsonl`,
`tensorboard/`, `checkpoints/step_*` (resumed from automatically), and `hf/` (the final model
as a Hugging Face directory with the tokenizer). The loop is: next micro-batches from the
resumable batcher -> `train_step` -> log -> maybe checkpoint; reusable pieces (building the
model and optimizer, the step, the state) live in the sibling modules so GRPO shares them.

What it does not do: evaluation or generation (see `ace eval`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_ace.config.base import apply_overrides, save_json, to_dict
from megatron_ace.train.config import (OUT_PLACEHOLDER, RECIPES, Precision, ResumeMode,
                                       SFTConfig, recipe)
from megatron_ace.utils.logging import get_logger

logger = get_logger(__name__)


@dataclasses.dataclass
class Trainer:
    """Everything a training loop holds: model chunks, optimizer, schedule, layout."""

    model_cfg: Any
    """The resolved Qwen2Config."""
    ps: Any
    """ParallelState."""
    opt: Any
    """TrainOptimizer (its `.model_chunks` are what forward/backward runs on)."""
    sched: Any
    """LRSchedule."""
    dtype: torch.dtype

    @property
    def model(self) -> torch.nn.Module:
        """This rank's GPTModel chunk, unwrapped from megatron-core's DDP (for weight export/sync)."""
        return _unwrap(self.opt.model_chunks[0])


def resolve_dtype(precision: Precision) -> torch.dtype:
    if precision is Precision.AUTO:
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return torch.bfloat16 if precision is Precision.BF16 else torch.float32


def hf_tensor_reader(hf_dir: str | Path):
    """name -> full tensor, read lazily from the safetensors files of an HF directory."""
    from megatron_ace.checkpoint.safetensors_stream import LazyReader

    try:
        reader = LazyReader(hf_dir)
    except FileNotFoundError as exc:
        raise ValueError(f"model.hf_path: {exc}") from None

    def get(name: str) -> torch.Tensor:
        if name not in reader:
            raise ValueError(f"model.hf_path: tensor {name!r} not found in {hf_dir}")
        return reader.get(name)

    return get


def build_trainer(model_cfg: Any, ps: Any, optim_cfg: Any, *, total_steps: int,
                  dtype: torch.dtype, hf_path: str = "", mcore_path: str = "") -> Trainer:
    """Model (random init, `hf_path` weights or a torch_dist checkpoint's) + optimizer + lr
    schedule for this rank."""
    from megatron_ace.model.builder import build_model
    from megatron_ace.model.weights import load_hf_into_model
    from megatron_ace.train.optim import LRSchedule, OptimBackend, build_optimizer, resolve_backend

    model = build_model(model_cfg, ps, dtype=dtype)
    if hf_path:
        load_hf_into_model(model, hf_tensor_reader(hf_path), model_cfg, ps)
    elif mcore_path:
        from megatron_ace.checkpoint.convert import load_into_model

        load_into_model(model, mcore_path, model_cfg, ps)
    backend = resolve_backend(optim_cfg.backend)
    if backend is OptimBackend.TORCH and dtype != torch.float32:
        raise ValueError("schedule.precision=bf16 needs optim.backend=mcore (torch AdamW has no "
                         "fp32 master weights)")
    opt = build_optimizer([model], optim_cfg, ps, bf16=dtype == torch.bfloat16)
    sched = LRSchedule(cfg=optim_cfg, total_steps=total_steps)
    return Trainer(model_cfg=model_cfg, ps=ps, opt=opt, sched=sched, dtype=dtype)


def export_hf(trainer: Trainer, out_dir: str | Path, *, tokenizer_dir: str | None = None) -> Path | None:
    """Write the model as an HF directory (safetensors + config.json); collective over a replica.

    Only DP replica 0 takes part; its TP rank 0 of stage 0 receives the full tensors and writes.
    """
    from safetensors.torch import save_file

    from megatron_ace.model.weights import iter_hf_tensors

    ps = trainer.ps
    out = Path(out_dir)
    if ps.dp_rank == 0:
        model = trainer.model
        tensors = {name: t.detach().to("cpu", torch.float32 if trainer.dtype == torch.float32
                                        else torch.bfloat16).contiguous()
                   for name, t in iter_hf_tensors(model, trainer.model_cfg, ps)}
        if ps.rank == 0:
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            hf_cfg = trainer.model_cfg.to_hf_config()
            hf_cfg["torch_dtype"] = "float32" if trainer.dtype == torch.float32 else "bfloat16"
            (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
            if tokenizer_dir:
                # Tokenizer files only: a tokenizer directory may be a whole HF model directory,
                # whose weights must not replace the ones just written.
                for f in Path(tokenizer_dir).iterdir():
                    if f.is_file() and f.name not in ("config.json", "model.safetensors.index.json") \
                            and f.suffix not in (".safetensors", ".bin", ".pt"):
                        shutil.copy2(f, tmp / f.name)
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
            logger.info("exported HF model to %s", out)
    if dist.is_initialized():
        dist.barrier()
    return out if ps.rank == 0 else None


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    return getattr(chunk, "module", chunk)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    recipes = "\n".join(f"  {name:<20}{help_}" for name, (_, help_) in RECIPES.items())
    parser = argparse.ArgumentParser(
        prog="ace sft", formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        description="Supervised fine-tuning on Megatron-Core.",
        epilog=f"recipes:\n{recipes}\n\noverrides: section.field=value (or --section.field=value),"
               " e.g. optim.lr=1e-4 schedule.max_steps=100 parallel.tp=2")
    parser.add_argument("--recipe", required=True, help="recipe name (listed below)")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--resume", choices=[m.value for m in ResumeMode], default=None,
                        help="auto (default): continue from the latest checkpoint in --out")
    return parser


def parse_args(argv: list[str]) -> tuple[SFTConfig, Path]:
    """(resolved config, output dir) from the command line."""
    parser = _parser()
    known, rest = parser.parse_known_args(argv)
    overrides = [a for a in rest if "=" in a]
    unknown = [a for a in rest if "=" not in a]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    try:
        cfg = apply_overrides(recipe(known.recipe), overrides)
        if known.resume is not None:
            cfg = apply_overrides(cfg, [f"checkpoint.resume={known.resume}"])
    except ValueError as exc:
        parser.error(str(exc))
    out = Path(known.out).resolve()
    return _fill_out(cfg, out), out


def _fill_out(cfg: SFTConfig, out: Path) -> SFTConfig:
    """Replace `{out}` in paths with the run directory."""
    fill = lambda s: s.replace(OUT_PLACEHOLDER, str(out))  # noqa: E731
    data = dataclasses.replace(cfg.data, paths=[fill(p) for p in cfg.data.paths],
                               tokenizer=fill(cfg.data.tokenizer))
    model = dataclasses.replace(cfg.model, hf_path=fill(cfg.model.hf_path),
                                mcore_path=fill(cfg.model.mcore_path))
    return dataclasses.replace(cfg, data=data, model=model)


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def prepare_inputs(cfg: SFTConfig, out: Path, ps: Any) -> None:
    """Rank 0 writes the generated task and tiny tokenizer (when `arith` is set) and config.json."""
    if ps.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.arith is not None:
            from megatron_ace.data.arith_task import Split, generate_problems, sft_rows, write_jsonl
            from megatron_ace.data.tiny_tokenizer import build_tiny_tokenizer

            data_path = Path(cfg.data.paths[0])
            if not data_path.is_file():
                problems = generate_problems(cfg.arith.task, Split.TRAIN, cfg.arith.num_samples)
                task = cfg.arith.task
                write_jsonl(sft_rows(problems, slip_fraction=task.slip_fraction, seed=task.seed),
                            data_path)
            if not (Path(cfg.data.tokenizer) / "tokenizer.json").is_file():
                build_tiny_tokenizer(cfg.data.tokenizer)
        save_json(cfg, out / "config.json")
    if dist.is_initialized():
        dist.barrier()


def build_batcher(cfg: SFTConfig, ps: Any):
    """Tokenized dataset -> resumable batcher of this DP rank; rank 0 tokenizes (and caches) first."""
    from megatron_ace.data.packing import SFTBatcher
    from megatron_ace.data.sft_dataset import build_sft_dataset
    from megatron_ace.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if ps.rank == 0:
        dataset = build_sft_dataset(cfg.data, tokenizer)
    if dist.is_initialized():
        dist.barrier()
    if ps.rank != 0:
        dataset = build_sft_dataset(cfg.data, tokenizer)
    batcher = SFTBatcher(dataset, cfg.batching, pad_id=tokenizer.pad_token_id,
                         lengths=dataset.lengths, rank=ps.dp_rank, world_size=ps.dp_size)
    return batcher, tokenizer


def plan_steps(cfg: SFTConfig, batcher: Any, ps: Any) -> tuple[int, int]:
    """(micro-batches per step on each DP rank, total optimizer steps)."""
    per_step = cfg.batching.micro_batch_size * ps.dp_size
    if cfg.schedule.global_batch_size % per_step:
        raise ValueError(f"schedule.global_batch_size ({cfg.schedule.global_batch_size}) must be "
                         f"a multiple of micro_batch_size x DP = {per_step}")
    num_micro = cfg.schedule.global_batch_size // per_step
    steps_per_epoch = batcher.micro_batches_per_epoch() // num_micro
    if steps_per_epoch < 1 and not cfg.schedule.max_steps:
        raise ValueError(f"the data gives fewer micro-batches per DP rank "
                         f"({batcher.micro_batches_per_epoch()}) than one step needs ({num_micro})")
    total = cfg.schedule.max_steps or steps_per_epoch * cfg.schedule.num_epochs
    return num_micro, total


def _maybe_resume(cfg: SFTConfig, ckpt_root: Path, trainer: Trainer, batcher: Any) -> int:
    from megatron_ace.train.state import data_state_for_dp, latest_checkpoint, load_training_state

    latest = latest_checkpoint(ckpt_root)
    if latest is None:  # resume=never with checkpoints was refused before the set-up
        return 0
    info = load_training_state(latest, model_chunks=trainer.opt.model_chunks, opt=trainer.opt,
                               sched=trainer.sched, ps=trainer.ps, seed=cfg.schedule.seed)
    batcher.load_state_dict(data_state_for_dp(info.data_state, trainer.ps.dp_size))
    return info.step


def _save(cfg: SFTConfig, ckpt_root: Path, trainer: Trainer, batcher: Any, step: int,
          *, final: bool = False) -> None:
    """Checkpoint `step`; interval saves may run in the background, the final one does not."""
    from megatron_ace.train.state import save_training_state

    save_training_state(ckpt_root, step=step, model_chunks=trainer.opt.model_chunks,
                        opt=trainer.opt, sched=trainer.sched, data_state=batcher.state_dict(),
                        ps=trainer.ps, keep_last=cfg.checkpoint.keep_last,
                        async_save=cfg.checkpoint.async_save and not final)


def _record(m: Any, batcher: Any) -> dict[str, Any]:
    return {"loss": m.loss, "lr": m.lr, "grad_norm": m.grad_norm, "tokens_per_s": m.tokens_per_s,
            "num_tokens": m.num_tokens, "num_loss_tokens": m.num_loss_tokens,
            "step_time_s": m.elapsed_s, "skipped": m.skipped,
            "epoch": batcher.state_dict()["epoch"], **m.extra}


def run_sft(cfg: SFTConfig, out: Path) -> dict[str, Any]:
    """Train per `cfg` into `out`; returns a summary (final step, last loss, HF dir)."""
    from megatron_ace.model.parallel import destroy_parallel, init_parallel
    from megatron_ace.train.metrics import MetricsLogger
    from megatron_ace.train.state import finish_saves, refuse_to_overwrite
    from megatron_ace.train.step import ModelOutput, masked_vocab_sft_loss, train_step

    refuse_to_overwrite(out / "checkpoints", cfg.checkpoint.resume)
    ps = init_parallel(cfg.parallel, seed=cfg.schedule.seed)
    try:
        prepare_inputs(cfg, out, ps)
        batcher, _ = build_batcher(cfg, ps)
        num_micro, total = plan_steps(cfg, batcher, ps)
        trainer = build_trainer(cfg.model.resolve(), ps, cfg.optim, total_steps=total,
                                dtype=resolve_dtype(cfg.schedule.precision),
                                hf_path=cfg.model.hf_path, mcore_path=cfg.model.mcore_path)
        ckpt_root = out / "checkpoints"
        step = _maybe_resume(cfg, ckpt_root, trainer, batcher)
        logger.info("training steps %d..%d, %d micro-batches per step per DP rank",
                    step + 1, total, num_micro)
        metrics = MetricsLogger(out, cfg.logging, rank=ps.rank, total_steps=total,
                                start_step=step, run_config=to_dict(cfg))
        last: Any = None
        loss_fn = masked_vocab_sft_loss(ps, trainer.model_cfg.vocab_size)
        try:
            while step < total:
                micro_batches = [batcher.next_batch() for _ in range(num_micro)]
                last = train_step(trainer.opt, trainer.sched, micro_batches, ps,
                                  loss_fn=loss_fn, output=ModelOutput.LOGITS)
                step += 1
                metrics.log(step, _record(last, batcher))
                interval = cfg.checkpoint.save_interval
                if interval and step % interval == 0 and step < total:
                    _save(cfg, ckpt_root, trainer, batcher, step)
        finally:
            metrics.close()
        if cfg.checkpoint.save_at_end and (last is not None or not (ckpt_root / f"step_{step:08d}").exists()):
            _save(cfg, ckpt_root, trainer, batcher, step, final=True)
        finish_saves()
        hf_dir = export_hf(trainer, out / "hf", tokenizer_dir=_tokenizer_dir(cfg)) \
            if cfg.checkpoint.export_hf else None
        return {"step": step, "loss": None if last is None else last.loss, "hf_dir": hf_dir}
    finally:
        destroy_parallel()


def _tokenizer_dir(cfg: SFTConfig) -> str | None:
    if Path(cfg.data.tokenizer).is_dir():
        return cfg.data.tokenizer
    from megatron_ace.data.tokenizer import QWEN25_NAME, bundled_qwen25_dir

    return str(bundled_qwen25_dir()) if cfg.data.tokenizer.lower() == QWEN25_NAME else None


def main(argv: list[str]) -> int:
    cfg, out = parse_args(list(argv))
    run_sft(cfg, out)
    return 0
