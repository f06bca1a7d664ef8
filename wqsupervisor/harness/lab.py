"""A firewall lab built from network namespaces, and the faults that break tunnels.

Three hosts and the network between two of them, each a network namespace
that the lab creates and removes::

    campus (master + supervisor) --veth-- router --veth-- head (sshd) --veth-- node (workers)
      10.250.0.1             10.250.0.2  10.250.2.1  10.250.2.2  10.250.1.1    10.250.1.2

* ``router`` forwards between campus and head only; it is where the network
  loses packets (:meth:`Lab.blackhole`), so both ends' TCP back off as in a
  real outage.
* ``head`` does not forward (``ip_forward=0``, FORWARD policy DROP), so
  ``node`` cannot reach ``campus``; ``campus`` drops TCP SYNs from its link to
  the router, so ``head`` cannot open connections into it. Campus and head
  route each other's link through the router; nothing else: no default
  route, nothing beyond the lab.
* ``head`` runs a real sshd (:class:`wqsupervisor.harness.sandbox.HeadNode`) for an
  unprivileged user that the lab creates and deletes, so nothing can lean on root.
* Workers on ``node`` reach the master only as the HOWTO says: their own
  ``ssh -L`` hop to the head, then the head's ``-R`` port.

Faults are methods: :meth:`Lab.link_down`, :meth:`Lab.blackhole` and
:meth:`Lab.heal` (keeping or forgetting the old connections), :meth:`Lab.flap`,
:meth:`Lab.restart_sshd`, :meth:`Lab.kill_session`, :meth:`Lab.stop_session`.
Everything is undone by :meth:`Lab.stop`, which also runs when the ``with``
block raises. Needs root, ``iproute2`` and ``iptables``.

:meth:`Lab.start_slurm` adds a real Slurm (:mod:`.slurm`). What runs on the
hosts, driven from outside (the campus application, node workers, a head-side
prober), is in :mod:`.labapps`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import WQSupervisorError
from ..process import owned_argv, terminate
from .common import run
from .sandbox import ALIAS, HeadNode
from .slurm import Slurm

CAMPUS, ROUTER, HEAD, NODE = "campus", "router", "head", "node"
# A second login node of the same cluster (Lab(heads=2)): its own links to the router and node.
HEAD2 = "head2"
HEAD2_ALIAS = "headnode2"
ROUTER_HEAD2_IP, HEAD2_CAMPUS_IP = "10.250.4.1", "10.250.4.2"
HEAD2_NODE_IP, NODE_HEAD2_IP = "10.250.3.1", "10.250.3.2"
CAMPUS_IP, ROUTER_CAMPUS_IP = "10.250.0.1", "10.250.0.2"
ROUTER_HEAD_IP, HEAD_CAMPUS_IP = "10.250.2.1", "10.250.2.2"
HEAD_NODE_IP, NODE_IP = "10.250.1.1", "10.250.1.2"
# Where a blackhole drops packets: in the network (the router's FORWARD chain), the default and
# what an outage does; or in the head's own INPUT and OUTPUT chains, the lab's first model, where a
# dropped outgoing packet is an error to the head's TCP, which then retries every 0.5 s instead of
# backing off (so it answers at once after the heal, as no real network lets it).
NETWORK, HOST_OUTPUT = "network", "host-output"


def remove_remains(namespaces: Iterable[str], users: Iterable[str], root: str | Path) -> None:
    """Kill what runs in ``namespaces`` or as ``users``, then delete them and the directory ``root``."""
    namespaces, users = list(namespaces), list(users)
    for ns in namespaces:
        for pid in run(["ip", "netns", "pids", ns], check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    for ns in namespaces:
        run(["ip", "netns", "delete", ns], check=False)
    for user in users:
        with contextlib.suppress(KeyError):
            pwd.getpwnam(user)
            run(["pkill", "-KILL", "-u", user], check=False)
            deadline = time.monotonic() + 5
            while run(["userdel", user], check=False).returncode == 8 and time.monotonic() < deadline:
                time.sleep(0.1)  # userdel refuses while a process of the user is still exiting
    shutil.rmtree(root, ignore_errors=True)


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


class Lab:
    """campus -- head -- node, with a real sshd on head and faults on demand."""

    def __init__(self, workdir: str | None = None, heads: int = 1) -> None:
        if os.geteuid() != 0:
            raise WQSupervisorError("the firewall lab needs root", "run the lab tests as root (CI does)")
        for tool in ("ip", "iptables"):
            if shutil.which(tool) is None:
                raise WQSupervisorError(f"{tool} is not installed", "apt-get install iproute2 iptables")
        self.tag = secrets.token_hex(3)
        if heads not in (1, 2):
            raise WQSupervisorError(f"a lab has 1 or 2 head nodes, not {heads}", "use heads=1 or heads=2")
        hosts = (CAMPUS, ROUTER, HEAD, NODE, HEAD2)[: 4 + (heads - 1)]
        self.ns = {h: f"wqs-{self.tag}-{h}" for h in hosts}
        # veth names are limited to 15 characters.
        self.veth = {
            (CAMPUS, ROUTER): f"c{self.tag}r",
            (ROUTER, CAMPUS): f"r{self.tag}c",
            (ROUTER, HEAD): f"r{self.tag}h",
            (HEAD, ROUTER): f"h{self.tag}r",
            (HEAD, NODE): f"h{self.tag}n",
            (NODE, HEAD): f"n{self.tag}h",
            (ROUTER, HEAD2): f"r{self.tag}g",
            (HEAD2, ROUTER): f"g{self.tag}r",
            (HEAD2, NODE): f"g{self.tag}n",
            (NODE, HEAD2): f"n{self.tag}g",
        }
        self.user = f"wqs{self.tag}"
        # Another user of the same head node, created on demand (see add_other_user).
        self.other_user = f"wqo{self.tag}"
        self.root = Path(workdir or tempfile.mkdtemp(prefix="wqs-lab-"))
        self.head: HeadNode | None = None
        self.head2: HeadNode | None = None
        self.campus_ssh_config = self.root / "ssh_config.campus"
        self.node_ssh_config = self.root / "ssh_config.node"
        self._blackholed: str | None = None
        self._forgotten: list[list[str]] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self.slurm = Slurm(self, node=NODE, head=HEAD, node_ip=NODE_IP)
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
            run(["ip", "netns", "add", ns])
            self.sh(ns, "ip link set lo up")
        links = [
            ((CAMPUS, ROUTER), CAMPUS_IP, ROUTER_CAMPUS_IP),
            ((ROUTER, HEAD), ROUTER_HEAD_IP, HEAD_CAMPUS_IP),
            ((HEAD, NODE), HEAD_NODE_IP, NODE_IP),
        ]
        if HEAD2 in self.ns:
            links += [
                ((ROUTER, HEAD2), ROUTER_HEAD2_IP, HEAD2_CAMPUS_IP),
                ((HEAD2, NODE), HEAD2_NODE_IP, NODE_HEAD2_IP),
            ]
        for (a, b), ip_a, ip_b in links:
            va, vb = self.veth[(a, b)], self.veth[(b, a)]
            run(
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
        rc, rh = self.veth[(ROUTER, CAMPUS)], self.veth[(ROUTER, HEAD)]
        self.sh(
            self.ns[ROUTER],
            "echo 1 > /proc/sys/net/ipv4/ip_forward && iptables -P FORWARD DROP"
            f" && iptables -A FORWARD -i {rc} -o {rh} -j ACCEPT"
            f" && iptables -A FORWARD -i {rh} -o {rc} -j ACCEPT",
        )
        self.sh(self.ns[CAMPUS], f"ip route add {HEAD_CAMPUS_IP}/32 via {ROUTER_CAMPUS_IP}")
        self.sh(self.ns[HEAD], f"ip route add {CAMPUS_IP}/32 via {ROUTER_HEAD_IP}")
        self.sh(self.ns[CAMPUS], f"iptables -A INPUT -i {self.veth[(CAMPUS, ROUTER)]} -p tcp --syn -j DROP")
        if HEAD2 in self.ns:
            rg = self.veth[(ROUTER, HEAD2)]
            self.sh(self.ns[HEAD2], "echo 0 > /proc/sys/net/ipv4/ip_forward && iptables -P FORWARD DROP")
            self.sh(
                self.ns[ROUTER],
                f"iptables -A FORWARD -i {rc} -o {rg} -j ACCEPT"
                f" && iptables -A FORWARD -i {rg} -o {rc} -j ACCEPT",
            )
            self.sh(self.ns[CAMPUS], f"ip route add {HEAD2_CAMPUS_IP}/32 via {ROUTER_CAMPUS_IP}")
            self.sh(self.ns[HEAD2], f"ip route add {CAMPUS_IP}/32 via {ROUTER_HEAD2_IP}")
        home = self.root / "home"
        # "*" and not the locked "!": sshd refuses locked accounts when it runs without PAM.
        run(
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
        self.head = self._head_node(HEAD, HEAD_CAMPUS_IP, HEAD_NODE_IP, ALIAS)
        if HEAD2 in self.ns:
            self.head2 = self._head_node(HEAD2, HEAD2_CAMPUS_IP, HEAD2_NODE_IP, HEAD2_ALIAS)
        self._user_ssh(home)
        self.head.start()
        if self.head2 is not None:
            self.head2.start()

    def _head_node(self, host: str, campus_ip: str, node_ip: str, alias: str) -> HeadNode:
        """A head node's sshd (not started) for the lab user, and its name in the campus and node configs."""
        head = HeadNode(
            str(self.root / host),
            port=22,
            user=self.user,
            host="0.0.0.0",  # noqa: S104 - the head listens on both of its links
            netns=self.ns[host],
            addresses=[campus_ip, node_ip],
        )
        append = host != HEAD
        head.client_config(campus_ip, self.campus_ssh_config, alias, append=append)
        head.client_config(node_ip, self.node_ssh_config, alias, append=append)
        return head

    def add_other_user(self) -> str:
        """A second unprivileged user on the head node: someone else who shares the machine."""
        run(
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
        for head in (self.head, self.head2):
            if head is not None:
                with contextlib.suppress(Exception):
                    head.stop()
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
        return run(["ip", "netns", "exec", ns, "sh", "-c", script]).stdout

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process on ``host``; it is stopped with the lab and dies with this process."""
        proc = subprocess.Popen(owned_argv(self.argv(host, argv), "KILL"), **kwargs)
        self._procs.append(proc)
        return proc

    # -- faults --------------------------------------------------------------------------

    def _campus_link(self, up: bool) -> None:
        cr = self.veth[(CAMPUS, ROUTER)]
        if not up:
            self.sh(self.ns[CAMPUS], f"ip link set {cr} down")
            return
        # The link's going down took the route through the router with it.
        self.sh(
            self.ns[CAMPUS],
            f"ip link set {cr} up"
            f" && ip route replace {HEAD_CAMPUS_IP}/32 via {ROUTER_CAMPUS_IP} dev {cr} onlink",
        )

    def link_down(self) -> None:
        """Take campus's link to the router down (both ends lose carrier; campus loses its route)."""
        self._campus_link(False)

    def link_up(self) -> None:
        """Bring campus's link to the router back."""
        self._campus_link(True)

    def _blackhole_rules(self, model: str) -> list[tuple[str, list[str]]]:
        """(host, iptables rule) that drop everything between campus and head in ``model``."""
        if model == NETWORK:
            return [(ROUTER, ["FORWARD", "-j", "DROP"])]
        if model == HOST_OUTPUT:
            hr = self.veth[(HEAD, ROUTER)]
            return [(HEAD, ["INPUT", "-i", hr, "-j", "DROP"]), (HEAD, ["OUTPUT", "-o", hr, "-j", "DROP"])]
        raise ValueError(f"no blackhole model {model!r}; {NETWORK!r} or {HOST_OUTPUT!r}")

    def blackhole(self, model: str = NETWORK) -> None:
        """Drop every packet between campus and head, both ways; every link stays up.

        ``model`` says where: :data:`NETWORK` (the router drops them, as an
        outage does) or :data:`HOST_OUTPUT` (the head's own chains; see there).
        """
        rules = self._blackhole_rules(model)
        self._blackholed = model
        for host, (chain, *rule) in rules:
            run(self.argv(host, ["iptables", "-I", chain, "1", *rule]))

    def heal(self, forget: bool = False) -> None:
        """End the blackhole. ``forget``: packets of connections opened before it stay dropped,
        as behind a NAT or firewall that lost its state; new connections pass."""
        model = self._blackholed or NETWORK
        if forget:
            for src, sport, dst, dport in self.campus_connections():
                there = ["-p", "tcp", "-s", src, "--sport", sport, "-d", dst, "--dport", dport, "-j", "DROP"]
                back = ["-p", "tcp", "-s", dst, "--sport", dport, "-d", src, "--dport", sport, "-j", "DROP"]
                if model == NETWORK:
                    rules = [(ROUTER, ["FORWARD", *there]), (ROUTER, ["FORWARD", *back])]
                else:
                    hr = self.veth[(HEAD, ROUTER)]
                    rules = [(HEAD, ["INPUT", "-i", hr, *there]), (HEAD, ["OUTPUT", "-o", hr, *back])]
                for host, (chain, *rule) in rules:
                    run(self.argv(host, ["iptables", "-I", chain, "1", *rule]))
                    self._forgotten.append([host, chain, *rule])
        if self._blackholed is not None:
            for host, (chain, *rule) in self._blackhole_rules(self._blackholed):
                run(self.argv(host, ["iptables", "-D", chain, *rule]))
            self._blackholed = None

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
        return [int(p) for p in run(["ip", "netns", "pids", self.ns[host]], check=False).stdout.split()]

    def node_hops(self) -> list[int]:
        """The ssh -L hop processes of the node launchers."""
        return self._node_ssh(lambda argv: b"-L" in argv)

    def node_relay_hops(self) -> list[int]:
        """The ssh processes of the node relays (resumable hops: their remote command runs a hop daemon)."""
        return self._node_ssh(lambda argv: any(b" hop 127.0.0.1 " in a for a in argv))

    def _node_ssh(self, match: Callable[[list[bytes]], bool]) -> list[int]:
        """The ssh processes on ``node`` whose command line ``match`` accepts."""
        found = []
        for pid in self.pids(NODE):
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if argv and argv[0].endswith(b"ssh") and match(argv):
                    found.append(pid)
        return found

    # -- a real single-node Slurm on the node ------------------------------------------

    def start_slurm(self, cpus: int = 4) -> str:
        """Start Slurm's daemons on ``node`` (see :class:`.slurm.Slurm`); returns the slurm.conf path."""
        return self.slurm.start(cpus)

    def stop_slurm(self) -> None:
        """Cancel every job, wait for the queue to empty, stop the daemons (and the lab's munged)."""
        self.slurm.stop()

    @property
    def slurm_conf(self) -> str:
        """The slurm.conf path once Slurm is started ("" before): clients need it in SLURM_CONF."""
        return self.slurm.conf

    def squeue(self) -> list[str]:
        """Jobs Slurm still holds (pending, running, completing, suspended)."""
        return self.slurm.squeue()

    @contextlib.contextmanager
    def fault(self, start: Callable[[], None], end: Callable[[], None]) -> Iterator[None]:
        """Apply a fault for the length of a block; the block's end heals it, even on error."""
        start()
        try:
            yield
        finally:
            end()
