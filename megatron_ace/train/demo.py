"""`ace demo` / `make demo`: the whole pipeline on a CPU in minutes.

1. Generate a multi-step arithmetic task (answers in \\boxed{}) and a tiny ChatML tokenizer.
2. SFT a tiny Qwen2-shaped model from scratch on Megatron-Core (`ace sft --recipe sft-tiny`).
3. GRPO from the SFT export (`ace grpo --recipe grpo-tiny`): real vLLM rollouts, weight sync
   into the running engine every step, math-verify rewards, and AceReason's rule for the
   sampling temperature: each step's temperature is set so that the temperature-adjusted
   entropy of the rollouts stays near a target (`ENTROPY_TARGET`).
4. With `--compare-fixed`, the same GRPO phase again from the same SFT model, prompts and seeds
   at a fixed temperature of 1.0: the control arm.
5. Held-out accuracy of the SFT model and of each GRPO arm, with the same problems and the same
   sampling settings, and each arm's entropy / temperature / length figures in
   `runs/demo/summary.json`; `runs/demo/curves.png` plots every arm per step.

Each phase runs as its own `ace` process, as a user would run them.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from megatron_ace.train import demo_report
from megatron_ace.utils import console
from megatron_ace.utils.logging import get_logger

log = get_logger(__name__)

# Settings found by a sweep on 2 CPU cores (held-out accuracy, 256 problems x 4 samples at T=1):
# 30% of the SFT responses carry one arithmetic slip through to a wrong boxed answer (as
# distilled teacher data sometimes does); the SFT model then slips at about that rate when
# sampling, which the math reward sees and GRPO removes. On slip-free data GRPO found nothing to
# fix within the budget.
SFT_OVERRIDES = [
    "arith.task.slip_fraction=0.3", "arith.num_samples=4000", "schedule.num_epochs=12",
    "optim.warmup_steps=30", "checkpoint.save_interval=0",
]
ENTROPY_TARGET = 0.15
"""Temperature-adjusted entropy (nats per token) the demo's rollouts are steered to.

AceReason's 0.3 suits a 7B model writing long reasoning; the tiny model's tokens are digits and
operators in a fixed format, so its entropy is on another scale. Chosen from a temperature sweep
of the SFT model (the real-model controller test, tests/test_temperature_real_model.py, measures
it the same way): 0.05 / 0.17 / 0.30 at T = 0.3 / 1.0 / 1.5, the policy's lower bound, start and
upper bound. GRPO then lowers the entropy at a fixed T (0.18 -> 0.09 over 200 steps at T = 1),
so holding a target needs a rising temperature: with 0.15 the recorded run raised T from 0.87 to
1.43, near the 1.5 bound, and held the entropy at 0.150 on average over its second half; a
higher target needs a higher T sooner and would meet the bound within the 200 steps. Try
another: `ace demo --sft-from runs/demo/sft --out runs/tX --grpo
rollout.temperature.target_entropy=X`.
"""
TEMPERATURE_OVERRIDES = [
    "rollout.temperature.policy=entropy_target", f"rollout.temperature.target_entropy={ENTROPY_TARGET}",
    "rollout.temperature.initial_temperature=1.0", "rollout.temperature.min_temperature=0.3",
    "rollout.temperature.max_temperature=1.5",
    # The rule's entropy is that of every rollout of the step, the zero-variance groups that the
    # update skips included (~1/3 of the demo's rollouts). Those are measured from the engine's
    # logprobs of their sampled tokens (an unbiased estimate, no forward pass over them).
    "grpo.measure_filtered_rollouts=true", "grpo.filtered_entropy=sampled",
]
GRPO_OVERRIDES = [
    "rollout.prompts_per_step=32", "rollout.group_size=8", "rollout.max_response_tokens=64",
    # A step's 256 rollouts are packed into micro-batches of grpo-tiny's token budget (8192).
    "grpo.loss.clip_low=0.2", "grpo.loss.clip_high=0.2",
    "optim.lr=2e-4", "optim.min_lr=2e-4", "optim.adam_beta2=0.99", "steps=200",
    # SFT and GRPO models are evaluated alike: same 256 held-out problems, 4 samples each, T=1,
    # whatever temperature the rollouts used.
    "eval.temperature=1.0", "eval.num_samples=4", "eval.max_problems=256",
    "eval.max_response_tokens=48", "eval.every_steps=40",
    *TEMPERATURE_OVERRIDES,
]


class Arm(enum.Enum):
    """The GRPO runs of the demo; they differ only in the rollout temperature policy."""

    ENTROPY_TARGET = "entropy_target"
    FIXED = "fixed"


ARM_DIRS = {Arm.ENTROPY_TARGET: "grpo", Arm.FIXED: "grpo-fixed"}
ARM_OVERRIDES = {
    Arm.ENTROPY_TARGET: [],
    # The control: the temperature the entropy-targeted arm starts from, held for every step.
    Arm.FIXED: ["rollout.temperature.policy=fixed", "rollout.temperature.initial_temperature=1.0"],
}


def _run(argv: list[str], env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "megatron_ace.cli", *argv]
    log.info("$ ace %s", " ".join(argv))
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"demo: `ace {' '.join(argv)}` failed with exit code {proc.returncode}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ace demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    parser.add_argument("--compare-fixed", action="store_true",
                        help="also run the GRPO phase at a fixed temperature of 1.0 (the control "
                             "arm, in <out>/grpo-fixed) and report both arms")
    parser.add_argument("--sft-from", default="",
                        help="SFT run directory of an earlier demo (its <out>/sft) to start GRPO "
                             "from, instead of training one (e.g. to compare GRPO settings)")
    parser.add_argument("--sft", nargs="*", default=[], help="extra overrides for the SFT phase")
    parser.add_argument("--grpo", nargs="*", default=[],
                        help="extra overrides for the GRPO phase (every arm)")
    return parser


def _env() -> dict[str, str]:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "2",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    # The phases must run this copy of the package, also from a checkout that is not installed.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _sft_phase(args: argparse.Namespace, out: Path, env: dict[str, str]) -> Path:
    """The SFT run directory GRPO starts from: trained now, or an earlier one (--sft-from)."""
    if not args.sft_from:
        sft_dir = out / "sft"
        _run(["sft", "--recipe", "sft-tiny", "--out", str(sft_dir), *SFT_OVERRIDES, *args.sft], env)
        return sft_dir
    sft_dir = Path(args.sft_from).resolve()
    if args.sft:
        raise ValueError("--sft: overrides cannot apply to an existing SFT run (--sft-from)")
    for required in ("hf/config.json", "tokenizer", "config.json"):
        if not (sft_dir / required).exists():
            raise ValueError(f"--sft-from: {sft_dir} has no {required}; pass a demo's <out>/sft")
    return sft_dir


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    out = Path(args.out).resolve()
    env = _env()
    start = time.perf_counter()
    sft_dir = _sft_phase(args, out, env)
    sft_seconds = time.perf_counter() - start
    _write_prompt_files(sft_dir, out / "data")
    arms = [Arm.ENTROPY_TARGET] + ([Arm.FIXED] if args.compare_fixed else [])
    grpo_common = [f"model.hf_path={sft_dir / 'hf'}", f"data.tokenizer={sft_dir / 'tokenizer'}",
                   f"data.train_path={out / 'data' / 'rl_prompts.jsonl'}",
                   f"data.heldout_path={out / 'data' / 'heldout.jsonl'}", *GRPO_OVERRIDES]
    seconds = {}
    for arm in arms:
        arm_start = time.perf_counter()
        _run(["grpo", "--recipe", "grpo-tiny", "--out", str(out / ARM_DIRS[arm]), *grpo_common,
              *ARM_OVERRIDES[arm], *args.grpo], env)
        seconds[arm] = time.perf_counter() - arm_start
    curves = {arm: demo_report.read_arm(out / ARM_DIRS[arm]) for arm in arms}
    summary = _summary(out, curves, seconds)
    summary.update(wall_seconds=round(time.perf_counter() - start, 1),
                   sft_seconds=round(sft_seconds, 1))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    demo_report.plot_arms(list(curves.values()), out / "curves.png")
    console.result(json.dumps(summary, indent=2))
    log.info("curves: %s", out / "curves.png")
    return 0


def _summary(out: Path, curves: dict[Arm, demo_report.ArmCurves],
             seconds: dict[Arm, float]) -> dict:
    """The entropy-targeted arm's headline numbers, then every arm's figures under `arms`."""
    arms = {}
    for arm, arm_curves in curves.items():
        arms[arm.value] = {"run_dir": str(out / ARM_DIRS[arm]), **demo_report.arm_figures(arm_curves),
                           "seconds": round(seconds[arm], 1)}
    main_arm = arms[Arm.ENTROPY_TARGET.value]
    result = json.loads((out / ARM_DIRS[Arm.ENTROPY_TARGET] / "summary.json").read_text())
    return {
        "sft_accuracy": main_arm["sft_accuracy"],
        "grpo_accuracy": main_arm["accuracy"],
        "gain_points": round(main_arm["gain_points"], 1),
        "num_heldout": int(result["final"]["eval/num_problems"]),
        "temperature_policy": main_arm["temperature_policy"],
        "entropy_target": main_arm["entropy_target"],
        "entropy_second_half_mean": main_arm["entropy_second_half_mean"],
        "temperature_min": main_arm["temperature_min"],
        "temperature_max": main_arm["temperature_max"],
        "grpo_seconds": main_arm["seconds"],
        "arms": arms,
    }


def _write_prompt_files(sft_dir: Path, data_dir: Path) -> None:
    """RL prompts from the SFT task's train split, and held-out problems neither phase saw."""
    from megatron_ace.data.arith_task import (
        ArithTaskConfig,
        Split,
        generate_problems,
        prompt_rows,
        write_jsonl,
    )

    sft_cfg = json.loads((sft_dir / "config.json").read_text())
    task = ArithTaskConfig(**{k: tuple(v) if isinstance(v, list) else v
                              for k, v in sft_cfg["arith"]["task"].items()})
    write_jsonl(prompt_rows(generate_problems(task, Split.TRAIN, 2000)), data_dir / "rl_prompts.jsonl")
    write_jsonl(prompt_rows(generate_problems(task, Split.HELDOUT, 256)), data_dir / "heldout.jsonl")
