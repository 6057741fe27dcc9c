"""A real single-node Slurm cluster on this machine, for the launcher tests.

Starts munged, a private MariaDB, slurmdbd, slurmctld and slurmd (Debian slurm-wlm 22.05) with
every file -- configuration, keys, sockets, spool, database, logs, pid files -- under one private
directory (default /tmp/ace-slurm, or $ACE_SLURM_DIR). Nothing under /etc or /run is touched, so it
cannot disturb a system Slurm or munge.

Why each piece is there:
- munge on a private socket: Slurm authenticates every RPC with it. The socket path goes in
  `AuthInfo=socket=...` for slurmctld/slurmd/the clients, and ALSO in `AccountingStoragePass=`
  (slurmctld -> slurmdbd) and slurmdbd.conf's `AuthInfo`, or the accounting link silently falls
  back to the system socket and fails.
- slurmdbd + MariaDB: nemo-run reads job state with `sacct`; without accounting it gives up after
  ~30 failed sacct calls and cancels the job.
- proctrack/linuxproc and task/none: no cgroups needed (containers rarely delegate them).

What it does not do: pyxis/enroot (container jobs can only be rendered here, not run), more than
one node, or any security beyond the machine's own (the daemons run as root).

Daemons run in the foreground of their own session so their pids are ours; `stop()` ends them by
pid, in reverse start order. `start()` is idempotent: a running cluster is reused (well under a
second), a stopped one restarts from its saved state (a few seconds), and a fresh machine gets
the Debian packages (apt-get, as root) and a new database first.

Command line: `python tests/slurm_local.py start|stop|status` (prints the environment to export).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DEBIAN_PACKAGES = ("slurm-wlm", "slurmdbd", "munge", "mariadb-server")
REQUIRED_BINARIES = ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "sbatch", "sacct")
CLUSTER_NAME = "ace"
# Start order; stop goes in reverse so nothing loses a peer it still talks to.
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SlurmCluster:
    """Paths and ports of one private cluster; `env()` is what a client needs."""

    root: Path
    """Directory holding every file of the cluster."""
    ports: dict[str, int]
    """TCP ports: mariadb, slurmdbd, slurmctld, slurmd."""

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    def env(self) -> dict[str, str]:
        """Environment for sbatch/sacct/scontrol (and nemo-run's LocalTunnel) to reach the cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def pid_file(self, daemon: str) -> Path:
        return self.root / "run" / f"{daemon}.pid"

    def log_file(self, daemon: str) -> Path:
        return self.root / "log" / f"{daemon}.log"


def default_root() -> Path:
    return Path(os.environ.get("ACE_SLURM_DIR", "/tmp/ace-slurm"))


# ---------------------------------------------------------------------------------------------
# Installation and one-time state
# ---------------------------------------------------------------------------------------------


def ensure_packages() -> None:
    """Install the Debian packages when a binary is missing (root + apt-get only)."""
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError(
            f"Slurm binaries missing ({', '.join(missing)}); install the Debian packages "
            f"{' '.join(DEBIAN_PACKAGES)} (needs root and apt-get)"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *DEBIAN_PACKAGES],
        check=True, env=env, capture_output=True,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _load_or_pick_ports(root: Path) -> dict[str, int]:
    """Ports are picked once and saved, so a restart finds its database and peers again."""
    path = root / "ports"
    if path.exists():
        return {k: int(v) for k, v in (line.split("=") for line in path.read_text().split())}
    ports: dict[str, int] = {}
    while len(ports) < 4:
        port = _free_port()
        if port not in ports.values():
            ports[("mariadb", "slurmdbd", "slurmctld", "slurmd")[len(ports)]] = port
    path.write_text("".join(f"{k}={v}\n" for k, v in ports.items()))
    return ports


def _write_configs(c: SlurmCluster) -> None:
    r = c.root
    sock = c.munge_socket
    (r / "etc").mkdir(parents=True, exist_ok=True)
    c.conf.write_text(f"""\
# Generated by tests/slurm_local.py: a private one-node cluster.
ClusterName={CLUSTER_NAME}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={c.ports['slurmctld']}
SlurmdPort={c.ports['slurmd']}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/slurmd
SlurmctldPidFile={c.pid_file('slurmctld')}
SlurmdPidFile={c.pid_file('slurmd')}
SlurmctldLogFile={c.log_file('slurmctld')}
SlurmdLogFile={c.log_file('slurmd')}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={c.ports['slurmdbd']}
AccountingStoragePass={sock}
JobCompType=jobcomp/none
KillWait=5
MinJobAge=30
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
Waittime=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
    dbd = r / "etc" / "slurmdbd.conf"
    dbd.write_text(f"""\
# Generated by tests/slurm_local.py
AuthType=auth/munge
AuthInfo=socket={sock}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={c.ports['slurmdbd']}
SlurmUser=root
PidFile={c.pid_file('slurmdbd')}
LogFile={c.log_file('slurmdbd')}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={c.ports['mariadb']}
StorageUser=root
StorageLoc=slurm_acct_db
""")
    # slurmdbd refuses a config readable by others (it may hold a password).
    dbd.chmod(0o600)


def _init_state(c: SlurmCluster) -> None:
    r = c.root
    for sub in ("etc", "munge", "run", "log", "state", "spool/slurmd", "mysql"):
        (r / sub).mkdir(parents=True, exist_ok=True)
    r.chmod(0o700)
    (r / "munge").chmod(0o700)
    key = r / "munge" / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
    datadir = r / "mysql" / "data"
    if not (datadir / "mysql").exists():
        subprocess.run(
            ["mariadb-install-db", f"--datadir={datadir}", "--user=root",
             "--auth-root-authentication-method=normal", "--skip-test-db"],
            check=True, capture_output=True,
        )
    _write_configs(c)


# ---------------------------------------------------------------------------------------------
# Daemons
# ---------------------------------------------------------------------------------------------


def _command(c: SlurmCluster, daemon: str) -> list[str]:
    r = c.root
    if daemon == "munged":
        return ["munged", "-F", "-f", f"--socket={c.munge_socket}",
                f"--key-file={r}/munge/munge.key", f"--pid-file={c.pid_file('munged')}",
                f"--log-file={c.log_file('munged')}", f"--seed-file={r}/munge/seed",
                "--num-threads=2"]
    if daemon == "mariadbd":
        return ["mariadbd", "--no-defaults", f"--datadir={r}/mysql/data", "--user=root",
                "--bind-address=127.0.0.1", f"--port={c.ports['mariadb']}",
                f"--socket={r}/mysql/mysql.sock", f"--pid-file={c.pid_file('mariadbd')}",
                f"--log-error={c.log_file('mariadbd')}", "--innodb-buffer-pool-size=16M",
                "--skip-name-resolve", "--performance-schema=OFF"]
    if daemon == "slurmdbd":
        return ["slurmdbd", "-D"]
    if daemon == "slurmctld":
        return ["slurmctld", "-D", "-i", "-f", str(c.conf)]
    if daemon == "slurmd":
        return ["slurmd", "-D", "-N", "localhost", "-f", str(c.conf)]
    raise ValueError(f"unknown daemon {daemon!r}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie left by a daemon we started from this process is not alive.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _our_pid(c: SlurmCluster, daemon: str) -> int | None:
    """Pid of our instance of `daemon`, checked against /proc so a recycled pid is not ours."""
    path = c.root / "run" / f"{daemon}.ours"
    if not path.exists():
        return None
    pid = int(path.read_text().strip() or 0)
    if pid <= 0 or not _alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return None
    return pid if os.path.basename(cmdline) == daemon else None


def _client_env(c: SlurmCluster) -> dict[str, str]:
    return dict(os.environ, **c.env())


def _wait_ready(c: SlurmCluster, daemon: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if _ready(c, daemon):
            return
        time.sleep(0.2)
    why = f"exited with {proc.returncode}" if proc.poll() is not None else f"not ready in {timeout_s:.0f}s"
    tail = ""
    for log in (c.log_file(daemon), c.log_file(daemon).with_suffix(".out")):
        if log.exists():
            tail += f"\n-- {log}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    raise RuntimeError(f"{daemon} {why}{tail}")


def _ready(c: SlurmCluster, daemon: str) -> bool:
    env = _client_env(c)
    if daemon == "munged":
        return c.munge_socket.exists()
    if daemon == "mariadbd":
        return (c.root / "mysql" / "mysql.sock").exists()
    if daemon == "slurmdbd":
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", c.ports["slurmdbd"])) == 0
    if daemon == "slurmctld":
        out = subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True)
        return "UP" in out.stdout
    if daemon == "slurmd":
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env,
                             capture_output=True, text=True)
        return out.stdout.strip().rstrip("*") in ("idle", "mixed", "allocated")
    raise ValueError(daemon)


def _launch(c: SlurmCluster, daemon: str) -> None:
    if _our_pid(c, daemon) is not None:
        return
    env = _client_env(c)
    log = open(c.log_file(daemon).with_suffix(".out"), "ab")
    proc = subprocess.Popen(_command(c, daemon), env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=c.root)
    log.close()
    (c.root / "run" / f"{daemon}.ours").write_text(f"{proc.pid}\n")
    _wait_ready(c, daemon, proc, timeout_s=60)


def _register_cluster(c: SlurmCluster) -> None:
    """Add the cluster to the accounting database once (slurmctld registers jobs under it)."""
    marker = c.root / "state" / ".registered"
    if marker.exists():
        return
    subprocess.run(["sacctmgr", "-i", "add", "cluster", CLUSTER_NAME], env=_client_env(c),
                   capture_output=True, text=True)
    marker.write_text("ok\n")


def start(root: Path | None = None) -> SlurmCluster:
    """Start (or reuse) the cluster and return it once a job can be scheduled."""
    root = root or default_root()
    root.mkdir(parents=True, exist_ok=True)
    c = SlurmCluster(root=root, ports=_load_or_pick_ports(root))
    if all(_our_pid(c, d) is not None for d in DAEMONS) and _ready(c, "slurmd"):
        return c
    ensure_packages()
    _init_state(c)
    for port_name, daemon in (("mariadb", "mariadbd"), ("slurmdbd", "slurmdbd"),
                              ("slurmctld", "slurmctld"), ("slurmd", "slurmd")):
        if _our_pid(c, daemon) is None and not _port_is_free(c.ports[port_name]):
            raise RuntimeError(f"port {c.ports[port_name]} for {daemon} is taken by another "
                               f"process; remove {root / 'ports'} to pick new ones")
    for daemon in ("munged", "mariadbd", "slurmdbd"):
        _launch(c, daemon)
    _register_cluster(c)
    for daemon in ("slurmctld", "slurmd"):
        _launch(c, daemon)
    return c


def stop(root: Path | None = None, timeout_s: float = 20.0) -> None:
    """End our daemons by pid, newest first (SIGTERM, then SIGKILL after `timeout_s`)."""
    root = root or default_root()
    if not (root / "ports").exists():
        return
    c = SlurmCluster(root=root, ports=_load_or_pick_ports(root))
    for daemon in reversed(DAEMONS):
        pid = _our_pid(c, daemon)
        if pid is None:
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        try:  # reap it when we are its parent
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        (root / "run" / f"{daemon}.ours").unlink(missing_ok=True)


def status(root: Path | None = None) -> dict[str, int | None]:
    root = root or default_root()
    if not (root / "ports").exists():
        return {d: None for d in DAEMONS}
    c = SlurmCluster(root=root, ports=_load_or_pick_ports(root))
    return {d: _our_pid(c, d) for d in DAEMONS}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("start", "stop", "status"):
        sys.stderr.write("usage: python tests/slurm_local.py start|stop|status\n")
        return 2
    if argv[0] == "start":
        t0 = time.monotonic()
        c = start()
        sys.stdout.write(f"# cluster up in {time.monotonic() - t0:.1f}s\n")
        sys.stdout.write("".join(f"export {k}={v}\n" for k, v in c.env().items()))
    elif argv[0] == "stop":
        stop()
    else:
        for daemon, pid in status().items():
            sys.stdout.write(f"{daemon:10s} {pid if pid else '-'}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
