"""Run untrusted Python programs in long-lived bubblewrap sandboxes, one fork per test.

What it does: `SandboxWorker` starts one sandbox, `setpriv` (drop to an unprivileged uid, so
that RLIMIT_NPROC holds; it is ignored for uid 0) -> `bwrap` -> a system `python3` running this
very file as its worker loop. The sandbox has its own user, PID, network, IPC, UTS and cgroup
namespaces (no network at all: only a down loopback), a read-only minimal filesystem (/usr, the
Python install when it lives elsewhere, /etc/ld.so.cache; never the whole root, /root or the
repository), a private size-capped tmpfs on /tmp and /dev/shm, `--die-with-parent` and
`--new-session`. For each test the worker forks a child (no interpreter start-up per test) that
sets CPU-time, address-space, file-size, open-file, process-count and core-size limits, runs
the program with stdin/stdout/stderr redirected to files, and is killed at its wall-clock
limit. After every test the worker SIGKILLs every other process in the sandbox's PID
namespace (double-forked daemons included), removes System V shared memory and wipes /tmp and
/dev/shm, so nothing leaks into the next test. The worker is non-dumpable, so a test cannot
open its descriptors or memory through /proc; requests and replies travel over two inherited
pipe descriptors that the sandbox's init process (bwrap, pid 1) closes.

What it does NOT protect against:
- kernel exploits: the kernel is shared, there is no seccomp filter and no VM boundary;
- memory outside RLIMIT_AS: no cgroup memory limit, so System V shared memory and tmpfs files
  (capped by the tmpfs size) count against the host until the test ends and is cleaned up;
- CPU and I/O contention with the host (no cgroup CPU quota or I/O limit), and timing side
  channels;
- a test killing its own sandbox worker (same uid inside the sandbox): the test fails, the
  worker is replaced;
- tampering with the test harness from inside the program: HumanEval-style `check` programs run
  in the same interpreter as the candidate, so a program written to subvert the harness
  in-process is out of scope. For stdin/stdout and call-based tests the expected outputs never
  enter the sandbox (outputs are compared outside it), so those cannot be forged this way;
- anything in `allow_unsandboxed` mode: there only the rlimits and the wall-clock kill apply,
  the program runs as the calling user and can read, write and reach whatever that user can.

This file is stdlib-only on purpose: the worker side runs under a system Python without the
project's virtual environment (the source is passed with `python3 -I -c`).
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# Not megatron_ace.utils.logging.get_logger: this file must import under a bare system Python.
# Records still reach the project's handler, which is installed on the "megatron_ace" logger.
_log = logging.getLogger("megatron_ace.rewards.code_sandbox")

# Outcomes the worker reports for one test (the reward side maps them to its status Enum).
OK, COMPILE_ERROR, RUNTIME_ERROR, TIMEOUT, MEMORY_LIMIT, OUTPUT_LIMIT, SANDBOX_ERROR = (
    "ok", "compile_error", "runtime_error", "timeout", "memory_limit", "output_limit", "sandbox_error",
)
# Modes of running a program: read stdin/write stdout; call a function; run a test script.
MODE_STDIN, MODE_CALL, MODE_SCRIPT = "stdin", "call", "script"
# Processes the sandbox itself holds under its uid (outer bwrap, bwrap as pid 1, the worker).
_SANDBOX_OWN_PROCESSES = 3
_STDERR_TAIL = 2000

# Imports made available to every program, as LiveCodeBench's runner does; pre-imported in
# the worker so that the forked children find them loaded.
PRELUDE = (
    "import sys, os, math, re, string, heapq, bisect, itertools, functools, collections, random\n"
    "from typing import *\nfrom collections import *\nfrom heapq import *\nfrom bisect import *\n"
    "from itertools import *\nfrom functools import *\nfrom math import *\n"
)


class SandboxUnavailableError(RuntimeError):
    """bubblewrap (or the sandbox Python) is missing or cannot start, and unsandboxed runs are not allowed."""


class SandboxDiedError(RuntimeError):
    """The sandbox worker exited or broke the protocol (a test may have killed it)."""


class SandboxTimeoutError(TimeoutError):
    """The sandbox worker did not answer within the outer wall-clock limit."""


@dataclass(frozen=True, kw_only=True)
class SandboxConfig:
    timeout_s: float = 6.0
    """Wall-clock limit of one test, seconds (the CPU-time limit is this, rounded up)."""
    memory_mb: int = 1024
    """Address-space limit (RLIMIT_AS) of one test, MiB."""
    max_output_bytes: int = 8 << 20
    """Largest file a test may write, stdout included (RLIMIT_FSIZE), bytes."""
    max_open_files: int = 64
    """Open file descriptors per test process (RLIMIT_NOFILE)."""
    max_processes: int = 32
    """Processes/threads a test may run at once besides the sandbox's own (RLIMIT_NPROC)."""
    tmp_size_mb: int = 64
    """Size of the private tmpfs on /tmp (and again on /dev/shm), MiB."""
    outer_slack_s: float = 10.0
    """Extra seconds past `timeout_s` before the host kills a silent sandbox outright."""
    uid: int = 65534
    """Unprivileged uid (and gid) the sandbox runs as when started by root; worker i uses uid - i."""
    python: str | None = None
    """Interpreter inside the sandbox; None = /usr/bin/python3 if present, else the running base install."""
    bwrap: str = "bwrap"
    """bubblewrap executable (name on PATH or a path)."""
    allow_unsandboxed: bool = False
    """If bubblewrap is missing, run programs WITHOUT isolation (rlimits and timeouts only)."""

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s: must be > 0, got {self.timeout_s!r}")
        for name in ("memory_mb", "max_output_bytes", "max_open_files", "max_processes", "tmp_size_mb"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {getattr(self, name)!r}")
        if self.max_open_files < 8:
            raise ValueError(f"max_open_files: must be >= 8 (the interpreter needs a few), got {self.max_open_files}")
        if not self.outer_slack_s > 0:
            raise ValueError(f"outer_slack_s: must be > 0, got {self.outer_slack_s!r}")
        if not 1000 <= self.uid <= 65534:
            raise ValueError(f"uid: must be an unprivileged uid in [1000, 65534], got {self.uid!r}")


def find_system_python() -> str:
    """/usr/bin/python3 when present (exists on fresh machines), else the running interpreter's base install."""
    if os.access("/usr/bin/python3", os.X_OK):
        return "/usr/bin/python3"
    base = os.path.join(sys.base_prefix, "bin", f"python{sys.version_info.major}.{sys.version_info.minor}")
    return base if os.access(base, os.X_OK) else os.path.realpath(sys.executable)


def find_bwrap(config: SandboxConfig) -> str | None:
    """Path of the bubblewrap executable, or None when it is not installed."""
    return shutil.which(config.bwrap)


def _bwrap_args(config: SandboxConfig, python: str) -> list[str]:
    """bubblewrap options: fresh namespaces, read-only minimal filesystem, private tmpfs."""
    size = str(config.tmp_size_mb << 20)
    args = [
        "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
        "--hostname", "sandbox", "--ro-bind", "/usr", "/usr",
        "--proc", "/proc", "--dev", "/dev",
        "--size", size, "--tmpfs", "/tmp", "--size", size, "--tmpfs", "/dev/shm",
        "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache",
        "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
        "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONDONTWRITEBYTECODE", "1", "--chdir", "/tmp",
    ]
    # Merged-/usr systems have /bin, /lib... as symlinks into /usr; older ones have directories.
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    real = os.path.realpath(python)
    if not real.startswith("/usr/"):
        # An interpreter outside /usr (pyenv, conda): expose just its install prefix, read-only.
        prefix = os.path.dirname(os.path.dirname(real))
        args += ["--ro-bind", prefix, prefix]
    # Last: bwrap's own root tmpfs (where /etc, /proc... mount points live) becomes read-only too.
    return args + ["--remount-ro", "/"]


def sandbox_command(config: SandboxConfig, *, index: int, fds: tuple[int, int]) -> tuple[list[str], bool]:
    """The argv that starts worker `index`, and whether it is sandboxed.

    Raises SandboxUnavailableError when bubblewrap is missing and unsandboxed runs are not allowed.
    """
    python = config.python or find_system_python()
    with open(__file__, encoding="utf-8") as handle:
        source = handle.read()
    worker = [python, "-I", "-c", source, "--worker", str(fds[0]), str(fds[1])]
    bwrap = find_bwrap(config)
    if bwrap is None:
        if not config.allow_unsandboxed:
            raise SandboxUnavailableError(
                f"bubblewrap ({config.bwrap!r}) was not found, so untrusted code cannot be isolated. Install it "
                "(Debian/Ubuntu: apt-get install -y bubblewrap), or explicitly accept running programs WITHOUT "
                "isolation with SandboxConfig(allow_unsandboxed=True) / --allow-unsandboxed."
            )
        _log.warning("bubblewrap not found: running untrusted programs WITHOUT a sandbox (allow_unsandboxed)")
        return worker + ["--unsandboxed"], False
    command = [bwrap, *_bwrap_args(config, python), "--", *worker]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise SandboxUnavailableError("setpriv (util-linux) is needed to drop root before bwrap")
        uid = str(config.uid - index)
        command = [setpriv, "--reuid", uid, "--regid", uid, "--clear-groups", "--", *command]
    return command, True


# ----------------------------------------------------------------------------- host side
def _send(fd: int, message: dict) -> None:
    data = json.dumps(message).encode("utf-8")
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def _recv(fd: int, deadline: float | None) -> dict | None:
    """One framed message from `fd`; None at EOF. Raises TimeoutError past `deadline`."""
    def read_exact(n: int) -> bytes | None:
        chunks, got = [], 0
        while got < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise TimeoutError
            chunk = os.read(fd, min(n - got, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    header = read_exact(4)
    if header is None:
        return None
    body = read_exact(struct.unpack(">I", header)[0])
    return None if body is None else json.loads(body.decode("utf-8"))


class SandboxWorker:
    """One long-lived sandbox (host side). Not thread-safe: one caller at a time.

    `run(request)` sends one test and returns the worker's reply; it raises SandboxTimeoutError
    (the sandbox was killed) or SandboxDiedError; either way, call `restart()` before reusing it.
    """

    def __init__(self, config: SandboxConfig, *, index: int = 0, start_timeout_s: float = 30.0) -> None:
        self.config = config
        self.index = index
        self._start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None
        self.sandboxed = False
        self.start()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        try:
            command, self.sandboxed = sandbox_command(self.config, index=self.index, fds=(to_child_r, from_child_w))
        except BaseException:
            for fd in (to_child_r, to_child_w, from_child_r, from_child_w):
                os.close(fd)
            raise
        # stdout/stderr go to a private file: bwrap's pid 1 keeps them open and a test can
        # reach them through /proc/1/fd, so they must never be the protocol channel.
        self._stderr = tempfile.TemporaryFile()
        cwd = tempfile.gettempdir() if self.sandboxed else None
        self._proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr,
            pass_fds=(to_child_r, from_child_w), env=self._env(), cwd=cwd, start_new_session=True,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._to, self._from = to_child_w, from_child_r
        try:
            hello = _recv(self._from, time.monotonic() + self._start_timeout_s)
        except TimeoutError:
            hello = None
        if not hello or not hello.get("ready"):
            detail = self._stderr_tail()
            self.close()
            raise SandboxUnavailableError(f"the sandbox worker did not start: {detail or 'no output'}")

    def _env(self) -> dict:
        if self.sandboxed:
            return {"PATH": "/usr/bin:/bin"}
        self._tmp = tempfile.mkdtemp(prefix="ace-unsandboxed-")
        return {"PATH": "/usr/bin:/bin", "HOME": self._tmp, "TMPDIR": self._tmp, "LANG": "C.UTF-8"}

    def _stderr_tail(self) -> str:
        try:
            self._stderr.seek(0)
            return self._stderr.read()[-_STDERR_TAIL:].decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""

    def run(self, request: dict) -> dict:
        """Run one test (see `_serve` for the request fields) under the outer wall-clock kill."""
        if self._proc is None:
            raise SandboxDiedError("the sandbox worker is not running")
        deadline = time.monotonic() + self.config.timeout_s + self.config.outer_slack_s
        try:
            _send(self._to, request)
            reply = _recv(self._from, deadline)
        except TimeoutError:
            self.close()
            raise SandboxTimeoutError(f"sandbox worker silent past {self.config.timeout_s + self.config.outer_slack_s:g} s")
        except OSError as exc:
            self.close()
            raise SandboxDiedError(f"sandbox worker pipe failed: {exc}") from exc
        if reply is None:
            code = self._proc.wait(5) if self._proc else None
            self.close()
            raise SandboxDiedError(f"sandbox worker exited (code {code}) mid-test")
        return reply

    def restart(self) -> None:
        self.close()
        self.start()

    def close(self) -> None:
        """Kill the sandbox (bwrap's --die-with-parent and the PID namespace take the rest down)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            for fd in (self._to, self._from):
                try:
                    os.close(fd)
                except OSError:
                    pass
            if proc.poll() is None:
                try:
                    # Our own session leader (start_new_session): the whole group is the sandbox.
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    proc.kill()
            proc.wait()
            self._stderr.close()
        if getattr(self, "_tmp", None):
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


# ----------------------------------------------------------------------------- sandbox side
# Everything below runs inside the sandbox, under the system Python, as the worker loop.

def _make_non_dumpable() -> None:
    """PR_SET_DUMPABLE=0: tests (same uid) can no longer open /proc/<worker>/fd, mem or ptrace it."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def _set_limits(limits: dict) -> None:
    import resource
    cpu = int(limits["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    mem = int(limits["memory_mb"]) << 20
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    out = int(limits["max_output_bytes"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (out, out))
    files = int(limits["max_open_files"])
    resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if limits["sandboxed"]:
        procs = int(limits["max_processes"]) + _SANDBOX_OWN_PROCESSES
        resource.setrlimit(resource.RLIMIT_NPROC, (procs, procs))


def _child(request: dict, paths: dict, limits: dict) -> None:
    """In the forked child: redirect, limit, run the program; report through fd 3. Never returns."""
    write, dumps, exit_now = os.write, json.dumps, os._exit

    def report(outcome: str, message: str = "", **extra) -> None:
        try:
            write(3, dumps({"outcome": outcome, "message": message[-_STDERR_TAIL:], **extra}).encode())
        except Exception:  # noqa: BLE001 - the program may have closed fd 3; the parent copes
            pass

    try:
        os.setpgid(0, 0)
        for fd, path, flags in ((0, paths["stdin"], os.O_RDONLY), (1, paths["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, paths["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (3, paths["result"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            opened = os.open(path, flags, 0o600)
            if opened != fd:  # the lowest free number may already be the target
                os.dup2(opened, fd)
                os.close(opened)
        os.closerange(4, 65536)
        os.chdir(paths["cwd"])
        _set_limits(limits)
        sys.stdin = sys.__stdin__ = open(0, encoding="utf-8", errors="replace", closefd=False)
        sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", closefd=False)
        sys.stderr = sys.__stderr__ = open(2, "w", encoding="utf-8", buffering=1, closefd=False)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # Python ignores SIGXFSZ; the default action (kill) makes an output overrun unambiguous.
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    except BaseException as exc:  # noqa: BLE001
        report(SANDBOX_ERROR, f"test setup failed: {exc!r}")
        exit_now(70)
    _run_program(request, report)
    exit_now(0)


def _run_program(request: dict, report) -> None:
    import traceback
    mode = request["mode"]
    try:
        code = compile(PRELUDE + request["source"], "<solution>", "exec")
    except MemoryError:
        report(MEMORY_LIMIT, "MemoryError while compiling")
        return
    except BaseException as exc:  # noqa: BLE001 - SyntaxError, ValueError (NUL bytes), RecursionError...
        report(COMPILE_ERROR, f"{type(exc).__name__}: {exc}")
        return
    namespace = {"__name__": "__main__" if mode != MODE_CALL else "solution", "__builtins__": __builtins__}
    try:
        exec(code, namespace)
        if mode == MODE_CALL:
            target = namespace.get("Solution")
            fn = getattr(target(), request["fn_name"]) if isinstance(target, type) else namespace[request["fn_name"]]
            value = fn(*request["args"])
            try:
                encoded = json.dumps(value)
            except (TypeError, ValueError):
                encoded = json.dumps(repr(value))
                report(OK, value_json=encoded, value_is_repr=True)
                return
            report(OK, value_json=encoded)
            return
        _flush_stdout()
        report(OK)
    except SystemExit as exc:
        # A stdin program may exit(0) when done; a call/script run must reach the end of its checks.
        if mode == MODE_STDIN and exc.code in (None, 0):
            _flush_stdout()
            report(OK)
        else:
            report(RUNTIME_ERROR, f"SystemExit({exc.code!r}) before the tests finished")
    except MemoryError:
        report(MEMORY_LIMIT, "MemoryError")
    except BaseException as exc:  # noqa: BLE001 - any exception of the program is its runtime error
        report(RUNTIME_ERROR, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:]))


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - a program that closed its stdout gets what it flushed
        pass


def _wait_child(pid: int, timeout_s: float) -> tuple[int, bool, float]:
    """Wait for the test child up to `timeout_s` wall seconds; SIGKILL it past that."""
    start = time.monotonic()
    timed_out = False
    pidfd = os.pidfd_open(pid)
    try:
        if not select.select([pidfd], [], [], timeout_s)[0]:
            timed_out = True
            for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
                try:
                    kill()
                except (ProcessLookupError, PermissionError):
                    pass
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(pidfd)
    return status, timed_out, time.monotonic() - start


def _read_capped(path: str, limit: int) -> str:
    try:
        with open(path, "rb") as handle:
            return handle.read(limit).decode("utf-8", "replace")
    except OSError:
        return ""


def _classify(status: int, timed_out: bool, report: dict | None, stderr: str, mode: str) -> tuple[str, str]:
    """Outcome of one test from its exit status and its own report."""
    if timed_out:
        return TIMEOUT, "wall-clock limit"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU:
            return TIMEOUT, "CPU-time limit"
        if sig == signal.SIGXFSZ:
            return OUTPUT_LIMIT, "file-size limit (output too large)"
        if "MemoryError" in stderr:
            return MEMORY_LIMIT, f"killed by signal {sig} after MemoryError"
        return RUNTIME_ERROR, f"killed by signal {signal.Signals(sig).name}"
    if report is not None:
        return report["outcome"], report.get("message", "")
    if "MemoryError" in stderr:
        return MEMORY_LIMIT, stderr[-_STDERR_TAIL:]
    code = os.WEXITSTATUS(status)
    if mode == MODE_STDIN and code == 0:
        return OK, "exited without the harness report"
    return RUNTIME_ERROR, f"exited with code {code} before reporting" + (f": {stderr[-_STDERR_TAIL:]}" if stderr else "")


def _other_pids() -> list[int]:
    """Live processes in this PID namespace other than init (bwrap) and this worker."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in (1, os.getpid()):
            try:
                with open(f"/proc/{name}/stat", "rb") as handle:
                    if handle.read().rsplit(b")", 1)[1].split()[0] != b"Z":
                        pids.append(int(name))
            except (OSError, IndexError):
                pass
    return pids


def _sweep(sandboxed: bool, child_pid: int) -> bool:
    """Kill everything the test left; wipe tmp, shm and SysV segments. False = could not."""
    if sandboxed:
        # kill(-1) in a PID namespace reaches every process in it except init and the caller:
        # daemons that left the test's process group die too. Repeat until a fork race is lost.
        deadline = time.monotonic() + 3.0
        while _other_pids():
            if time.monotonic() > deadline:
                return False
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass
            time.sleep(0.002)
        _remove_sysv_shm()
    else:
        try:
            os.killpg(child_pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return True


def _remove_sysv_shm() -> None:
    """Segments survive their creator: drop them so they do not pin host memory."""
    try:
        with open("/proc/sysvipc/shm") as handle:
            ids = [int(line.split()[1]) for line in handle.readlines()[1:] if line.strip()]
    except (OSError, ValueError, IndexError):
        return
    if ids:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        for shmid in ids:
            libc.shmctl(shmid, 0, None)  # IPC_RMID


def _wipe(directory: str) -> None:
    def force(func, path, _exc):
        try:
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700)
            func(path)
        except OSError:
            pass
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, onerror=force)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass


def _run_test(request: dict, limits: dict, scratch: str) -> dict:
    paths = {name: os.path.join(scratch, name) for name in ("stdin", "stdout", "stderr", "result")}
    paths["cwd"] = os.path.join(scratch, "cwd")
    os.makedirs(paths["cwd"], exist_ok=True)
    with open(paths["stdin"], "w", encoding="utf-8") as handle:
        handle.write(request.get("input", ""))
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(request, paths, limits)
    status, timed_out, elapsed = _wait_child(pid, float(limits["timeout_s"]))
    clean = _sweep(limits["sandboxed"], pid)
    cap = int(limits["max_output_bytes"])
    stdout, stderr = _read_capped(paths["stdout"], cap), _read_capped(paths["stderr"], 1 << 16)
    try:
        report = json.loads(_read_capped(paths["result"], cap + 4096) or "null")
        report = report if isinstance(report, dict) and "outcome" in report else None
    except ValueError:
        report = None
    outcome, message = _classify(status, timed_out, report, stderr, request["mode"])
    reply = {"outcome": outcome, "message": message, "stdout": stdout if request["mode"] == MODE_STDIN else "",
             "stderr": stderr[-_STDERR_TAIL:], "elapsed_s": round(elapsed, 4), "clean": clean}
    if report is not None and outcome == OK and "value_json" in report:
        reply["value_json"] = report["value_json"]
        reply["value_is_repr"] = bool(report.get("value_is_repr"))
    return reply


def _serve(argv: list[str]) -> int:
    """Worker loop: framed JSON requests on fd argv[0], replies on fd argv[1].

    Request: {"mode": stdin|call|script, "source": str, "input": str (stdin mode),
    "fn_name": str and "args": list (call mode), "limits": {...}}. Reply: {"outcome", "message",
    "stdout", "stderr", "elapsed_s", "clean", "value_json"?}.
    """
    fd_in, fd_out = int(argv[0]), int(argv[1])
    sandboxed = "--unsandboxed" not in argv
    if sandboxed:
        with open("/proc/1/comm") as handle:
            # kill(-1) below is only safe inside bwrap's own PID namespace.
            if handle.read().strip() != "bwrap" or os.getppid() != 1:
                raise SystemExit("sandboxed worker is not running under bwrap as pid 1; refusing")
    _make_non_dumpable()
    exec(compile(PRELUDE, "<prelude>", "exec"), {})  # warm the imports the children will need
    scratch = tempfile.mkdtemp(prefix="ace-")
    _send(fd_out, {"ready": True, "python": sys.version.split()[0], "sandboxed": sandboxed})
    while True:
        request = _recv(fd_in, None)
        if request is None or request.get("mode") == "exit":
            return 0
        limits = dict(request["limits"], sandboxed=sandboxed)
        try:
            reply = _run_test(request, limits, scratch)
        except Exception as exc:  # noqa: BLE001 - report, then let the host replace us
            _send(fd_out, {"outcome": SANDBOX_ERROR, "message": f"worker failed: {exc!r}", "clean": False})
            return 1
        for directory in ([tempfile.gettempdir(), "/dev/shm"] if sandboxed else [scratch]):
            if os.path.isdir(directory):
                _wipe(directory)
        if sandboxed:
            scratch = tempfile.mkdtemp(prefix="ace-")
        _send(fd_out, reply)
        if not reply["clean"]:
            return 1  # something survived the sweep: the host starts a fresh sandbox


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    sys.exit(_serve(sys.argv[2:]))
