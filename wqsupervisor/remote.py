"""Looking at, and tidying, the head node over ssh: who holds the remote port.

Both scripts are POSIX ``sh`` with ``awk`` and read ``/proc``, so they need
no root and nothing installed on the head node. As an unprivileged user they
only see that user's processes, which is exactly the set the supervisor may
touch: it ends only an ``sshd`` process of its own user that holds exactly
the remote port, never anything else.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from .config import Settings
from .openssh import remote_argv

_FIND_HOLDERS = r"""
port=%(port)d
hex=$(printf '%%04X' "$port")
inodes=$(awk -v p=":$hex" 'FNR > 1 && $4 == "0A" && toupper(substr($2, length($2) - 4)) == p { print $10 }' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null)
echo "me $(id -u)"
[ -n "$inodes" ] || { echo free; exit 0; }
echo bound
inodes=" $(echo $inodes) "
ls -l /proc/[0-9]*/fd 2>/dev/null | awk -v inodes="$inodes" '
    /^\/proc\/[0-9]+\/fd:$/ { split($0, a, "/"); pid = a[3]; next }
    / -> socket:\[/ { s = $NF; gsub(/socket:\[|\]/, "", s); if (index(inodes, " " s " ")) print pid }
' | sort -u | while read -r pid; do
    uid=$(awk '/^Uid:/ { print $2 }' "/proc/$pid/status" 2>/dev/null)
    echo "holder $pid $uid $(cat "/proc/$pid/comm" 2>/dev/null)"
done
"""

_END_SESSION = r"""
pid=%(pid)d
port=%(port)d
me=$(id -u)
running() {  # alive and not a zombie waiting for its parent
    state=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -c1)
    [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}
running || { echo gone; exit 0; }
[ "$(cat "/proc/$pid/comm" 2>/dev/null)" = sshd ] || { echo "refused: not sshd"; exit 0; }
[ "$(awk '/^Uid:/ { print $2 }' "/proc/$pid/status")" = "$me" ] || { echo "refused: not ours"; exit 0; }
kill -TERM "$pid" 2>/dev/null || { echo "refused: kill failed"; exit 0; }
kill -CONT "$pid" 2>/dev/null  # a hung (stopped) session takes TERM only once it runs
i=0
while running && [ $i -lt 20 ]; do sleep 0.05; i=$((i + 1)); done
running && kill -KILL "$pid" 2>/dev/null
echo ended
"""


@dataclass(frozen=True)
class Holder:
    """A process on the head node that holds the remote port."""

    pid: int
    uid: int | None
    command: str


@dataclass(frozen=True)
class PortHolders:
    """What the head node says about a port: bound or not, and by whom (as far as we may see)."""

    bound: bool
    my_uid: int | None = None
    holders: tuple[Holder, ...] = field(default_factory=tuple)

    def stale_candidates(self, known: set[int]) -> list[int]:
        """Our own sshd processes that hold the port: recorded sessions first."""
        ours = [h.pid for h in self.holders if h.command == "sshd" and h.uid == self.my_uid]
        if not ours or len(ours) != len(self.holders):
            return []
        return sorted(ours, key=lambda pid: pid not in known)

    def describe(self) -> str:
        """Who holds the port, for an error message."""
        if not self.holders:
            return "another user's process (not visible to this account)"
        return ", ".join(f"{h.command or '?'} (pid {h.pid}, uid {h.uid})" for h in self.holders)


async def _run_script(settings: Settings, script: str, timeout: float) -> str:
    proc = await asyncio.create_subprocess_exec(
        *remote_argv(settings, "sh -s"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(script.encode()), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return ""
    return out.decode(errors="replace")


def parse_holders(text: str) -> PortHolders:
    """Read the output of the holder script."""
    bound = False
    me: int | None = None
    holders: list[Holder] = []
    for line in text.splitlines():
        parts = line.split(None, 3)
        if not parts:
            continue
        if parts[0] == "bound":
            bound = True
        elif parts[0] == "me" and len(parts) > 1 and parts[1].isdigit():
            me = int(parts[1])
        elif parts[0] == "holder" and len(parts) >= 2 and parts[1].isdigit():
            uid = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else None
            holders.append(Holder(int(parts[1]), uid, parts[3].strip() if len(parts) > 3 else ""))
    return PortHolders(bound=bound, my_uid=me, holders=tuple(holders))


async def inspect_port(settings: Settings, port: int, timeout: float = 10.0) -> PortHolders:
    """Ask the head node whether ``port`` is bound on it, and by which processes."""
    out = await _run_script(settings, _FIND_HOLDERS % {"port": port}, timeout)
    return parse_holders(out)


async def end_stale_session(settings: Settings, pid: int, port: int, timeout: float = 10.0) -> bool:
    """End sshd process ``pid`` on the head node if it is ours; True when it is gone."""
    out = await _run_script(settings, _END_SESSION % {"pid": pid, "port": port}, timeout)
    return out.strip().splitlines()[-1:] in (["ended"], ["gone"])
