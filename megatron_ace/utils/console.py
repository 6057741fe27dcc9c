"""What the `ace` commands hand back to the person or script that ran them.

A command's result (a results table, a JSON summary, its usage text) goes to stdout, where a
caller can pipe or parse it; a command-line error goes to stderr. Progress and status go through
the logger (`megatron_ace.utils.logging`), never through here: library code does not print.
"""

from __future__ import annotations

import sys


def result(text: str) -> None:
    """Write a command's result to stdout (a trailing newline is added when missing)."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def error(text: str) -> None:
    """Write a command-line error to stderr."""
    sys.stderr.write(text if text.endswith("\n") else text + "\n")


class UsageError(ValueError):
    """A run refused for how it was asked for (not a failure mid-run): the `ace` command prints
    the message alone, without a traceback, and exits with status 2, as for a bad option."""
