"""A real single-node Slurm in the firewall lab: its daemons on one host, its clients on another.

``slurmctld`` and ``slurmd`` run on the lab's ``node``; ``sbatch``, ``squeue``
and ``scancel`` work from the ``head`` with ``SLURM_CONF`` set, as on a cluster.
Jobs run on the node as the lab's unprivileged user. Needs root, ``slurm-wlm``
and ``munge``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from ..errors import WQSupervisorError
from ..process import pid_alive, terminate
from .common import run

_SLURMD_CGROUPS = (
    "mount -t tmpfs none /sys/fs/cgroup && "
    "for c in cpu cpuacct cpuset memory devices freezer pids; do "
    "mkdir -p /sys/fs/cgroup/$c && mount -t cgroup -o $c none /sys/fs/cgroup/$c; done; "
    "mkdir -p /sys/fs/cgroup/systemd && mount -t cgroup -o none,name=systemd none /sys/fs/cgroup/systemd;"
)


class Hosts(Protocol):
    """What Slurm needs of the lab: its directory and user, and commands on its hosts."""

    root: Path
    user: str
    ns: dict[str, str]

    def argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``host``'s namespace."""

    def sh(self, ns: str, script: str) -> str:
        """Run a shell line in namespace ``ns`` (a full name); returns its stdout."""

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process on ``host``; it is stopped with the lab."""


def start_munge() -> int | None:
    """Start munged unless one runs (its socket is machine-wide); the pid of the one started here, or None."""
    rundir = Path("/run/munge")
    pidfile = rundir / "munged.pid"
    if pidfile.exists() and pid_alive(int(pidfile.read_text().strip() or 0)):
        return None
    munge = pwd.getpwnam("munge")
    rundir.mkdir(mode=0o755, exist_ok=True)
    os.chown(rundir, munge.pw_uid, munge.pw_gid)
    run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"])
    return int(pidfile.read_text().strip())


def stop_munge(pid: int | None) -> None:
    """Stop the munged that :func:`start_munge` started (None: it started none)."""
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def slurm_conf(
    folder: Path,
    *,
    cluster: str,
    controller: str,
    node: str,
    node_host: str,
    cpus: int,
    memory_mb: int,
    extra: Sequence[str] = (),
) -> str:
    """A single-node slurm.conf: state, spool and logs under ``folder``, a job completion log in
    ``folder/log/jobcomp.txt``, no accounting, every job started as soon as it is submitted.

    ``controller`` is ``host(address)``; ``node`` the node's name, ``node_host`` its hostname;
    the node claims ``cpus`` CPUs whatever the machine has, so several one-core workers run at once.
    """
    d = folder
    return "\n".join(
        [
            f"ClusterName={cluster}",
            f"SlurmctldHost={controller}",
            *extra,
            "SlurmUser=root",
            "SlurmdUser=root",
            "MailProg=/bin/true",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={d}/log/jobcomp.txt",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerParameters=batch_sched_delay=0",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            f"SlurmctldPidFile={d}/slurmctld.pid",
            f"SlurmdPidFile={d}/slurmd.pid",
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool",
            f"SlurmctldLogFile={d}/log/slurmctld.log",
            f"SlurmdLogFile={d}/log/slurmd.log",
            f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={node_host} CPUs={cpus} "
            f"RealMemory={memory_mb} State=UNKNOWN",
            f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


class Slurm:
    """slurmctld and slurmd on host ``node`` (reachable at ``node_ip``), clients on host ``head``."""

    def __init__(self, lab: Hosts, *, node: str, head: str, node_ip: str) -> None:
        self._lab = lab
        self._node, self._head, self._node_ip = node, head, node_ip
        # The slurm.conf path, once started: clients need it in SLURM_CONF.
        self.conf = ""
        self._daemons: list[subprocess.Popen[Any]] = []
        self._munged: int | None = None

    def start(self, cpus: int = 4) -> str:
        """Start munged (if needed), slurmctld and slurmd on the node; returns the slurm.conf path.

        slurmctld listens on the node's link, so ``sbatch`` on the head reaches it
        (clients need ``SLURM_CONF``); jobs run on the node as the lab user.
        """
        for tool in ("slurmctld", "slurmd", "munged"):
            if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
                raise WQSupervisorError(f"{tool} is not installed", "apt-get install slurm-wlm munge")
        self._munged = start_munge()
        d = self._lab.root / "slurm"
        for sub in ("state", "spool", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)  # noqa: S103 - the lab user's sbatch reads slurm.conf
        host = os.uname().nodename.split(".")[0]
        conf = d / "slurm.conf"
        conf.write_text(
            slurm_conf(
                d, cluster="wqslab", controller=f"{host}({self._node_ip})", node=host, node_host=host,
                cpus=cpus, memory_mb=4000,
            )
        )  # fmt: skip
        os.chmod(conf, 0o644)
        # glibc's AI_ADDRCONFIG ignores loopback: slurmctld needs another IPv4 address here.
        self._lab.sh(self._lab.ns[self._node], "ip addr add 10.254.254.1/32 dev lo")
        env = dict(os.environ, SLURM_CONF=str(conf))
        self._daemons = [
            self._lab.popen(
                self._node,
                ["slurmctld", "-D", "-f", str(conf)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
            # `ip netns exec` remounts /sys and hides the cgroup mounts slurmd initializes.
            self._lab.popen(
                self._node,
                ["sh", "-c", _SLURMD_CGROUPS + f' exec slurmd -D -f "{conf}"'],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
        ]
        self.conf = str(conf)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            res = subprocess.run(
                self._lab.argv(self._head, ["sinfo", "-h", "-N", "-o", "%t"]),
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if res.stdout.strip() in ("idle", "mix", "alloc"):
                return str(conf)
            time.sleep(0.3)
        raise WQSupervisorError(f"slurm did not come up: {(d / 'log' / 'slurmctld.log').read_text()[-500:]}")

    def stop(self) -> None:
        """Cancel every job, wait for the queue to empty, stop the daemons (and the lab's munged)."""
        if not self._daemons:
            return
        env = dict(os.environ, SLURM_CONF=self.conf)
        subprocess.run(
            self._lab.argv(self._head, ["scancel", "--full", "--quiet", f"--user={self._lab.user}"]),
            env=env,
            check=False,
            capture_output=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            res = subprocess.run(
                self._lab.argv(self._head, ["squeue", "-h", "-t", "PD,R,CG,S"]),
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if res.returncode != 0 or not res.stdout.strip():
                break
            time.sleep(0.3)
        for proc in self._daemons:
            terminate(proc, grace=10)
        self._daemons = []
        stop_munge(self._munged)
        self._munged = None

    def squeue(self) -> list[str]:
        """Jobs Slurm still holds (pending, running, completing, suspended)."""
        env = dict(os.environ, SLURM_CONF=self.conf)
        res = subprocess.run(
            self._lab.argv(self._head, ["squeue", "-h", "-t", "PD,R,CG,S", "-o", "%i %T"]),
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        return [line for line in res.stdout.splitlines() if line.strip()]
