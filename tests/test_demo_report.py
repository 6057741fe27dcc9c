"""The demo's arm report: curves read back from a GRPO run directory, figures, the picture.

The run directories are written the way `ace grpo` writes them: `config.json` through
`save_json` of a real recipe with the demo's overrides, `metrics.jsonl` through `MetricsLogger`
(a training record per step, a held-out evaluation at step 0 and in its own line after the
last step, as `run_grpo` logs them). The figures are checked against sums computed here from
the same series.
"""

from __future__ import annotations

import json
import math

import pytest

from megatron_ace.config.base import apply_overrides, save_json
from megatron_ace.train import demo, demo_report
from megatron_ace.train.config import LoggingConfig
from megatron_ace.train.grpo_config import recipe
from megatron_ace.train.metrics import MetricsLogger

NUM_STEPS = 30


def _write_run(run_dir, overrides, entropy, temperature, accuracy):
    cfg = apply_overrides(recipe("grpo-tiny"), ["data.train_path=p.jsonl", *overrides])
    save_json(cfg, run_dir / "config.json")
    logger = MetricsLogger(run_dir, LoggingConfig(progress_bar=False, tensorboard=False), rank=0,
                           total_steps=NUM_STEPS)
    logger.log(0, {"eval/accuracy": accuracy[0], "eval/num_problems": 256.0, "step": 0})
    for step in range(1, NUM_STEPS + 1):
        logger.log(step, {"reward/mean": 0.4 + step / 100, "entropy": entropy(step),
                          "temperature/used": temperature(step),
                          "rollout/response_length": 14.0 - step / 30})
    logger.log(NUM_STEPS, {"eval/accuracy": accuracy[1], "eval/num_problems": 256.0,
                           "step": NUM_STEPS})
    logger.close()
    return run_dir


def test_arm_curves_and_figures(tmp_path):
    run = _write_run(tmp_path, demo.GRPO_OVERRIDES, entropy=lambda s: 0.1 + s / 300,
                     temperature=lambda s: 0.9 + s / 100, accuracy=(0.35, 0.5))
    curves = demo_report.read_arm(run)
    assert curves.policy == "entropy_target" and curves.entropy_target == demo.ENTROPY_TARGET
    # The final evaluation's own line does not hide the last training record.
    assert curves.steps == list(range(1, NUM_STEPS + 1)) and curves.eval_steps == [0, NUM_STEPS]
    assert curves.temperature[-1] == pytest.approx(0.9 + NUM_STEPS / 100)
    figures = demo_report.arm_figures(curves)
    late = [0.1 + s / 300 for s in range(NUM_STEPS // 2 + 1, NUM_STEPS + 1)]
    assert figures["entropy_second_half_mean"] == pytest.approx(sum(late) / len(late), abs=1e-4)
    assert figures["entropy_second_half_rel_error"] == pytest.approx(
        abs(sum(late) / len(late) / demo.ENTROPY_TARGET - 1), abs=1e-4)
    final = [0.1 + s / 300 for s in range(NUM_STEPS - 9, NUM_STEPS + 1)]
    assert figures["entropy_final"] == pytest.approx(sum(final) / 10, abs=1e-4)
    assert (figures["temperature_min"], figures["temperature_max"]) == (0.91, 1.2)
    assert figures["temperature_second_half_min"] == pytest.approx(0.9 + 16 / 100)
    assert (figures["sft_accuracy"], figures["accuracy"]) == (0.35, 0.5)
    assert figures["gain_points"] == pytest.approx(15.0)
    json.dumps(figures, allow_nan=False)


def test_fixed_arm_has_no_target_and_the_picture_is_written(tmp_path):
    fixed = _write_run(tmp_path / "fixed", [*demo.GRPO_OVERRIDES, *demo.ARM_OVERRIDES[demo.Arm.FIXED]],
                       entropy=lambda s: 0.18 - s / 400, temperature=lambda s: 1.0,
                       accuracy=(0.35, 0.45))
    target = _write_run(tmp_path / "target", demo.GRPO_OVERRIDES, entropy=lambda s: 0.15,
                        temperature=lambda s: 1.0 + s / 100, accuracy=(0.35, 0.5))
    arms = [demo_report.read_arm(target), demo_report.read_arm(fixed)]
    assert arms[1].policy == "fixed" and arms[1].entropy_target is None
    figures = demo_report.arm_figures(arms[1])
    assert figures["entropy_second_half_rel_error"] is None
    assert figures["temperature_min"] == figures["temperature_max"] == 1.0
    assert not math.isnan(figures["entropy_final"])
    png = tmp_path / "curves.png"
    demo_report.plot_arms(arms, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_run_directories_are_named(tmp_path):
    with pytest.raises(ValueError, match="config.json|metrics.jsonl"):
        demo_report.read_arm(tmp_path)
    run = _write_run(tmp_path / "run", demo.GRPO_OVERRIDES, entropy=lambda s: 0.1,
                     temperature=lambda s: 1.0, accuracy=(0.3, 0.3))
    with open(run / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:\d+"):
        demo_report.read_arm(run)


def test_sft_from_must_be_an_sft_run(tmp_path):
    with pytest.raises(ValueError, match="--sft-from"):
        demo.main(["--out", str(tmp_path / "demo"), "--sft-from", str(tmp_path)])
