"""Curriculum recipes: the AceReason stage shape, the ablations, overrides, and validation."""

import subprocess
import sys

import pytest
from dist_utils import REPO

from megatron_ace.algorithms.temperature import TemperaturePolicyKind
from megatron_ace.train.curriculum import apply_curriculum_overrides
from megatron_ace.train.curriculum_config import (
    CURRICULA,
    OptimizerCarry,
    StageConfig,
    curriculum_recipe,
    run_steps,
    stage_grpo_config,
    until_plateau,
)
from megatron_ace.train.grpo_config import Domain


def test_acereason_stage_shape():
    cfg = curriculum_recipe("acereason-7b")
    shape = [(s.domain, s.max_response_tokens, s.overlong_filter) for s in cfg.stages]
    assert shape == [(Domain.MATH, 8192, True), (Domain.MATH, 16384, True),
                     (Domain.MATH, 24576, False), (Domain.MATH, 32768, False),
                     (Domain.CODE, 24576, False), (Domain.CODE, 32768, False),
                     (Domain.MATH, 32768, False)]
    assert all(s.prompts_per_step == 128 and s.group_size in (8, 16) for s in cfg.stages)
    assert [s.drop_solved_prompts for s in cfg.stages] == [s.domain is Domain.CODE for s in cfg.stages]
    assert cfg.stages[-1].stop.plateau_metric == "reward/mean"
    assert all(s.temperature.target_entropy == 0.3 for s in cfg.stages)


def test_stage_config_is_derived_from_the_base():
    cfg = curriculum_recipe("acereason-7b")
    g = stage_grpo_config(cfg.base, cfg.stages[4])
    assert g.data.domain is Domain.CODE and g.rollout.max_response_tokens == 24576
    assert g.grpo.overlong_filter is False and g.rollout.group_size == cfg.stages[4].group_size
    assert g.grpo.loss.clip_high == 0.28 and g.steps == cfg.stages[4].stop.max_steps
    assert g.model == cfg.base.model and g.optim == cfg.base.optim  # shared


def test_ablations_differ_from_the_recipe_only_where_named():
    base = curriculum_recipe("acereason-7b")
    skip = curriculum_recipe("acereason-7b-skip-8k")
    assert [s.name for s in skip.stages] == [s.name for s in base.stages[1:]]
    assert skip.stages[0].max_response_tokens == 16384
    over = curriculum_recipe("acereason-7b-overlong-on")
    assert all(s.overlong_filter for s in over.stages)
    for target in (0.2, 0.3, 0.4):
        sweep = curriculum_recipe(f"acereason-7b-entropy-{target}")
        assert {s.temperature.target_entropy for s in sweep.stages} == {target}
        assert all(s.temperature.policy is TemperaturePolicyKind.ENTROPY_TARGET for s in sweep.stages)


def test_tiny_curriculum_has_the_same_shape():
    cfg = curriculum_recipe("tiny-curriculum")
    assert [s.name for s in cfg.stages] == ["math-short", "math-long", "code", "math-final"]
    lengths = [s.max_response_tokens for s in cfg.stages]
    assert lengths == sorted(lengths)
    assert [s.overlong_filter for s in cfg.stages] == [True, True, False, False]
    assert cfg.stages[2].drop_solved_prompts and cfg.stages[2].optimizer is OptimizerCarry.RESET
    assert cfg.stages[0].temperature.policy is TemperaturePolicyKind.FIXED


def test_overrides_reach_base_and_named_stage():
    cfg = apply_curriculum_overrides(curriculum_recipe("tiny-curriculum"), [
        "optim.lr=0.5", "stage.code.group_size=2", "stage.math-final.stop.max_steps=9",
        "stage.math-short.temperature.initial_temperature=0.7"])
    assert cfg.base.optim.lr == 0.5
    assert cfg.stages[2].group_size == 2 and cfg.stages[1].group_size == 4
    assert cfg.stages[3].stop.max_steps == 9
    assert cfg.stages[0].temperature.initial_temperature == 0.7
    with pytest.raises(ValueError, match="no stage"):
        apply_curriculum_overrides(cfg, ["stage.nope.group_size=2"])
    with pytest.raises(ValueError, match="group_size"):
        apply_curriculum_overrides(cfg, ["stage.code.group_size=0"])


def test_validation_names_the_field():
    stage = curriculum_recipe("tiny-curriculum").stages[0]
    with pytest.raises(ValueError, match="max_steps"):
        run_steps(0)
    with pytest.raises(ValueError, match="patience"):
        until_plateau("r", patience=0, min_delta=0.0, max_steps=3)
    with pytest.raises(ValueError, match="solved_min_accuracy"):
        StageConfig(**{**stage.__dict__, "solved_min_accuracy": 0.0})
    with pytest.raises(ValueError, match="clip_low"):
        StageConfig(**{**stage.__dict__, "clip_low": 1.5})
    cfg = curriculum_recipe("tiny-curriculum")
    with pytest.raises(ValueError, match="unique"):
        type(cfg)(base=cfg.base, stages=[cfg.stages[0], cfg.stages[0]])
    with pytest.raises(ValueError, match="unknown curriculum recipe"):
        curriculum_recipe("nope")


def test_print_config_prints_the_stage_table():
    for name in ("acereason-7b", "tiny-curriculum"):
        proc = subprocess.run([sys.executable, "-m", "megatron_ace.cli", "curriculum", "--recipe",
                               name, "--print-config"], capture_output=True, text=True, cwd=REPO,
                              timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        cfg = CURRICULA[name][0]()
        lines = proc.stdout.splitlines()
        for stage in cfg.stages:
            row = next(ln for ln in lines if f" {stage.name} " in ln)
            assert str(stage.max_response_tokens) in row and stage.domain.value in row
