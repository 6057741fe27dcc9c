"""What the demo reports about its GRPO arms: figures for `summary.json` and `curves.png`.

An arm is one `ace grpo` run from the demo's SFT model that differs from the other arms only in
its sampling-temperature policy (the entropy-targeted arm, and the fixed-temperature control).
`read_arm` collects an arm's per-step curves from its run directory (`metrics.jsonl` and
`config.json`); `arm_figures` turns them into the numbers the summary carries; `plot_arms`
draws every arm on one set of panels.

Conventions: "entropy" is the temperature-adjusted entropy the GRPO step measures (mean token
entropy of softmax(logits / T) over the step's response tokens, at the step's sampling
temperature T); "first" / "final" figures are means over the first / last `EDGE_STEPS` steps;
"second half" means the steps after half of the run.

What it does not do: run anything, or judge a run (the caller decides what is good enough).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

EDGE_STEPS = 10
"""Steps averaged for the "first" and "final" figures (single steps are noisy)."""
SMOOTH_STEPS = 10
"""Moving-average window of the bold curves in the picture (the raw curves are drawn faintly)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArmCurves:
    """One arm's per-step curves, read back from its run directory."""

    name: str
    """Label of the arm (the legend and the key in the summary)."""
    policy: str
    """Temperature policy of the run (`rollout.temperature.policy`)."""
    entropy_target: float | None
    """Target of the entropy-targeted policy; None under a fixed temperature."""
    steps: list[int]
    """GRPO steps with a policy-update record, in order."""
    reward: list[float]
    """Mean reward of each step's rollouts."""
    entropy: list[float]
    """Temperature-adjusted entropy measured at each step."""
    temperature: list[float]
    """Sampling temperature each step used."""
    response_length: list[float]
    """Mean response length (tokens) of each step's rollouts."""
    eval_steps: list[int]
    """Steps with a held-out evaluation (0: the SFT model, before any GRPO step)."""
    eval_accuracy: list[float]
    """Held-out accuracy at `eval_steps`."""


def _merged_records(metrics_path: Path) -> dict[int, dict[str, Any]]:
    """step -> every key logged for that step (a step's final evaluation is a line of its own;
    a line replayed after a resume overrides the keys it repeats)."""
    records: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(metrics_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{metrics_path}:{number}: not a metrics record ({exc})") from None
        records.setdefault(step, {}).update(record)
    return records


def read_arm(run_dir: str | Path) -> ArmCurves:
    """The curves of the `ace grpo` run in `run_dir` (its metrics.jsonl and config.json),
    named after its temperature policy."""
    run_dir = Path(run_dir)
    for required in ("metrics.jsonl", "config.json"):
        if not (run_dir / required).is_file():
            raise ValueError(f"{run_dir}: no {required}; is this an `ace grpo` run directory?")
    temperature_cfg = json.loads((run_dir / "config.json").read_text())["rollout"]["temperature"]
    policy = temperature_cfg["policy"]
    target = temperature_cfg["target_entropy"] if policy == "entropy_target" else None
    name = (f"entropy target {target:g}" if target is not None
            else f"{policy} T={temperature_cfg['initial_temperature']:g}")
    records = _merged_records(run_dir / "metrics.jsonl")
    steps = sorted(s for s, r in records.items() if "reward/mean" in r)
    evals = sorted(s for s, r in records.items() if "eval/accuracy" in r)

    def column(key: str) -> list[float]:
        return [float(records[s].get(key, math.nan)) for s in steps]

    return ArmCurves(
        name=name, policy=policy, entropy_target=target,
        steps=steps, reward=column("reward/mean"), entropy=column("entropy"),
        temperature=column("temperature/used"), response_length=column("rollout/response_length"),
        eval_steps=evals, eval_accuracy=[float(records[s]["eval/accuracy"]) for s in evals])


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _second_half(curves: ArmCurves, values: list[float]) -> list[float]:
    last = curves.steps[-1] if curves.steps else 0
    return [v for s, v in zip(curves.steps, values) if s > last / 2]


def arm_figures(curves: ArmCurves) -> dict[str, Any]:
    """The numbers the demo's summary gives for one arm (rounded for reading)."""
    if not curves.steps or not curves.eval_steps:
        raise ValueError(f"arm {curves.name}: no GRPO steps or no held-out evaluation recorded")
    first, final = slice(0, EDGE_STEPS), slice(-EDGE_STEPS, None)
    late_entropy = _mean(_second_half(curves, curves.entropy))
    late_temperature = _second_half(curves, curves.temperature)
    figures: dict[str, Any] = {
        "temperature_policy": curves.policy,
        "entropy_target": curves.entropy_target,
        "num_steps": len(curves.steps),
        "sft_accuracy": curves.eval_accuracy[0] if curves.eval_steps[0] == 0 else None,
        "accuracy": curves.eval_accuracy[-1],
        "entropy_first": _mean(curves.entropy[first]),
        "entropy_final": _mean(curves.entropy[final]),
        "entropy_second_half_mean": late_entropy,
        "entropy_second_half_rel_error": (abs(late_entropy / curves.entropy_target - 1)
                                          if curves.entropy_target else None),
        "temperature_min": min(curves.temperature),
        "temperature_max": max(curves.temperature),
        "temperature_final": curves.temperature[-1],
        "temperature_second_half_min": min(late_temperature),
        "temperature_second_half_max": max(late_temperature),
        "reward_first": _mean(curves.reward[first]),
        "reward_final": _mean(curves.reward[final]),
        "response_length_first": _mean(curves.response_length[first]),
        "response_length_final": _mean(curves.response_length[final]),
    }
    if figures["sft_accuracy"] is not None:
        figures["gain_points"] = 100 * (figures["accuracy"] - figures["sft_accuracy"])
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}


def _smooth(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        out.append(_mean(values[max(0, i - window + 1): i + 1]))
    return out


def _figure_lines(name: str, figures: dict[str, Any]) -> list[str]:
    lines = [name]
    if figures.get("gain_points") is not None:
        lines.append(f"  held-out {100 * figures['sft_accuracy']:.1f}% -> "
                     f"{100 * figures['accuracy']:.1f}% ({figures['gain_points']:+.1f} pts)")
    lines.append(f"  entropy {figures['entropy_first']:.3f} -> {figures['entropy_final']:.3f}"
                 f" (2nd half {figures['entropy_second_half_mean']:.3f})")
    lines.append(f"  T {figures['temperature_min']:.2f}..{figures['temperature_max']:.2f},"
                 f" length {figures['response_length_final']:.1f} tok")
    return lines


def plot_arms(arms: list[ArmCurves], png: str | Path) -> None:
    """Reward, entropy (with the target), temperature, response length and held-out accuracy
    per step, one colour per arm, plus the arms' figures as text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    panels = [("reward", "rollout reward (at the arm's temperature)"),
              ("entropy", "entropy (temperature-adjusted)"), ("temperature", "sampling temperature"),
              ("response_length", "response length (tokens)")]
    for colour, arm in zip(("tab:blue", "tab:orange", "tab:green", "tab:red"), arms):
        for ax, (field, _) in zip(axes.flat, panels):
            values = getattr(arm, field)
            ax.plot(arm.steps, values, color=colour, alpha=0.25, lw=0.8)
            ax.plot(arm.steps, _smooth(values, SMOOTH_STEPS), color=colour, lw=1.8, label=arm.name)
        if arm.entropy_target is not None:
            axes[0, 1].axhline(arm.entropy_target, color=colour, ls="--", lw=1.2,
                               label=f"target {arm.entropy_target:g}")
        axes[1, 1].plot(arm.eval_steps, [100 * a for a in arm.eval_accuracy], color=colour,
                        marker="o", label=arm.name)
    accuracy_title = "held-out accuracy (%), same sampling for every arm"
    for ax, (_, title) in zip(axes.flat, panels + [(None, accuracy_title)]):
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    text = axes[1, 2]
    text.axis("off")
    lines = [line for arm in arms for line in _figure_lines(arm.name, arm_figures(arm)) + [""]]
    text.text(0.0, 1.0, "\n".join(lines), va="top", family="monospace", fontsize=9,
              transform=text.transAxes)
    fig.suptitle(f"GRPO from the same SFT model; bold: {SMOOTH_STEPS}-step mean, faint: per step")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
