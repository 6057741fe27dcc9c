"""The `ace` command: one entry point, each subcommand a module with `main(argv)`.

Subcommands are imported lazily so that `ace reward math` never pulls in megatron-core or vLLM.
"""

from __future__ import annotations

import importlib
import sys

from megatron_ace.utils import console

COMMANDS: dict[str, tuple[str, str]] = {
    "sft": ("megatron_ace.train.sft", "supervised fine-tuning on Megatron-Core"),
    "grpo": ("megatron_ace.train.grpo", "on-policy GRPO with vLLM rollouts"),
    "curriculum": ("megatron_ace.train.curriculum", "stage-wise GRPO length curriculum"),
    "eval": ("megatron_ace.eval.evaluate", "avg@k / pass@k evaluation with vLLM"),
    "reward": ("megatron_ace.rewards.cli", "score responses: `ace reward math|code`"),
    "demo": ("megatron_ace.train.demo", "the embedded end-to-end demo (SFT -> GRPO) on CPU"),
}


def _usage() -> str:
    lines = ["usage: ace <command> [options]", "", "commands:"]
    lines += [f"  {name:<12}{help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`ace <command> --help` explains each command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        console.result(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        console.error(f"ace: unknown command {name!r}\n\n{_usage()}")
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        result = module.main(rest)
    except console.UsageError as exc:
        console.error(f"ace {name}: error: {exc}")
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
