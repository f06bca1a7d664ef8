"""The tunnel's remote port on the head node: allocated once, and freed from stale sessions of ours.

:class:`RemotePort` lets the head node pick a free port for ``remote_port=0``,
and when the head refuses the port, finds out who holds it: a stale sshd
session of ours (ended), our own live tunnel to another master (left alone,
with an error), or something else (an error that names it).

The head-node scripts are POSIX ``sh`` with ``awk`` and read ``/proc``, so they need
no root and nothing installed on the head node. As an unprivileged user they
only see that user's processes, which is exactly the set the supervisor may
touch: it ends only an ``sshd`` process of its own user that holds exactly
the remote port, never anything else. They run the transport's own way
(:meth:`~wqsupervisor.session.SessionFactory.run_on_head`): a one-off ``ssh``
for OpenSSH, an exec channel for paramiko, which needs no ssh client.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .errors import TunnelError
from .forward import ForwardProver
from .master import MasterIdentity
from .relay.headmain import PROCESS_NAME
from .session import (
    LEASE_DIR,
    FailureKind,
    HeadRun,
    Owner,
    SessionEnded,
    SessionFactory,
    SessionFailed,
    SessionFailure,
)
from .target import SshTarget

# The name a head relay gives itself (/proc/PID/comm), so it is told from a foreign program.
RELAY_NAME = PROCESS_NAME.decode()
# What a session's process is called on the head (/proc/PID/comm): ``sshd`` up to OpenSSH
# 9.7; from 9.8 ``sshd-session``, and from 10.0 ``sshd-auth`` while it authenticates.
SESSION_NAMES = ("sshd", "sshd-session", "sshd-auth")

# The inodes of the sockets listening on $port, one a line, in $inodes.
_LISTENERS = r"""
hex=$(printf '%%04X' "$port")
inodes=$(awk -v p=":$hex" 'FNR > 1 && $4 == "0A" && toupper(substr($2, length($2) - 4)) == p { print $10 }' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null)
"""

_FIND_HOLDERS = (
    r"""
port=%(port)d
"""
    + _LISTENERS
    + r"""
echo "me $(id -u)"
[ -n "$inodes" ] || { echo free; exit 0; }
echo bound
inodes=" $(echo $inodes) "
pids=$(ls -l /proc/[0-9]*/fd 2>/dev/null | awk -v inodes="$inodes" '
    /^\/proc\/[0-9]+\/fd:$/ { split($0, a, "/"); pid = a[3]; next }
    / -> socket:\[/ { s = $NF; gsub(/socket:\[|\]/, "", s); if (index(inodes, " " s " ")) print pid }
' | sort -u)
if [ -z "$pids" ]; then
    # OpenSSH hides its sessions' descriptors from their own (unprivileged) user: the leases
    # of our live sessions say which of them forwards the port.
    for f in "$HOME/%(lease_dir)s"/*; do
        [ -f "$f" ] && [ -d "/proc/${f##*/}" ] || continue
        [ "$(head -n 1 "$f" | awk '{ print $5 }')" = "$port" ] && pids="$pids ${f##*/}"
    done
fi
for pid in $pids; do
    uid=$(awk '/^Uid:/ { print $2 }' "/proc/$pid/status" 2>/dev/null)
    echo "holder $pid $uid $(cat "/proc/$pid/comm" 2>/dev/null)"
    lease="$HOME/%(lease_dir)s/$pid"
    if [ -f "$lease" ]; then
        stamp=$(stat -c %%Y "$lease")
        echo "lease $pid $(( $(date +%%s) - stamp )) $stamp $(head -c 200 "$lease" | head -n 1)"
    fi
done
"""
)

_END_SESSION = (
    r"""
pid=%(pid)d
port=%(port)d
me=$(id -u)
running() {  # alive and not a zombie waiting for its parent
    state=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -c1)
    [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}
running || { echo gone; exit 0; }
case "$(cat "/proc/$pid/comm" 2>/dev/null)" in
    %(names)s) ;;
    *) echo "refused: not an sshd session"; exit 0 ;;
esac
[ "$(awk '/^Uid:/ { print $2 }' "/proc/$pid/status")" = "$me" ] || { echo "refused: not ours"; exit 0; }
"""
    + _LISTENERS
    + r"""
# Checked at the moment of the kill, so that a pid reused since the look is never ended.
inodes=" $(echo $inodes) "
[ "$inodes" != "  " ] || { echo "refused: port $port is not bound"; exit 0; }
fds=$(ls -l "/proc/$pid/fd" 2>/dev/null)
if [ -n "$fds" ]; then
    held=no
    for s in $(echo "$fds" | sed -n 's/.*socket:\[\([0-9]*\)\]$/\1/p'); do
        case "$inodes" in *" $s "*) held=yes ;; esac
    done
    [ "$held" = yes ] || { echo "refused: does not hold port $port"; exit 0; }
else
    # OpenSSH makes its session processes non-dumpable: their descriptors are hidden
    # from the user. Then it must be a tunnel's session (no terminal), never a login.
    case "$(tr '\000' ' ' < "/proc/$pid/cmdline" 2>/dev/null)" in
        *@notty*) ;;
        *) echo "refused: not a tunnel session"; exit 0 ;;
    esac
fi
kill -TERM "$pid" 2>/dev/null || { echo "refused: kill failed"; exit 0; }
kill -CONT "$pid" 2>/dev/null  # a hung (stopped) session takes TERM only once it runs
i=0
while running && [ $i -lt 20 ]; do sleep 0.05; i=$((i + 1)); done
running && kill -KILL "$pid" 2>/dev/null
echo ended
"""
)


@dataclass(frozen=True)
class Holder:
    """A process on the head node that holds the remote port."""

    pid: int
    uid: int | None
    command: str


@dataclass(frozen=True)
class Lease:
    """What a tunnel's session on the head says of its supervisor, and how long ago it last said it."""

    age: float
    owner: Owner
    stamp: int = 0
    """When the lease was last written, in the head's whole seconds: it changes at each renewal.
    (Ages are whole seconds too, so two ages cannot tell a renewal from a second's rounding.)"""

    @property
    def fresh(self) -> bool:
        """Renewed recently enough: the supervisor behind it is alive and reaches it."""
        return not self.owner.expired(self.age)


@dataclass(frozen=True)
class PortHolders:
    """What the head node says about a port: bound or not, and by whom (as far as we may see)."""

    bound: bool
    my_uid: int | None = None
    holders: tuple[Holder, ...] = field(default_factory=tuple)
    leases: tuple[tuple[int, Lease], ...] = ()
    """The leases of holders that are tunnels' sessions, by holder pid."""

    def lease(self, pid: int) -> Lease | None:
        """The lease of holder ``pid``, if it has one."""
        return next((lease for holder, lease in self.leases if holder == pid), None)

    def stale_candidates(self, known: set[int]) -> list[int]:
        """Our own sshd processes that hold the port: recorded sessions first (never our relay)."""
        ours = [h.pid for h in self.holders if h.command in SESSION_NAMES and h.uid == self.my_uid]
        if not ours or len(ours) + len(self.relays()) != len(self.holders):
            return []
        return sorted(ours, key=lambda pid: pid not in known)

    def relays(self) -> list[int]:
        """Our own head relays (resumable forwarding) that hold the port: never stale, never foreign."""
        return [h.pid for h in self.holders if h.command == RELAY_NAME and h.uid == self.my_uid]

    def describe(self) -> str:
        """Who holds the port, for an error message."""
        if not self.holders:
            return "another user's process (not visible to this account)"
        return ", ".join(f"{h.command or '?'} (pid {h.pid}, uid {h.uid})" for h in self.holders)


HeadRunner = Callable[[str, bytes, float], Awaitable[HeadRun]]
"""Runs a command on the head node: a :class:`~wqsupervisor.session.SessionFactory`'s ``run_on_head``."""


async def _run_script(run: HeadRunner, script: str, timeout: float) -> str:
    return (await run("sh -s", script.encode(), timeout)).out


def parse_holders(text: str) -> PortHolders:
    """Read the output of the holder script."""
    bound = False
    me: int | None = None
    holders: list[Holder] = []
    leases: list[tuple[int, Lease]] = []
    for line in text.splitlines():
        parts = line.split(None, 3)
        if not parts:
            continue
        if parts[0] == "lease" and len(parts) == 4 and parts[1].isdigit():
            stamp, _, rest = parts[3].partition(" ")
            owner = Owner.parse(rest)
            with contextlib.suppress(ValueError):
                if owner is not None:
                    leases.append((int(parts[1]), Lease(float(parts[2]), owner, int(stamp))))
            continue
        if parts[0] == "bound":
            bound = True
        elif parts[0] == "me" and len(parts) > 1 and parts[1].isdigit():
            me = int(parts[1])
        elif parts[0] == "holder" and len(parts) >= 2 and parts[1].isdigit():
            uid = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else None
            holders.append(Holder(int(parts[1]), uid, parts[3].strip() if len(parts) > 3 else ""))
    return PortHolders(bound=bound, my_uid=me, holders=tuple(holders), leases=tuple(leases))


async def inspect_port(run: HeadRunner, port: int, timeout: float = 10.0) -> PortHolders:
    """Ask the head node whether ``port`` is bound on it, and by which processes."""
    out = await _run_script(run, _FIND_HOLDERS % {"port": port, "lease_dir": LEASE_DIR}, timeout)
    return parse_holders(out)


async def end_stale_session(run: HeadRunner, pid: int, port: int, timeout: float = 10.0) -> bool:
    """End session process ``pid`` on the head node if it is ours and holds ``port``; True when it is gone."""
    script = _END_SESSION % {"pid": pid, "port": port, "names": "|".join(SESSION_NAMES)}
    out = await _run_script(run, script, timeout)
    return out.strip().splitlines()[-1:] in (["ended"], ["gone"])


class RemotePort:
    """One tunnel's remote port: its number, and what to do when the head node refuses it."""

    def __init__(
        self,
        target: SshTarget,
        sessions: SessionFactory,
        prover: ForwardProver,
        port: int,
        *,
        on_reclaimed: Callable[[int], None],
    ) -> None:
        self.target = target
        self.port = port
        self._sessions = sessions
        self._prover = prover
        self._on_reclaimed = on_reclaimed

    async def allocate(self) -> int:
        """Let the head node pick a free port once; later restarts ask for that same port."""
        try:
            session = await self._sessions.start(
                master_port=self._prover.master.port, remote_port=0, probes=None
            )
        except SessionFailed as exc:
            raise exc.failure.as_error() from None
        try:
            async with asyncio.timeout(self.target.connect_timeout):
                await session.established()
                while (port := session.allocated_port) is None:
                    await asyncio.sleep(0.02)
            self.port = port
            return port
        except (SessionEnded, TimeoutError):
            await session.close()
            raise session.failure().as_error() from None
        finally:
            await session.close()

    async def end_stale(self, pid: int) -> None:
        """End our sshd process ``pid`` on the head node, which holds the port after its client left."""
        if await end_stale_session(self._sessions.run_on_head, pid, self.port):
            self._on_reclaimed(pid)

    async def reclaim(self, known_pid: int | None) -> SessionFailure | None:
        """Free the port from a stale sshd session of ours; never touch anything else.

        ``known_pid`` is the head's sshd of this tunnel's last session. Returns
        None when the port is free (again), or the failure to report.
        """
        holders = await inspect_port(self._sessions.run_on_head, self.port)
        if not holders.bound:
            return None
        known = {known_pid} if known_pid else set()
        stale = holders.stale_candidates(known=known)
        dest = self.target.destination
        for pid in stale:
            lease = holders.lease(pid)
            if pid in known or lease is None or not lease.fresh or lease.owner.is_here():
                continue
            if await self._renewed(pid, lease):
                # A live supervisor renews this lease: its tunnel is not stale, whatever its master says.
                return SessionFailure.port_owned(
                    f"remote port {self.port} on {dest}", "tunnel", lease.owner.describe()
                )
            return await self.reclaim(known_pid)  # its lease has run out meanwhile
        if stale and not set(stale) <= known:
            # An sshd of ours that this tunnel did not start (an earlier run?). If a
            # master still answers through it, it is someone's live tunnel: leave it.
            owner = await self.owner()
            if owner is not None and not owner.matches(self._prover.expected()):
                return SessionFailure(
                    FailureKind.PORT_TAKEN,
                    f"remote port {self.port} on {dest} is in use by another live tunnel "
                    f"of yours, to the {owner}",
                    "give each master its own --remote-port",
                    permanent=True,
                    port=self.port,
                )
        if stale:
            for pid in stale:
                await self.end_stale(pid)
            return None
        relays = holders.relays()
        if relays and len(relays) == len(holders.holders):
            # Our relay holds the port but did not answer its socket this time
            # (it is starting, or ending after its linger): try again, never kill it.
            return SessionFailure(
                FailureKind.PORT_TAKEN,
                f"remote port {self.port} on {dest} is held by a relay of yours (pid {relays[0]}) "
                "that did not answer",
                "it is reattached on the next attempt, or ends by itself after relay_linger",
                permanent=False,
                port=self.port,
            )
        return SessionFailure(
            FailureKind.PORT_TAKEN,
            f"remote port {self.port} on {dest} is in use by {holders.describe()}",
            f"pick another --remote-port, or stop what holds port {self.port} on the head node",
            permanent=True,
            port=self.port,
        )

    async def _renewed(self, pid: int, lease: Lease) -> bool:
        """Whether the lease of holder ``pid`` is renewed within a ping; if not, wait until it runs out."""
        started = time.monotonic()
        await asyncio.sleep(min(lease.owner.keepalive, 10.0) + 1.5)
        now = (await inspect_port(self._sessions.run_on_head, self.port)).lease(pid)
        waited = time.monotonic() - started
        if now is not None and now.stamp != lease.stamp:
            return True
        # Its supervisor is gone or cut off: the session is stale once the lease has run out.
        await asyncio.sleep(max(0.0, lease.owner.grace - lease.age - waited) + 0.5)
        return False

    async def owner(self) -> MasterIdentity | None:
        """Which master answers on the port through a one-off session, if any."""
        try:
            session = await self._sessions.start(master_port=None, remote_port=self.port, probes="owner")
        except (SessionFailed, TunnelError, OSError):
            return None
        try:
            async with asyncio.timeout(self.target.connect_timeout):
                await session.established()
            return await self._prover.owner(session)
        except (SessionEnded, TimeoutError, OSError):
            return None
        finally:
            await session.close()
