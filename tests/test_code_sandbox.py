"""Attack the code sandbox property by property.

Each hostile program is written so that it would PASS (print the expected "escaped") if its
attack worked; every test asserts that it scored 0, that the host was not touched, and that
nothing the program started is still running (psutil) once the result is in.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from megatron_ace.rewards import code_reward as cr
from megatron_ace.rewards.code_reward import CodeRewardConfig, CodeRewardPool, CodeStatus, CodeTask
from megatron_ace.rewards.code_sandbox import SandboxConfig, SandboxUnavailableError, SandboxWorker, find_bwrap

pytestmark = pytest.mark.skipif(find_bwrap(SandboxConfig()) is None, reason="bubblewrap is not installed")

TIMEOUT_S = 3.0  # generous: an honest program must never time out on a busy machine
SANDBOX = SandboxConfig(timeout_s=TIMEOUT_S, memory_mb=256, max_output_bytes=1 << 20, max_processes=16,
                        outer_slack_s=3.0)


def _task(source: str, stdin: str = "", expected: str = "escaped") -> CodeTask:
    return CodeTask(source, (cr.TestCase(cr.TestKind.STDIN, input=stdin, expected=expected),))


def _sandbox_uids() -> set[int]:
    return {SANDBOX.uid - i for i in range(2)}


def _sandbox_processes() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["uids"]):
        if proc.info["uids"] is not None and proc.info["uids"].real in _sandbox_uids():
            found.append(proc)
    return found


def _live(processes: list[psutil.Process]) -> list[psutil.Process]:
    live = []
    for p in processes:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                live.append(p)
        except psutil.NoSuchProcess:
            pass  # exited between listing and looking
    return live


def _assert_nothing_left(pool: CodeRewardPool) -> None:
    """Only the sandboxes themselves (outer bwrap -> bwrap pid 1 -> worker) may be alive."""
    deadline = time.monotonic() + 10.0  # processes being reaped on a busy machine
    while True:
        allowed, trees_ok = set(), True
        for pid in pool.worker_pids():
            try:
                children = _live(psutil.Process(pid).children(recursive=True))
            except psutil.NoSuchProcess:
                children = []  # a worker being replaced
            trees_ok &= len(children) == 2
            allowed |= {pid, *(c.pid for c in children)}
        strays = _live([p for p in _sandbox_processes() if p.pid not in allowed])
        if trees_ok and not strays:
            return
        assert time.monotonic() < deadline, f"processes left running: {strays}, trees ok: {trees_ok}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def pool():
    with CodeRewardPool(CodeRewardConfig(sandbox=SANDBOX, num_workers=2)) as p:
        assert p.sandboxed
        yield p
    deadline = time.monotonic() + 5
    while _sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [(p.pid, p.cmdline()[:3]) for p in _sandbox_processes()]
    assert not left, f"sandbox processes outlived the pool: {left}"


def _score_zero(pool, task, *statuses):
    result = pool.submit(task).result(timeout=60)
    assert result.reward == 0.0, result
    if statuses:
        assert result.status in statuses, result
    _assert_nothing_left(pool)
    return result


def test_sanity_honest_program_passes(pool):
    result = pool.submit(_task("print(input()[::-1])", stdin="depacse\n")).result(timeout=30)
    assert result.reward == 1.0 and result.status is CodeStatus.PASSED, result


def test_fork_bomb(pool):
    start = time.monotonic()
    _score_zero(pool, _task("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"),
                CodeStatus.TIMEOUT)
    assert time.monotonic() - start < TIMEOUT_S + 5


def test_process_limit_holds(pool):
    source = (
        "import os, time\nn = 0\n"
        "for _ in range(200):\n"
        "    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
        "    if pid == 0:\n        time.sleep(60)\n        os._exit(0)\n    n += 1\n"
        "print('escaped' if n >= 200 else f'stopped at {n}')\n"
    )
    result = _score_zero(pool, _task(source), CodeStatus.WRONG_ANSWER)
    assert result.tests[0].status is CodeStatus.WRONG_ANSWER


@pytest.mark.parametrize("source", [
    "x = bytearray(4 << 30)\nprint('escaped')",
    "chunks = []\nfor _ in range(64):\n    chunks.append(bytearray(64 << 20))\nprint('escaped')",
])
def test_memory_hog(pool, source):
    _score_zero(pool, _task(source), CodeStatus.MEMORY_LIMIT)


@pytest.mark.parametrize("source", ["while True:\n    pass", "import time\ntime.sleep(3600)\nprint('escaped')"])
def test_infinite_loop_and_sleep(pool, source):
    start = time.monotonic()
    _score_zero(pool, _task(source), CodeStatus.TIMEOUT)
    assert time.monotonic() - start < TIMEOUT_S + 5


def test_cannot_write_outside_its_tmp(pool, tmp_path):
    planted = tmp_path / "planted.txt"
    planted.write_text("original")
    os.chmod(tmp_path, 0o777)  # even a world-writable host directory must stay out of reach
    before = sorted(os.listdir(tmp_path))
    source = (
        "import os\nwins = 0\n"
        f"for path in [{str(planted)!r}, {str(tmp_path / 'new.txt')!r}, '/usr/pwned', '/pwned', '/etc/pwned']:\n"
        "    try:\n        open(path, 'a').write('pwned')\n        wins += 1\n    except OSError:\n        pass\n"
        "print('escaped' if wins else 'contained')\n"
    )
    _score_zero(pool, _task(source), CodeStatus.WRONG_ANSWER)
    assert sorted(os.listdir(tmp_path)) == before and planted.read_text() == "original"
    assert not os.path.exists("/usr/pwned") and not os.path.exists("/pwned")


def test_cannot_read_root_or_other_users_files(pool, tmp_path):
    secret = uuid.uuid4().hex
    root_file = f"/root/.ace-sandbox-secret-{secret[:8]}"
    other_file = tmp_path / "secret.txt"  # world-readable file of another user, outside the sandbox
    other_file.write_text(secret)
    os.chmod(other_file, 0o644)
    os.chmod(tmp_path, 0o755)
    with open(root_file, "w") as handle:
        handle.write(secret)
    try:
        source = (
            "import os\nfound = ''\n"
            f"for path in [{root_file!r}, {str(other_file)!r}, '/etc/shadow', '/etc/passwd']:\n"
            "    try:\n        found += open(path).read()\n    except OSError:\n        pass\n"
            "for top in ['/root', '/work', '/home']:\n"
            "    try:\n        found += ' '.join(os.listdir(top))\n    except OSError:\n        pass\n"
            "print(found)\n"
        )
        result = _score_zero(pool, _task(source, expected=secret), CodeStatus.WRONG_ANSWER)
        assert result.tests[0].status is CodeStatus.WRONG_ANSWER
    finally:
        os.unlink(root_file)


def test_no_network_to_host_loopback(pool):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    source = (
        "import socket\ntry:\n"
        f"    s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        "    s.sendall(b'hello')\n    print('escaped')\nexcept OSError as e:\n    print('blocked', e)\n"
    )
    try:
        _score_zero(pool, _task(source), CodeStatus.WRONG_ANSWER)
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


def test_cannot_kill_host_processes(pool):
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        source = (
            "import os, signal\ntry:\n"
            f"    os.kill({victim.pid}, signal.SIGKILL)\n    print('escaped')\n"
            "except OSError as e:\n    print('denied', e)\n"
            "try:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass\n"
        )
        _score_zero(pool, _task(source), CodeStatus.WRONG_ANSWER, CodeStatus.RUNTIME_ERROR, CodeStatus.SANDBOX_ERROR)
        time.sleep(0.2)
        assert victim.poll() is None, "the host process was killed from inside the sandbox"
    finally:
        victim.kill()
        victim.wait()


def test_huge_output(pool):
    result = _score_zero(pool, _task("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"),
                         CodeStatus.RUNTIME_ERROR)
    assert "limit" in result.detail


def test_closing_stdout(pool):
    _score_zero(pool, _task("import os, sys\nsys.stdout.close()\nos.close(1)\nprint('escaped')\n"))
    # The worker survives it and keeps scoring.
    assert pool.submit(_task("print('fine')", expected="fine")).result(timeout=30).reward == 1.0


def test_double_forked_daemon_does_not_survive(pool):
    source = (
        "import os, time\n"
        "if os.fork() == 0:\n    os.setsid()\n"
        "    if os.fork() == 0:\n        time.sleep(3600)\n    os._exit(0)\n"
        "print('parent done')\n"
    )
    _score_zero(pool, _task(source), CodeStatus.WRONG_ANSWER)


def test_killing_its_worker_fails_only_that_sample(pool):
    before = set(pool.worker_pids())
    source = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('escaped')\n"
    _score_zero(pool, _task(source), CodeStatus.SANDBOX_ERROR, CodeStatus.WRONG_ANSWER)
    assert pool.submit(_task("print(1)", expected="1")).result(timeout=30).reward == 1.0
    for pid in before - set(pool.worker_pids()):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_frozen_worker_gets_outer_kill_and_is_replaced(pool):
    start = time.monotonic()
    source = "import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)\nimport time\ntime.sleep(3600)\n"
    _score_zero(pool, _task(source), CodeStatus.TIMEOUT)
    assert time.monotonic() - start < SANDBOX.timeout_s + SANDBOX.outer_slack_s + 5
    assert pool.submit(_task("print(2)", expected="2")).result(timeout=30).reward == 1.0


def test_submit_never_blocks(pool):
    start = time.monotonic()
    futures = [pool.submit(_task("while True: pass")) for _ in range(3)]
    assert time.monotonic() - start < 0.2
    assert [f.result(timeout=60).status for f in futures] == [CodeStatus.TIMEOUT] * 3


def test_refuses_without_bubblewrap():
    with pytest.raises(SandboxUnavailableError, match="allow_unsandboxed"):
        SandboxWorker(SandboxConfig(bwrap="/nonexistent/bwrap"))


def test_unsandboxed_mode_only_when_asked():
    config = CodeRewardConfig(sandbox=SandboxConfig(bwrap="/nonexistent/bwrap", allow_unsandboxed=True,
                                                    timeout_s=TIMEOUT_S), num_workers=1)
    with CodeRewardPool(config) as weak:
        assert not weak.sandboxed
        ok, looping = weak.score([_task("print(input())", "7\n", "7"), _task("while True: pass")])
    assert ok.reward == 1.0 and looping.status is CodeStatus.TIMEOUT


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxConfig(memory_mb=0)
    with pytest.raises(ValueError, match="uid"):
        SandboxConfig(uid=0)
    with pytest.raises(ValueError, match="num_workers"):
        CodeRewardConfig(num_workers=0)


@pytest.mark.parametrize("completion", ["    import sys\n    sys.exit(0)\n", "    import os\n    os._exit(0)\n",
                                        "    raise SystemExit\n"])
def test_exiting_before_check_does_not_pass(pool, completion):
    row = {"prompt": "def add(a, b):\n", "code": completion, "entry_point": "add",
           "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}
    result = pool.submit(row).result(timeout=30)
    assert result.reward == 0.0 and result.status is CodeStatus.RUNTIME_ERROR, result
    honest = pool.submit({**row, "code": "    return a + b\n"}).result(timeout=30)
    assert honest.reward == 1.0, honest
