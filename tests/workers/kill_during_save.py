"""Run the `ace` CLI, SIGKILLing the process while it saves the checkpoint of step N.

    python tests/workers/kill_during_save.py N sft --recipe ... (the `ace` arguments)

The kill comes after every shard of step N is on disk and before the checkpoint is committed
(meta.json + rename), the widest window a real crash during a save can hit.
"""

import os
import signal
import sys


def main(kill_step: int, argv: list[str]) -> int:
    from megatron_ace import cli
    from megatron_ace.train import state

    commit = state._commit

    def commit_or_die(tmp, final, *args, **kwargs):
        if final.name == f"step_{kill_step:08d}":
            os.kill(os.getpid(), signal.SIGKILL)
        return commit(tmp, final, *args, **kwargs)

    state._commit = commit_or_die
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2:]))
