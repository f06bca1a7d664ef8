"""A firewall lab built from network namespaces, and the faults that break tunnels.

Three hosts, each a network namespace that the lab creates and removes::

    campus (master + supervisor) --veth-- head (sshd) --veth-- node (workers)
      10.250.0.1                 10.250.0.2  10.250.1.1        10.250.1.2

* ``head`` does not forward (``ip_forward=0``, FORWARD policy DROP), so
  ``node`` cannot reach ``campus``; ``campus`` drops TCP SYNs from the head's
  link, so ``head`` cannot open connections into it. Each host has only its
  connected routes: no default route, nothing beyond the lab.
* ``head`` runs a real sshd (:class:`wqsupervisor.harness.sandbox.HeadNode`) for an
  unprivileged user that the lab creates and deletes, so nothing can lean on root.
* Workers on ``node`` reach the master only as the HOWTO says: their own
  ``ssh -L`` hop to the head, then the head's ``-R`` port.

Faults are methods: :meth:`Lab.link_down`, :meth:`Lab.blackhole` and
:meth:`Lab.heal` (keeping or forgetting the old connections), :meth:`Lab.flap`,
:meth:`Lab.restart_sshd`, :meth:`Lab.kill_session`, :meth:`Lab.stop_session`.
Everything is undone by :meth:`Lab.stop`, which also runs when the ``with``
block raises. Needs root, ``iproute2`` and ``iptables``.

``python -m wqsupervisor.harness.lab app ...`` is the campus-side application the
tests and benchmarks drive; ``python -m wqsupervisor.harness.lab probe PORT`` watches
a port from inside a namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import WQSupervisorError
from ..process import owned_argv, pid_alive, terminate
from .sandbox import HeadNode

CAMPUS, HEAD, NODE = "campus", "head", "node"
CAMPUS_IP, HEAD_CAMPUS_IP = "10.250.0.1", "10.250.0.2"
HEAD_NODE_IP, NODE_IP = "10.250.1.1", "10.250.1.2"


_SLURMD_CGROUPS = (
    "mount -t tmpfs none /sys/fs/cgroup && "
    "for c in cpu cpuacct cpuset memory devices freezer pids; do "
    "mkdir -p /sys/fs/cgroup/$c && mount -t cgroup -o $c none /sys/fs/cgroup/$c; done; "
    "mkdir -p /sys/fs/cgroup/systemd && mount -t cgroup -o none,name=systemd none /sys/fs/cgroup/systemd;"
)


def _run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if check and res.returncode != 0:
        raise WQSupervisorError(f"lab command failed: {' '.join(argv)}: {res.stderr.strip()}")
    return res


def remove_remains(namespaces: Iterable[str], users: Iterable[str], root: str | Path) -> None:
    """Kill what runs in ``namespaces`` or as ``users``, then delete them and the directory ``root``."""
    namespaces, users = list(namespaces), list(users)
    for ns in namespaces:
        for pid in _run(["ip", "netns", "pids", ns], check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    for ns in namespaces:
        _run(["ip", "netns", "delete", ns], check=False)
    for user in users:
        with contextlib.suppress(KeyError):
            pwd.getpwnam(user)
            _run(["pkill", "-KILL", "-u", user], check=False)
            deadline = time.monotonic() + 5
            while _run(["userdel", user], check=False).returncode == 8 and time.monotonic() < deadline:
                time.sleep(0.1)  # userdel refuses while a process of the user is still exiting
    shutil.rmtree(root, ignore_errors=True)


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


class Lab:
    """campus -- head -- node, with a real sshd on head and faults on demand."""

    def __init__(self, workdir: str | None = None) -> None:
        if os.geteuid() != 0:
            raise WQSupervisorError("the firewall lab needs root", "run the lab tests as root (CI does)")
        for tool in ("ip", "iptables"):
            if shutil.which(tool) is None:
                raise WQSupervisorError(f"{tool} is not installed", "apt-get install iproute2 iptables")
        self.tag = secrets.token_hex(3)
        self.ns = {h: f"wqs-{self.tag}-{h}" for h in (CAMPUS, HEAD, NODE)}
        # veth names are limited to 15 characters.
        self.veth = {
            (CAMPUS, HEAD): f"c{self.tag}h",
            (HEAD, CAMPUS): f"h{self.tag}c",
            (HEAD, NODE): f"h{self.tag}n",
            (NODE, HEAD): f"n{self.tag}h",
        }
        self.user = f"wqs{self.tag}"
        # Another user of the same head node, created on demand (see add_other_user).
        self.other_user = f"wqo{self.tag}"
        self.root = Path(workdir or tempfile.mkdtemp(prefix="wqs-lab-"))
        self.head: HeadNode | None = None
        self.campus_ssh_config = self.root / "ssh_config.campus"
        self.node_ssh_config = self.root / "ssh_config.node"
        self._blackholed = False
        self._forgotten: list[list[str]] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._slurm: list[subprocess.Popen[Any]] = []
        self._munged: int | None = None
        self.slurm_conf = ""
        self._started = False
        self._previous_sigterm: Any = None

    # -- building and tearing down --------------------------------------------------

    def start(self) -> Lab:
        """Create the namespaces, links, firewall, user and sshd."""
        self._started = True
        if threading.current_thread() is threading.main_thread() and (
            signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        ):
            # A plain `kill` of the test or benchmark must unwind `with Lab()` too.
            self._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            self._build()
        except BaseException:
            self.stop()
            raise
        return self

    def _build(self) -> None:
        os.chmod(self.root, 0o755)  # noqa: S103 - sshd reads the lab user's keys from here
        for ns in self.ns.values():
            _run(["ip", "netns", "add", ns])
            self.sh(ns, "ip link set lo up")
        for (a, b), ip_a, ip_b in (
            ((CAMPUS, HEAD), CAMPUS_IP, HEAD_CAMPUS_IP),
            ((HEAD, NODE), HEAD_NODE_IP, NODE_IP),
        ):
            va, vb = self.veth[(a, b)], self.veth[(b, a)]
            _run(
                [
                    "ip",
                    "link",
                    "add",
                    va,
                    "netns",
                    self.ns[a],
                    "type",
                    "veth",
                    "peer",
                    "name",
                    vb,
                    "netns",
                    self.ns[b],
                ]
            )
            self.sh(self.ns[a], f"ip addr add {ip_a}/30 dev {va} && ip link set {va} up")
            self.sh(self.ns[b], f"ip addr add {ip_b}/30 dev {vb} && ip link set {vb} up")
        self.sh(self.ns[HEAD], "echo 0 > /proc/sys/net/ipv4/ip_forward && iptables -P FORWARD DROP")
        self.sh(self.ns[CAMPUS], f"iptables -A INPUT -i {self.veth[(CAMPUS, HEAD)]} -p tcp --syn -j DROP")
        home = self.root / "home"
        # "*" and not the locked "!": sshd refuses locked accounts when it runs without PAM.
        _run(
            [
                "useradd",
                "--no-create-home",
                "--no-user-group",
                "--password",
                "*",
                "--home-dir",
                str(home),
                "--shell",
                "/bin/sh",
                self.user,
            ]
        )
        home.mkdir(mode=0o700)
        os.chown(home, pwd.getpwnam(self.user).pw_uid, -1)
        self.head = HeadNode(
            str(self.root / "head"),
            port=22,
            user=self.user,
            host="0.0.0.0",  # noqa: S104 - the head listens on both of its links
            netns=self.ns[HEAD],
            addresses=[HEAD_CAMPUS_IP, HEAD_NODE_IP],
        )
        self.head.client_config(HEAD_CAMPUS_IP, self.campus_ssh_config)
        self.head.client_config(HEAD_NODE_IP, self.node_ssh_config)
        self._user_ssh(home)
        self.head.start()

    def add_other_user(self) -> str:
        """A second unprivileged user on the head node: someone else who shares the machine."""
        _run(
            [
                "useradd",
                "--no-create-home",
                "--no-user-group",
                "--password",
                "*",
                "--shell",
                "/bin/sh",
                "--home-dir",
                "/nonexistent",
                self.other_user,
            ]
        )
        return self.other_user

    def as_other_user(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on the head node as the other user."""
        return subprocess.run(
            self.argv(HEAD, ["runuser", "-u", self.other_user, "--", *argv]),
            capture_output=True,
            text=True,
            check=False,
        )

    def _user_ssh(self, home: Path) -> None:
        """The lab user's own ~/.ssh, as on a cluster: jobs on node reach ``headnode`` with it."""
        assert self.head is not None
        account = pwd.getpwnam(self.user)
        ssh_dir = home / ".ssh"
        ssh_dir.mkdir(mode=0o700)
        key = ssh_dir / "id_ed25519"
        key.write_bytes(self.head.identity.read_bytes())
        (ssh_dir / "known_hosts").write_bytes(self.head.known_hosts.read_bytes())
        (ssh_dir / "config").write_text(
            f"Host headnode\n    HostName {HEAD_NODE_IP}\n    IdentityFile ~/.ssh/id_ed25519\n"
            "    IdentitiesOnly yes\n    StrictHostKeyChecking yes\n"
        )
        for path in (ssh_dir, key, ssh_dir / "known_hosts", ssh_dir / "config"):
            os.chown(path, account.pw_uid, account.pw_gid)
            os.chmod(path, 0o700 if path.is_dir() else 0o600)

    def stop(self) -> None:
        """Remove everything the lab made, whatever state it is in."""
        if not self._started:
            return
        self._started = False
        with contextlib.suppress(Exception):
            self.stop_slurm()
        for proc in self._procs:
            with contextlib.suppress(Exception):
                terminate(proc, grace=2)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        if self.head is not None:
            with contextlib.suppress(Exception):
                self.head.stop()
        remove_remains(self.ns.values(), (self.user, self.other_user), self.root)
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- running things --------------------------------------------------------------

    def argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``host``'s namespace."""
        return ["ip", "netns", "exec", self.ns[host], *argv]

    def sh(self, ns: str, script: str) -> str:
        """Run a shell line in namespace ``ns`` (a full name); returns its stdout."""
        return _run(["ip", "netns", "exec", ns, "sh", "-c", script]).stdout

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process on ``host``; it is stopped with the lab and dies with this process."""
        proc = subprocess.Popen(owned_argv(self.argv(host, argv), "KILL"), **kwargs)
        self._procs.append(proc)
        return proc

    # -- faults --------------------------------------------------------------------------

    def _campus_link(self, up: bool) -> None:
        self.sh(self.ns[CAMPUS], f"ip link set {self.veth[(CAMPUS, HEAD)]} {'up' if up else 'down'}")

    def link_down(self) -> None:
        """Take the campus-head link down (both ends lose carrier)."""
        self._campus_link(False)

    def link_up(self) -> None:
        """Bring the campus-head link back."""
        self._campus_link(True)

    def blackhole(self) -> None:
        """Drop every packet on the campus-head link, both ways; the link stays up."""
        hc = self.veth[(HEAD, CAMPUS)]
        self.sh(self.ns[HEAD], f"iptables -I INPUT 1 -i {hc} -j DROP && iptables -I OUTPUT 1 -o {hc} -j DROP")
        self._blackholed = True

    def heal(self, forget: bool = False) -> None:
        """End the blackhole. ``forget``: packets of connections opened before it stay dropped,
        as behind a NAT or firewall that lost its state; new connections pass."""
        hc = self.veth[(HEAD, CAMPUS)]
        if forget:
            for conn in self.campus_connections():
                rules = [
                    [
                        "-I",
                        "INPUT",
                        "1",
                        "-i",
                        hc,
                        "-p",
                        "tcp",
                        "-s",
                        conn[0],
                        "--sport",
                        conn[1],
                        "-d",
                        conn[2],
                        "--dport",
                        conn[3],
                        "-j",
                        "DROP",
                    ],
                    [
                        "-I",
                        "OUTPUT",
                        "1",
                        "-o",
                        hc,
                        "-p",
                        "tcp",
                        "-s",
                        conn[2],
                        "--sport",
                        conn[3],
                        "-d",
                        conn[0],
                        "--dport",
                        conn[1],
                        "-j",
                        "DROP",
                    ],
                ]
                for rule in rules:
                    _run(self.argv(HEAD, ["iptables", *rule]))
                    self._forgotten.append(rule)
        if self._blackholed:
            self.sh(self.ns[HEAD], f"iptables -D INPUT -i {hc} -j DROP && iptables -D OUTPUT -o {hc} -j DROP")
            self._blackholed = False

    def campus_connections(self) -> list[tuple[str, str, str, str]]:
        """Established TCP connections from campus to the head: (src, sport, dst, dport)."""
        out = self.sh(self.ns[CAMPUS], f"ss -Htn state established dst {HEAD_CAMPUS_IP}")
        conns = []
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 4:
                (src, sport), (dst, dport) = parts[2].rsplit(":", 1), parts[3].rsplit(":", 1)
                conns.append((src, sport, dst, dport))
        return conns

    def flap(self, period: float = 2.0, duration: float = 30.0) -> None:
        """Take the campus-head link down and up every ``period`` seconds for ``duration`` (blocks)."""
        end = time.monotonic() + duration
        up = True
        while time.monotonic() < end:
            up = not up
            self._campus_link(up)
            time.sleep(period)
        self._campus_link(True)

    def restart_sshd(self, down_for: float = 0.0) -> None:
        """A head node reboot: sshd and every session die; sshd comes back."""
        assert self.head is not None
        self.head.restart(down_for=down_for)

    def port_holder(self, port: int) -> int | None:
        """The pid that listens on the head's ``port`` (the tunnel's sshd session)."""
        out = self.sh(self.ns[HEAD], f"ss -Hltnp 'sport = :{port}'")
        for token in out.replace(",", " ").split():
            if token.startswith("pid="):
                return int(token[4:])
        return None

    def kill_session(self, pid: int) -> None:
        """Kill the head's sshd session for the tunnel (SIGKILL)."""
        os.kill(pid, signal.SIGKILL)

    def stop_session(self, pid: int) -> None:
        """Hang the head's sshd session (SIGSTOP): it holds its port and answers nothing."""
        os.kill(pid, signal.SIGSTOP)

    def resume_session(self, pid: int) -> None:
        """Undo :meth:`stop_session`."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)

    def pids(self, host: str) -> list[int]:
        """Processes running in ``host``'s namespace."""
        return [int(p) for p in _run(["ip", "netns", "pids", self.ns[host]], check=False).stdout.split()]

    def node_hops(self) -> list[int]:
        """The ssh -L hop processes of the node launchers."""
        hops = []
        for pid in self.pids(NODE):
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if cmdline and cmdline[0].endswith(b"ssh") and b"-L" in cmdline:
                    hops.append(pid)
        return hops

    # -- a real single-node Slurm on the node ------------------------------------------

    def start_slurm(self, cpus: int = 4) -> str:
        """Start munged (if needed), slurmctld and slurmd on ``node``; returns the slurm.conf path.

        slurmctld listens on the node's link, so ``sbatch`` on the head reaches it
        (clients need ``SLURM_CONF``); jobs run on ``node`` as the lab user.
        """
        for tool in ("slurmctld", "slurmd", "munged"):
            if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
                raise WQSupervisorError(f"{tool} is not installed", "apt-get install slurm-wlm munge")
        self._start_munge()
        d = self.root / "slurm"
        for sub in ("state", "spool", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)  # noqa: S103 - the lab user's sbatch reads slurm.conf
        host = os.uname().nodename.split(".")[0]
        conf = d / "slurm.conf"
        conf.write_text(
            "\n".join(
                [
                    "ClusterName=wqslab",
                    f"SlurmctldHost={host}({NODE_IP})",
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
                    # More CPUs than the machine has, so that several one-core workers run at once.
                    "SlurmdParameters=config_overrides",
                    f"SlurmctldPidFile={d}/slurmctld.pid",
                    f"SlurmdPidFile={d}/slurmd.pid",
                    f"StateSaveLocation={d}/state",
                    f"SlurmdSpoolDir={d}/spool",
                    f"SlurmctldLogFile={d}/log/slurmctld.log",
                    f"SlurmdLogFile={d}/log/slurmd.log",
                    f"NodeName={host} NodeAddr=127.0.0.1 NodeHostname={host} CPUs={cpus} RealMemory=4000 "
                    "State=UNKNOWN",
                    f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        os.chmod(conf, 0o644)
        # glibc's AI_ADDRCONFIG ignores loopback: slurmctld needs another IPv4 address here.
        self.sh(self.ns[NODE], "ip addr add 10.254.254.1/32 dev lo")
        env = dict(os.environ, SLURM_CONF=str(conf))
        self._slurm = [
            self.popen(
                NODE,
                ["slurmctld", "-D", "-f", str(conf)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
            # `ip netns exec` remounts /sys and hides the cgroup mounts slurmd initializes.
            self.popen(
                NODE,
                ["sh", "-c", _SLURMD_CGROUPS + f' exec slurmd -D -f "{conf}"'],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
        ]
        self.slurm_conf = str(conf)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            res = subprocess.run(
                self.argv(HEAD, ["sinfo", "-h", "-N", "-o", "%t"]),
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if res.stdout.strip() in ("idle", "mix", "alloc"):
                return str(conf)
            time.sleep(0.3)
        raise WQSupervisorError(f"slurm did not come up: {(d / 'log' / 'slurmctld.log').read_text()[-500:]}")

    def _start_munge(self) -> None:
        run = Path("/run/munge")
        pidfile = run / "munged.pid"
        if pidfile.exists() and pid_alive(int(pidfile.read_text().strip() or 0)):
            return
        munge = pwd.getpwnam("munge")
        run.mkdir(mode=0o755, exist_ok=True)
        os.chown(run, munge.pw_uid, munge.pw_gid)
        _run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"])
        self._munged = int(pidfile.read_text().strip())

    def stop_slurm(self) -> None:
        """Cancel every job, wait for the queue to empty, stop the daemons (and the lab's munged)."""
        if not self._slurm:
            return
        env = dict(os.environ, SLURM_CONF=self.slurm_conf)
        subprocess.run(
            self.argv(HEAD, ["scancel", "--full", "--quiet", f"--user={self.user}"]),
            env=env,
            check=False,
            capture_output=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            res = subprocess.run(
                self.argv(HEAD, ["squeue", "-h", "-t", "PD,R,CG,S"]),
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if res.returncode != 0 or not res.stdout.strip():
                break
            time.sleep(0.3)
        for proc in self._slurm:
            terminate(proc, grace=10)
        self._slurm = []
        if self._munged:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._munged, signal.SIGTERM)
            self._munged = None

    def squeue(self) -> list[str]:
        """Jobs Slurm still holds (pending, running, completing, suspended)."""
        env = dict(os.environ, SLURM_CONF=self.slurm_conf)
        res = subprocess.run(
            self.argv(HEAD, ["squeue", "-h", "-t", "PD,R,CG,S", "-o", "%i %T"]),
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        return [line for line in res.stdout.splitlines() if line.strip()]

    @contextlib.contextmanager
    def fault(self, start: Callable[[], None], end: Callable[[], None]) -> Iterator[None]:
        """Apply a fault for the length of a block; the block's end heals it, even on error."""
        start()
        try:
            yield
        finally:
            end()


# -- driving the lab: the campus application, node workers, a head-side prober ------------


def _python_env() -> dict[str, str]:
    from .sandbox import debian_work_queue_path

    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, debian_work_queue_path(), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, PYTHONWARNINGS="ignore")


class CampusApp:
    """A supervised master on ``campus`` (``python -m wqsupervisor.harness.lab app``), driven from here.

    It reports JSON lines (events with the engine's own timestamps, results,
    stats every half second); this object collects them and waits on them.
    """

    def __init__(
        self,
        lab: Lab,
        remote_port: int,
        settings: dict[str, Any] | None = None,
        binding: str = "debian",
        tunnel: str = "wqsupervisor",
    ) -> None:
        self.lab = lab
        self.remote_port = remote_port
        self._cond = threading.Condition()
        self.events: list[dict[str, Any]] = []
        self.results: dict[str, list[str]] = {}
        self.stats: list[tuple[float, dict[str, int]]] = []
        self._replies: list[dict[str, Any]] = []
        self.ready: dict[str, Any] | None = None
        argv = [
            sys.executable,
            "-m",
            "wqsupervisor.harness.lab",
            "app",
            "--ssh-config",
            str(lab.campus_ssh_config),
            "--remote-port",
            str(remote_port),
            "--settings",
            json.dumps(settings or {}),
            "--binding",
            binding,
            "--tunnel",
            tunnel,
        ]
        self.log = lab.root / f"campus-{remote_port}.log"
        with open(self.log, "ab") as log:
            self.proc = lab.popen(
                CAMPUS,
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=_python_env(),
            )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_for(lambda: self.ready is not None, 60, "the campus application to start")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                kind = msg.get("kind")
                if kind == "event":
                    self.events.append(msg["data"])
                elif kind == "result":
                    self.results.setdefault(msg["tag"], []).append(msg["output"])
                elif kind == "stats":
                    self.stats.append((msg["t"], msg["stats"]))
                elif kind == "ready":
                    self.ready = msg
                else:
                    self._replies.append(msg)
                self._cond.notify_all()

    def send(self, command: str) -> None:
        """Send one command line to the application."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """Wait until ``predicate()`` is true (checked whenever a line arrives)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (value := predicate()):
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    tail = self.log.read_text(errors="replace")[-1500:] if self.log.exists() else ""
                    raise TimeoutError(f"waited {timeout} s for {what}; the application's stderr:\n{tail}")
                self._cond.wait(min(left, 0.5))
            return value

    def submit(self, n: int, command: str = "echo out-{i}") -> None:
        """Submit n tasks; ``{i}`` in the command becomes the task's tag."""
        self.send(f"submit {n} {command}")

    def named(self, name: str, after: float = 0.0) -> list[dict[str, Any]]:
        """Events called ``name`` that happened after wall time ``after``."""
        with self._cond:
            return [e for e in self.events if e["event"] == name and e["at"] >= after]

    def wait_event(self, name: str, timeout: float, after: float = 0.0) -> dict[str, Any]:
        """The first event called ``name`` after ``after``, waiting up to ``timeout``."""
        found: list[dict[str, Any]] = self.wait_for(lambda: self.named(name, after), timeout, f"event {name}")
        return found[0]

    def done(self) -> int:
        """How many results came back."""
        with self._cond:
            return sum(len(v) for v in self.results.values())

    def wait_done(self, n: int, timeout: float) -> None:
        """Wait until n results came back."""
        self.wait_for(lambda: self.done() >= n, timeout, f"{n} results")

    def latest_stats(self) -> dict[str, int]:
        """The last stats line."""
        with self._cond:
            return self.stats[-1][1] if self.stats else {}

    def wait_workers(self, n: int, timeout: float, after: float = 0.0) -> float:
        """Wall time of the first stats line after ``after`` with n workers connected."""

        def seen() -> float | None:
            for t, s in self.stats:
                if t >= after and s.get("workers_connected", 0) >= n:
                    return t
            return None

        found: float = self.wait_for(seen, timeout, f"{n} connected workers")
        return found

    def snapshot(self, timeout: float = 30.0) -> dict[str, Any]:
        """The supervisor's snapshot, as the application's handle sees it."""
        with self._cond:
            count = len(self._replies)
        self.send("snapshot")
        self.wait_for(lambda: len(self._replies) > count, timeout, "a snapshot")
        with self._cond:
            data: dict[str, Any] = self._replies[count]["data"]
        return data

    def close(self) -> None:
        """Ask the application to close its supervisor and exit; kill it if it does not."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.send("quit")
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                terminate(self.proc, grace=2)


class HeadProbe:
    """Watches the head node's remote port from inside the head: when does it reach the master?"""

    def __init__(self, lab: Lab, port: int, interval: float = 0.05) -> None:
        self.transitions: list[tuple[float, bool]] = []
        self._lock = threading.Lock()
        self.proc = lab.popen(
            HEAD,
            [sys.executable, "-m", "wqsupervisor.harness.lab", "probe", str(port), str(interval)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=_python_env(),
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError, KeyError):
                msg = json.loads(line)
                with self._lock:
                    self.transitions.append((float(msg["t"]), bool(msg["answering"])))

    def recovered(self, since: float) -> float | None:
        """When the port answered again after ``since`` (``since`` itself if it never stopped).

        Answering at ``since``: the end of the first break after it, if any.
        Not answering at ``since``: the first answer after it. None: not yet.
        """
        with self._lock:
            history = list(self.transitions)
        before = [a for t, a in history if t < since]
        after = [(t, a) for t, a in history if t >= since]
        if before and before[-1]:
            breaks = [t for t, a in after if not a]
            if not breaks:
                return since
            after = [(t, a) for t, a in after if t > breaks[0]]
        return next((t for t, a in after if a), None)

    def close(self) -> None:
        """Stop probing."""
        terminate(self.proc, grace=1)


def start_node_workers(
    lab: Lab,
    remote_port: int,
    n: int = 1,
    *,
    idle_timeout: int = 600,
    cores: int = 1,
    extra: Sequence[str] = (),
) -> list[subprocess.Popen[Any]]:
    """n node launchers on ``node``, each an ssh -L hop to the head and a worker through it."""
    from ..launcher import NodeLauncher

    launcher = NodeLauncher(
        remote_port=remote_port,
        via="headnode",
        ssh_args=["-F", str(lab.node_ssh_config)],
        idle_timeout=idle_timeout,
        cores=cores,
        memory_mb=512,
        disk_mb=1024,
        worker_args=tuple(extra),
    )
    script = launcher.write(lab.root / f"launch-{remote_port}.sh")
    return [
        lab.popen(
            NODE,
            ["sh", str(script)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(n)
    ]


# -- the campus-side application and a prober, run inside namespaces -----------------------


def _autossh(monitor: bool) -> Callable[[str, int, int], tuple[list[str], dict[str, str]]]:
    def command(ssh_config: str, remote_port: int, master_port: int) -> tuple[list[str], dict[str, str]]:
        forward = [
            "-o",
            "ExitOnForwardFailure=yes",
            "-N",
            "-R",
            f"127.0.0.1:{remote_port}:localhost:{master_port}",
        ]
        if monitor:
            # (c) autossh's own monitor ports and its defaults (poll every 600 s).
            return ["autossh", "-M", str(remote_port + 10000), "-F", ssh_config, *forward, "headnode"], {}
        # (b) -M 0 with ssh's keepalives, restarted whatever the exit.
        keepalive = ["-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=3"]
        argv = ["autossh", "-M", "0", "-F", ssh_config, *keepalive, *forward, "headnode"]
        return argv, {"AUTOSSH_GATETIME": "0"}

    return command


# Who keeps a comparator's tunnel in the lab app: autossh as people run it today.
TUNNELS: dict[str, Callable[[str, int, int], tuple[list[str], dict[str, str]]] | None] = {
    "wqsupervisor": None,
    "autossh-M0": _autossh(monitor=False),
    "autossh-monitor": _autossh(monitor=True),
}


def _app(argv: list[str]) -> int:
    """A master with a supervised tunnel, driven by stdin, reporting JSON lines on stdout."""
    import argparse
    import queue

    parser = argparse.ArgumentParser(prog="python -m wqsupervisor.harness.lab app")
    parser.add_argument("--ssh-config", required=True)
    parser.add_argument("--remote-port", type=int, required=True)
    parser.add_argument("--settings", default="{}", help="more supervisor settings, as JSON")
    parser.add_argument("--binding", default="debian", choices=("debian", "server"))
    parser.add_argument(
        "--tunnel",
        default="wqsupervisor",
        choices=sorted(TUNNELS),
        help="who keeps the tunnel: wqsupervisor, or autossh as the HOWTO's users run it",
    )
    args = parser.parse_args(argv)

    from ..config import settings_from_kwargs
    from ..master import read_stats
    from ..supervisor import supervise

    lock = threading.Lock()

    def say(kind: str, **data: Any) -> None:
        with lock:
            print(json.dumps({"kind": kind, "t": time.time(), **data}), flush=True)

    if args.binding == "server":
        from ..wqserver import Task, WorkQueueServer

        q: Any = WorkQueueServer(name=f"lab-{os.getpid()}")
        make_task: Callable[[str, str], Any] = lambda cmd, tag: Task(cmd, tag=tag)  # noqa: E731
    else:
        import work_queue

        if debug_dir := os.environ.get("WQS_LAB_MASTER_DEBUG"):
            # Diagnostics: the master's own account of every worker it keeps or drops.
            work_queue.cctools_debug_flags_set("wq")
            work_queue.cctools_debug_config_file(f"{debug_dir}/master-{args.tunnel}-{os.getpid()}.log")
        q = work_queue.WorkQueue(port=0, name=f"lab-{os.getpid()}")

        def make_task(cmd: str, tag: str) -> Any:
            t = work_queue.Task(cmd)
            t.specify_tag(tag)
            return t

    sup: Any = None
    autossh: subprocess.Popen[bytes] | None = None
    if args.tunnel == "wqsupervisor":
        settings = settings_from_kwargs(
            {
                "via": "headnode",
                "ssh_config": args.ssh_config,
                "remote_port": args.remote_port,
                "allow_no_password": True,
                **json.loads(args.settings),
            }
        )
        sup = supervise(q, settings, on_event=lambda e: say("event", data=e.to_dict()), log_events=False)
    else:
        make = TUNNELS[args.tunnel]
        assert make is not None
        argv_, env = make(args.ssh_config, args.remote_port, q.port)
        autossh = subprocess.Popen(
            owned_argv(argv_),
            env=dict(os.environ, **env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    commands: queue.Queue[str] = queue.Queue()

    def read_commands() -> None:
        for text in sys.stdin:
            commands.put(text)

    threading.Thread(target=read_commands, daemon=True).start()
    say(
        "ready",
        master_port=q.port,
        agent_pid=sup._agent.pid if sup and sup._agent else None,
        autossh_pid=autossh.pid if autossh else None,
    )
    outstanding = 0
    next_tag = 0
    last_stats = 0.0
    while True:
        with contextlib.suppress(queue.Empty):
            while line := commands.get_nowait().split():
                if line[0] == "quit":
                    if sup is not None:
                        sup.close()
                    if autossh is not None:
                        terminate(autossh, grace=3)
                    say("closed")
                    return 0
                if line[0] == "submit":
                    for _ in range(int(line[1])):
                        tag = str(next_tag)
                        q.submit(make_task(" ".join(line[2:]).replace("{i}", tag), tag))
                        next_tag += 1
                        outstanding += 1
                elif line[0] == "busy":
                    say("busy", seconds=float(line[1]))
                    time.sleep(float(line[1]))
                    say("idle")
                elif line[0] == "snapshot" and sup is not None:
                    say("snapshot", data=sup.snapshot())
        if outstanding:
            result = q.wait(1)
            if result is not None:
                outstanding -= 1
                output = result.output if isinstance(result.output, str) else ""
                say(
                    "result",
                    tag=result.tag,
                    output=output.strip(),
                    status=getattr(result, "return_status", None),
                )
        else:
            time.sleep(0.05)
        if time.monotonic() - last_stats > 0.5:
            last_stats = time.monotonic()
            say("stats", stats=read_stats(q).to_dict())


def _probe(argv: list[str]) -> int:
    """Print a line each time ``queue_status`` on 127.0.0.1:PORT starts or stops answering."""
    port, interval = int(argv[0]), float(argv[1]) if len(argv) > 1 else 0.05
    from .bench.harness import queue_status

    answering: bool | None = None
    while True:
        reply = queue_status(port, timeout=0.5)
        now = reply is not None
        if now != answering:
            print(
                json.dumps({"t": time.time(), "answering": now, "port": (reply or {}).get("port")}),
                flush=True,
            )
            answering = now
        time.sleep(interval)


if __name__ == "__main__":
    command, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if command == "app":
        sys.exit(_app(rest))
    if command == "probe":
        sys.exit(_probe(rest))
    print("usage: python -m wqsupervisor.harness.lab {app|probe} ...", file=sys.stderr)
    sys.exit(2)
