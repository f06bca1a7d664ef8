"""A throwaway "head node" on loopback, and local workers, for the demo, tests and benchmarks.

:class:`HeadNode` runs a private OpenSSH ``sshd`` on 127.0.0.1 with fresh host
and user keys and a client config that names it ``headnode``; it touches
neither the machine's own sshd nor ``~/.ssh``. :func:`start_worker` starts a
real ``work_queue_worker`` that is given only the head node's forwarded port,
and :func:`workers` a few of them for the length of a block.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import privatedir, rundir
from ..children import descendants
from ..config import Settings
from ..errors import WQSupervisorError
from ..process import owned_argv, pid_alive, terminate, wait_gone

ALIAS = "headnode"
# Another sshd for the head node than the machine's (e.g. a newer OpenSSH built into /opt).
SSHD_ENV = "WQS_SSHD"


def _need(program: str, package: str) -> str:
    path = shutil.which(program) or (
        f"/usr/sbin/{program}" if os.path.exists(f"/usr/sbin/{program}") else None
    )
    if path is None:
        raise WQSupervisorError(f"{program} is not installed", f"apt-get install {package}")
    return path


def sshd_program() -> str:
    """The sshd a head node runs: ``$WQS_SSHD`` (an absolute path) if set, else the machine's."""
    chosen = os.environ.get(SSHD_ENV)
    if not chosen:
        return _need("sshd", "openssh-server")
    if not os.path.isabs(chosen) or not os.access(chosen, os.X_OK):
        # sshd re-executes itself (and, from OpenSSH 9.8, its sshd-session) by absolute path.
        raise WQSupervisorError(
            f"{SSHD_ENV}={chosen} is not an executable absolute path", f"unset {SSHD_ENV}, or fix the path"
        )
    return chosen


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HeadNode:
    """A private sshd on loopback that plays the cluster's head node."""

    def __init__(
        self,
        root: str | None = None,
        *,
        port: int = 0,
        user: str | None = None,
        host: str = "127.0.0.1",
        netns: str | None = None,
        addresses: list[str] | None = None,
    ) -> None:
        self._own_root = root is None
        # A run directory: when this process is killed, the next start on the machine removes it.
        self.root = Path(root or rundir.create("head"))
        self.root.mkdir(parents=True, exist_ok=True)
        # sshd reads authorized_keys from here as the login user.
        os.chmod(self.root, 0o755)  # noqa: S103
        self.host = host
        # The addresses clients use: one per network the head node sits on.
        self.addresses = addresses or [host]
        self.port = port or _free_port()
        self.user = user or getpass.getuser()
        self.netns = netns
        self.proc: subprocess.Popen[bytes] | None = None
        self.identity = self.root / "user_key"
        self.host_key = self.root / "host_key"
        self.known_hosts = self.root / "known_hosts"
        self.ssh_config = self.root / "ssh_config"
        self.sshd_config = self.root / "sshd_config"
        self.log = self.root / "sshd.log"
        self._keys()
        self._configs()

    def _keys(self) -> None:
        keygen = _need("ssh-keygen", "openssh-client")
        for key in (self.host_key, self.identity):
            if not key.exists():
                subprocess.run(
                    [
                        keygen,
                        "-q",
                        "-t",
                        "ed25519",
                        "-N",
                        "",
                        "-C",
                        "wqsupervisor-sandbox",
                        "-f",
                        str(key),
                    ],
                    check=True,
                )
        auth = self.root / "authorized_keys"
        auth.write_text(self.identity.with_suffix(".pub").read_text())
        os.chmod(auth, 0o644)
        host_pub = Path(str(self.host_key) + ".pub").read_text().strip()
        entries = [a if self.port == 22 else f"[{a}]:{self.port}" for a in self.addresses]
        self.known_hosts.write_text("".join(f"{e} {host_pub}\n" for e in entries))
        os.chmod(self.known_hosts, 0o644)

    def _configs(self) -> None:
        self.sshd_config.write_text(
            f"ListenAddress {self.host}\n"
            f"Port {self.port}\n"
            f"HostKey {self.host_key}\n"
            f"PidFile {self.root}/sshd.pid\n"
            f"AuthorizedKeysFile {self.root}/authorized_keys\n"
            "StrictModes no\n"
            "UsePAM no\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\n"
            "AllowTcpForwarding yes\n"
            "AllowStreamLocalForwarding yes\n"
            "PrintMotd no\n"
            "UseDNS no\n"
            "MaxStartups 100:30:200\n"
            "MaxSessions 100\n"
            "LogLevel INFO\n"
        )
        self.client_config(self.addresses[0], self.ssh_config)
        os.chmod(self.identity, 0o600)

    def client_config(self, address: str, path: Path, alias: str = ALIAS, append: bool = False) -> Path:
        """Write an ssh client config that names this head node ``alias`` at ``address``
        (``append``: add it to the file, beside the hosts already there)."""
        before = path.read_text() if append and path.exists() else ""
        path.write_text(
            before + f"Host {alias}\n"
            f"    HostName {address}\n"
            f"    Port {self.port}\n"
            f"    User {self.user}\n"
            f"    IdentityFile {self.identity}\n"
            "    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {self.known_hosts}\n"
            "    StrictHostKeyChecking yes\n"
            "    LogLevel ERROR\n"
        )
        return path

    def settings(self, **options: Any) -> Settings:
        """Supervisor settings that reach this head node by its alias.

        A sandbox head node is this machine and its user alone, so masters
        without a password are allowed here unless ``allow_no_password=False``.
        """
        options.setdefault("allow_no_password", True)
        return Settings(via=ALIAS, ssh_config=str(self.ssh_config), **options)

    def ssh_argv(self, *args: str) -> list[str]:
        """An ssh command line to this head node."""
        return ["ssh", "-F", str(self.ssh_config), "-o", "BatchMode=yes", ALIAS, *args]

    def _command(self) -> list[str]:
        argv = [sshd_program(), "-D", "-e", "-f", str(self.sshd_config)]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        return owned_argv(argv, "KILL")

    def start(self, timeout: float = 10.0) -> HeadNode:
        """Start sshd and wait until it greets connections."""
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        log = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise WQSupervisorError(
                    f"the sandbox sshd did not start: {self.log.read_text()[-400:]}",
                    "is openssh-server installed and the port free?",
                )
            time.sleep(0.02)
        return self

    def ready(self) -> bool:
        """True when sshd answers with its banner."""
        if self.netns:
            return self.proc is not None and self.proc.poll() is None and self._netns_ready()
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                return s.recv(4).startswith(b"SSH-")
        except OSError:
            return False

    def _netns_ready(self) -> bool:
        assert self.netns is not None
        probe = (
            f"import socket;s=socket.create_connection(('{self.addresses[0]}',{self.port}),0.5);"
            "raise SystemExit(0 if s.recv(4).startswith(b'SSH-') else 1)"
        )
        res = subprocess.run(
            ["ip", "netns", "exec", self.netns, "python3", "-c", probe],
            capture_output=True,
            check=False,
        )
        return res.returncode == 0

    def sessions(self) -> list[int]:
        """The per-connection sshd processes now running (listener excluded)."""
        if self.proc is None:
            return []
        return [p for p in descendants(self.proc.pid) if pid_alive(p)]

    def kill_sessions(self, sig: int = signal.SIGKILL) -> list[int]:
        """Kill every sshd session process (what a head node's admin or OOM killer does)."""
        pids = self.sessions()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def stop(self) -> None:
        """Stop sshd and every session it started."""
        if self.proc is None:
            return
        pids = self.sessions()
        terminate(self.proc, grace=2)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_gone(pids, 5)
        self.proc = None

    def restart(self, down_for: float = 0.0) -> None:
        """A reboot: sshd and all its sessions die, then sshd comes back on the same port."""
        self.stop()
        if down_for:
            time.sleep(down_for)
        self.start()

    def close(self) -> None:
        """Stop sshd and remove the keys and configs."""
        self.stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> HeadNode:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()


DEBIAN_DIST = Path("/usr/lib/python3/dist-packages")


def debian_work_queue_path() -> str:
    """A directory holding only Debian's ``work_queue`` module, to put on PYTHONPATH.

    Debian's python3-workqueue is a real SWIG master whose ``wait()`` holds the
    GIL, like ndcctools'. It is built for Debian's Python 3.11; the directory
    keeps the rest of Debian's dist-packages out of another 3.11 interpreter.
    """
    # In the user's own cache, checked: whatever this directory holds is imported,
    # as root in the lab, so nobody else may have put anything there.
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    target = privatedir.ensure(
        cache / "wqsupervisor" / "debian-work-queue", "the cache directory", "set XDG_CACHE_HOME or HOME"
    )
    names = ["work_queue.py", *(p.name for p in DEBIAN_DIST.glob("_work_queue*.so"))]
    for entry in target.iterdir():
        ours = entry.name in names and entry.is_symlink() and entry.readlink() == DEBIAN_DIST / entry.name
        if ours or entry.name == "__pycache__":  # the bytecode Python writes when it imports from here
            continue
        # Not one of our links: never import it.
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    for name in names:
        link = target / name
        if not link.is_symlink():
            with contextlib.suppress(FileExistsError):
                link.symlink_to(DEBIAN_DIST / name)
    if not (target / "work_queue.py").exists():
        raise WQSupervisorError(
            "Debian's work_queue Python bindings are not installed", "apt-get install python3-workqueue"
        )
    return str(target)


def start_worker(
    port: int,
    *,
    host: str = "127.0.0.1",
    cores: int = 1,
    max_backoff: int = 2,
    timeout: int = 300,
    workdir: str | None = None,
    password_file: str | None = None,
    extra: list[str] | None = None,
    quiet: bool = True,
    program: str | None = None,
) -> subprocess.Popen[bytes]:
    """A real ``work_queue_worker`` for ``host:port``, with a reconnect backoff fit for tunnels."""
    argv = [
        program or _need("work_queue_worker", "coop-computing-tools"),
        "--cores",
        str(cores),
        "--memory",
        "512",
        "--disk",
        "1024",
        "--min-backoff",
        "1",
        "--max-backoff",
        str(max_backoff),
        "-t",
        str(timeout),
    ]
    if workdir:
        argv += ["-s", workdir]
    if password_file:
        argv += ["-P", password_file]
    argv += [*(extra or []), host, str(port)]
    out = subprocess.DEVNULL if quiet else None
    return subprocess.Popen(owned_argv(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out)


@contextlib.contextmanager
def workers(port: int, n: int, *, program: str | None = None) -> Iterator[list[subprocess.Popen[bytes]]]:
    """n real workers on 127.0.0.1:port, stopped when the block ends."""
    procs = [start_worker(port, max_backoff=2, program=program) for _ in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            terminate(p, grace=2)
