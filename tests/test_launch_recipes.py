"""The launcher's pure layer: recipe table, layout/rollout validation, and the node script.

No nemo-run and no torch here: launch.recipes and launch.job must import without either (the
launcher runs on login nodes). The node script is checked by running it under bash with a stub
interpreter that records the argv it receives, so quoting is tested by the shell itself.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from launch.job import (CPU_ENV, GPU_ENV, Device, JobSpec, layout_from_overrides, render_script,
                        resolve_job, trainer_args)
from launch.recipes import (CURRICULA, RECIPES, Command, ParallelLayout, RolloutPlacement,
                            get_curriculum, get_recipe)


def _job(**kw) -> JobSpec:
    base = dict(name="j", command=Command.SFT, trainer_recipe="sft-tiny", out_dir="/o", nodes=1,
                gpus_per_node=2, layout=ParallelLayout(tp=2))
    base.update(kw)
    return JobSpec(**base)


def test_pure_modules_import_without_torch_or_nemo_run():
    code = ("import sys, launch.recipes, launch.job, launch.submit; "
            "bad = [m for m in ('torch', 'nemo_run', 'megatron_ace') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.getcwd())


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_default_placement_is_valid(name):
    r = RECIPES[name]
    job = resolve_job(r, name=name, out_dir="/o", overrides=[])
    dp = job.data_parallel_size
    assert dp * r.layout.tp * r.layout.pp == r.nodes * (r.gpus_per_node - r.rollout_gpus)


def test_every_curriculum_stage_is_a_grpo_recipe():
    for name in CURRICULA:
        for stage in get_curriculum(name).stages:
            assert RECIPES[stage].command is Command.GRPO


def test_data_parallel_size_fills_remaining_ranks():
    assert ParallelLayout(tp=4, pp=2).data_parallel_size(nodes=4, trainer_gpus_per_node=8) == 4
    assert ParallelLayout(tp=2).data_parallel_size(nodes=1, trainer_gpus_per_node=6) == 3


@pytest.mark.parametrize("layout,nodes,gpus,field", [
    (ParallelLayout(tp=3), 1, 8, "parallel.tp"),             # tp does not divide a node
    (ParallelLayout(tp=16), 2, 8, "parallel.tp"),            # tp would span nodes
    (ParallelLayout(tp=2, pp=3), 1, 8, "parallel.pp"),       # tp*pp does not divide the world
])
def test_layout_that_does_not_tile_is_rejected_naming_the_field(layout, nodes, gpus, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        layout.data_parallel_size(nodes=nodes, trainer_gpus_per_node=gpus)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_layout_sizes_must_be_positive_integers(bad):
    with pytest.raises(ValueError, match="tp"):
        ParallelLayout(tp=bad)


def test_rollout_gpus_validation():
    grpo = dict(command=Command.GRPO, layout=ParallelLayout(tp=2), gpus_per_node=8)
    job = _job(**grpo, rollout=RolloutPlacement.SEPARATE, rollout_gpus=2)
    assert job.trainer_gpus_per_node == 6 and job.data_parallel_size == 3
    with pytest.raises(ValueError, match="rollout_gpus=8"):
        _job(**grpo, rollout=RolloutPlacement.SEPARATE, rollout_gpus=8)
    with pytest.raises(ValueError, match="separate"):
        _job(**grpo, rollout_gpus=2)  # colocated placement with reserved GPUs
    with pytest.raises(ValueError, match="GRPO"):
        _job(rollout=RolloutPlacement.SEPARATE, rollout_gpus=1)
    # Reserving 3 of 8 GPUs leaves 5: TP2 no longer tiles a node.
    with pytest.raises(ValueError, match="parallel.tp=2"):
        _job(**grpo, rollout=RolloutPlacement.SEPARATE, rollout_gpus=3)


def test_resolve_job_cli_choices_override_recipe_defaults():
    recipe = get_recipe("acereason-math-8k")
    job = resolve_job(recipe, name="x", out_dir="/o", overrides=["--parallel.tp=4"], nodes=2,
                      gpus_per_node=8, rollout_gpus=0)
    assert (job.nodes, job.layout.tp, job.rollout, job.rollout_gpus) == (
        2, 4, RolloutPlacement.COLOCATED, 0)
    reserved = resolve_job(recipe, name="x", out_dir="/o", overrides=[], rollout_gpus=2)
    assert (reserved.rollout, reserved.trainer_gpus_per_node) == (RolloutPlacement.SEPARATE, 6)
    assert job.time == recipe.time


def test_layout_overrides_are_read_and_not_duplicated():
    assert layout_from_overrides(ParallelLayout(tp=2), ["parallel.pp=2", "--optim.lr=1"]) == \
        ParallelLayout(tp=2, pp=2)
    with pytest.raises(ValueError, match="parallel.tp"):
        layout_from_overrides(ParallelLayout(), ["--parallel.tp=two"])
    args = trainer_args(_job(overrides=("--parallel.tp=2",)))
    assert [a for a in args if a.startswith("--parallel.tp")] == ["--parallel.tp=2"]
    assert "--parallel.pp=1" in args


def test_bad_job_fields_are_named():
    for kw, field in [(dict(time="4h"), "time"), (dict(nodes=0), "nodes"),
                      (dict(env=(("1BAD", "x"),)), "env"), (dict(name="a b"), "name"),
                      (dict(rdzv_port=0), "rdzv_port")]:
        with pytest.raises(ValueError, match=field):
            _job(**kw)


def test_get_recipe_errors_list_known_names():
    with pytest.raises(ValueError, match="sft-tiny"):
        get_recipe("nope")
    with pytest.raises(ValueError, match="runs `sft`"):
        get_recipe("sft-tiny", command=Command.GRPO)


def test_environment_defaults_per_device_and_user_overrides():
    assert _job().environment()["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert _job(device=Device.CPU).environment() == CPU_ENV
    env = _job(env=(("NCCL_DEBUG", "INFO"),)).environment()
    assert env["NCCL_DEBUG"] == "INFO" and set(GPU_ENV) <= set(env)


def _run_script(tmp_path, job_kwargs, env):
    """Run the rendered node script with a stub python; return the argv the stub saw."""
    record = tmp_path / "argv.json"
    stub = tmp_path / "python-stub"
    stub.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"json.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    script = render_script(_job(python=str(stub), workdir=str(tmp_path), **job_kwargs))
    subprocess.run(["bash", "-c", script], check=True, env={**os.environ, **env})
    return json.loads(record.read_text())


def test_single_node_script_runs_torchrun_standalone_with_exact_argv(tmp_path):
    tricky = "--data.prompt=it's a \"test\" $HOME"
    argv = _run_script(tmp_path, dict(overrides=(tricky,)), {})
    assert argv[:3] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=2" in argv
    i = argv.index("megatron_ace.cli")
    assert argv[i - 1] == "-m"
    assert argv[i + 1:] == ["sft", "--recipe", "sft-tiny", "--out", "/o", "--parallel.tp=2",
                            "--parallel.pp=1", tricky]


def test_multi_node_script_takes_rendezvous_from_slurm(tmp_path):
    env = {"SLURM_NODEID": "1", "SLURM_JOB_ID": "77", "MASTER_ADDR": "10.0.0.5 10.1.0.5"}
    argv = _run_script(tmp_path, dict(nodes=4, gpus_per_node=8, layout=ParallelLayout(tp=8)), env)
    assert "--nnodes=4" in argv and "--node-rank=1" in argv and "--rdzv-id=77" in argv
    # Only the first address of a multi-homed head node is used.
    assert "--rdzv-endpoint=10.0.0.5:29500" in argv
    assert "--nproc-per-node=8" in argv


def test_multi_node_script_outside_slurm_fails_clearly(tmp_path):
    script = render_script(_job(nodes=2, workdir=str(tmp_path)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "not in a Slurm job" in out.stderr
