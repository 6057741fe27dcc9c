"""`ace reward math|code`: score a JSONL file of responses offline."""

from __future__ import annotations

import importlib

from megatron_ace.utils import console

SCORERS = {
    "math": ("megatron_ace.rewards.math_reward", "math answers graded with math-verify"),
    "code": ("megatron_ace.rewards.code_reward", "programs run against tests in the sandbox"),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SCORERS:
        lines = ["usage: ace reward {math,code} --input F.jsonl --output O.jsonl [options]", ""]
        lines += [f"  {k:<6}{h}" for k, (_, h) in SCORERS.items()]
        asked = bool(argv) and argv[0] in ("-h", "--help")
        (console.result if asked else console.error)("\n".join(lines))
        return 0 if asked else 2
    module = importlib.import_module(SCORERS[argv[0]][0])
    return int(module.cli_main(argv[1:]) or 0)
