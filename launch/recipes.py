"""The launcher's recipe table: which trainer command a recipe runs, on how many nodes and GPUs,
with which parallel layout, and how curriculum stages chain.

Declarative on purpose: the launcher runs on a login node in a light environment without torch,
so it never imports `megatron_ace` (that would pull torch and megatron-core). The trainer owns
what a recipe *means* (model, data, optimiser); this table only says how to *place* it. A recipe
name here is passed unchanged to `ace <command> --recipe <trainer_recipe>`.

What it does not do: build nemo-run objects (see `launch.executors`) or render the job script
(see `launch.job`).
"""

from __future__ import annotations

import dataclasses
import enum


class Command(enum.Enum):
    """Trainer subcommands a job can run (`python -m megatron_ace.cli <value>`)."""

    SFT = "sft"
    GRPO = "grpo"


class RolloutPlacement(enum.Enum):
    """Where the vLLM rollout engine of a GRPO job runs."""

    COLOCATED = "colocated"
    """On the trainer's GPUs, time-shared (vLLM sleeps during the policy update)."""
    SEPARATE = "separate"
    """On `rollout_gpus` GPUs per node reserved for vLLM; the trainer uses the rest."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelLayout:
    """Model-parallel layout of the trainer; data parallelism fills the remaining ranks."""

    tp: int = 1
    """Tensor-parallel size; kept within one node (TP all-reduces need NVLink bandwidth)."""
    pp: int = 1
    """Pipeline-parallel size."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def data_parallel_size(self, *, nodes: int, trainer_gpus_per_node: int) -> int:
        """dp = world / (tp * pp); raises ValueError when the layout does not tile the GPUs."""
        world = nodes * trainer_gpus_per_node
        if trainer_gpus_per_node % self.tp != 0:
            raise ValueError(
                f"parallel.tp={self.tp} must divide the trainer GPUs per node "
                f"({trainer_gpus_per_node}): tensor parallelism stays inside a node"
            )
        if world % (self.tp * self.pp) != 0:
            raise ValueError(
                f"parallel.tp * parallel.pp = {self.tp} * {self.pp} = {self.tp * self.pp} does not "
                f"divide the trainer world size nodes * trainer_gpus_per_node = "
                f"{nodes} * {trainer_gpus_per_node} = {world}"
            )
        return world // (self.tp * self.pp)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LaunchRecipe:
    """How one trainer recipe is placed on a cluster by default (each field can be overridden)."""

    name: str
    """Name used on the launcher command line."""
    command: Command
    """Trainer subcommand the job runs."""
    trainer_recipe: str
    """Value passed to `--recipe` of the trainer command."""
    layout: ParallelLayout
    """Default parallel layout (overridden by `--parallel.tp=` / `--parallel.pp=` trainer overrides)."""
    nodes: int
    """Default number of nodes."""
    gpus_per_node: int
    """Default GPUs (processes, on CPU) per node, rollout GPUs included."""
    time: str = "04:00:00"
    """Default Slurm time limit (HH:MM:SS or D-HH:MM:SS)."""
    rollout: RolloutPlacement = RolloutPlacement.COLOCATED
    """Default rollout placement (GRPO only)."""
    rollout_gpus: int = 0
    """GPUs per node reserved for vLLM when `rollout` is SEPARATE."""

    def __post_init__(self) -> None:
        if not self.name or not self.trainer_recipe:
            raise ValueError("name and trainer_recipe must be non-empty")
        if self.nodes < 1:
            raise ValueError(f"recipe {self.name}: nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 1:
            raise ValueError(f"recipe {self.name}: gpus_per_node must be >= 1, got {self.gpus_per_node}")
        if self.command is not Command.GRPO and (
            self.rollout is not RolloutPlacement.COLOCATED or self.rollout_gpus
        ):
            raise ValueError(f"recipe {self.name}: rollout placement only applies to GRPO recipes")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Curriculum:
    """An ordered chain of GRPO recipes; each stage starts from the previous stage's output."""

    name: str
    """Name used on the launcher command line."""
    stages: tuple[str, ...]
    """Recipe names, in order; every one must be in RECIPES."""
    init_override: str = "model.hf_path"
    """Trainer config field that receives the previous stage's exported weights."""
    init_subdir: str = "hf"
    """Where, inside a stage's output directory, the trainer exports those weights."""

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError(f"curriculum {self.name}: stages must not be empty")


def _table(*recipes: LaunchRecipe) -> dict[str, LaunchRecipe]:
    return {r.name: r for r in recipes}


_SFT, _GRPO = Command.SFT, Command.GRPO


def _grpo_7b(name: str, layout: ParallelLayout) -> LaunchRecipe:
    return LaunchRecipe(name=name, command=_GRPO, trainer_recipe=name, layout=layout, nodes=4,
                        gpus_per_node=8, time="2-00:00:00")


# Full-size layouts for Qwen2.5-Math-7B on 8-GPU nodes (80 GB). TP grows with the response length
# because activation memory does: TP2 fits 8K-16K, TP4 24K, TP4 x PP2 32K (second-hand sizing
# from reference configs of the same model; re-measure on the first real run). vLLM is colocated
# by default; `--rollout-gpus K` reserves GPUs for it instead.
RECIPES: dict[str, LaunchRecipe] = _table(
    # Tiny recipes: 2 ranks on one machine (CPU, gloo), for tests and the demo.
    LaunchRecipe(name="sft-tiny", command=_SFT, trainer_recipe="sft-tiny",
                 layout=ParallelLayout(tp=2), nodes=1, gpus_per_node=2, time="00:15:00"),
    LaunchRecipe(name="grpo-tiny", command=_GRPO, trainer_recipe="grpo-tiny",
                 layout=ParallelLayout(tp=1), nodes=1, gpus_per_node=2, time="00:15:00"),
    LaunchRecipe(name="acereason-sft-7b", command=_SFT, trainer_recipe="acereason-sft-7b",
                 layout=ParallelLayout(tp=4), nodes=8, gpus_per_node=8, time="2-00:00:00"),
    _grpo_7b("acereason-math-8k", ParallelLayout(tp=2)),
    _grpo_7b("acereason-math-16k", ParallelLayout(tp=2)),
    _grpo_7b("acereason-math-24k", ParallelLayout(tp=4)),
    _grpo_7b("acereason-math-32k", ParallelLayout(tp=4, pp=2)),
    _grpo_7b("acereason-code-24k", ParallelLayout(tp=4)),
    _grpo_7b("acereason-code-32k", ParallelLayout(tp=4, pp=2)),
    _grpo_7b("acereason-math-32k-final", ParallelLayout(tp=4, pp=2)),
)

# The AceReason-Nemotron 1.1 stage-wise length curriculum: math 8K -> 16K -> 24K -> 32K, then
# code 24K -> 32K, then a final math 32K stage.
CURRICULA: dict[str, Curriculum] = {
    c.name: c
    for c in (
        Curriculum(name="acereason-1.1", stages=(
            "acereason-math-8k", "acereason-math-16k", "acereason-math-24k",
            "acereason-math-32k", "acereason-code-24k", "acereason-code-32k",
            "acereason-math-32k-final")),
        Curriculum(name="tiny", stages=("grpo-tiny", "grpo-tiny")),
    )
}


def get_recipe(name: str, *, command: Command | None = None) -> LaunchRecipe:
    """Look a recipe up by name (and check it runs `command`), with a helpful error."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    recipe = RECIPES[name]
    if command is not None and recipe.command is not command:
        same = sorted(r.name for r in RECIPES.values() if r.command is command)
        raise ValueError(
            f"recipe {name!r} runs `{recipe.command.value}`, not `{command.value}`; "
            f"{command.value} recipes: {', '.join(same)}"
        )
    return recipe


def get_curriculum(name: str) -> Curriculum:
    if name not in CURRICULA:
        raise ValueError(f"unknown curriculum {name!r}; known: {', '.join(sorted(CURRICULA))}")
    curriculum = CURRICULA[name]
    for stage in curriculum.stages:
        get_recipe(stage, command=Command.GRPO)
    return curriculum
