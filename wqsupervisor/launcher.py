"""The node launcher: a POSIX ``sh`` script that runs one worker through the head node.

The head node's forwarded port is bound to its loopback, so a compute node
needs its own hop (the HOWTO's ``ssh -L 10002:localhost:10001 headnode``).
The script keeps that hop alive and runs ``work_queue_worker`` through it:

* the hop is an ``ssh -L`` carried by a session whose remote command waits
  (``cat`` on a FIFO nobody writes), not ``-N``: without a session sshd never
  sets TCP_NODELAY and every task waits on delayed ACKs;
* ``ExitOnForwardFailure`` and keepalives make a broken hop exit, and the
  script restarts it with a backoff (1 s doubling to 30 s, reset after a hop
  that lived 30 s), so a dead head node is not hammered;
* without a ``--disk`` of the user's, the worker claims half of the disk
  that is free where it works: claiming all of it (the worker's default), a
  worker sharing its node with other jobs forsakes every task that asks for
  the whole worker as soon as a neighbour writes (seen with 64 workers on one
  node: tasks sent twice and workers that never went idle);
* the worker gets ``--parent-death`` and a short reconnect backoff; when it
  ends (idle timeout, or the master released it) the script stops the hop,
  removes its files and exits with the worker's status.

* a TaskVine worker (``peer_transfers``) tells the manager where the other
  workers can fetch its files: the manager takes a worker's transfer address
  from the connection the worker came in on, which through the tunnel is
  ``127.0.0.1`` for every worker, so a worker on another node would look for
  the file on its own loopback. The script picks a free port on the node and
  gives the worker ``--transfer-port P --contact-hostport ADDR:P``, ADDR being
  the address the head node sees the hop come from (``$SSH_CONNECTION``: the
  node's address on the cluster's network, where the other nodes are).

With ``resume_hop`` the hop resumes, as the tunnel does: where the node has
a ``python3`` (3.6 or later), the script runs a *node relay* (the program the
tunnel sends to the head node, see :mod:`wqsupervisor.relay.headmain`)
that holds the worker's connection on the node and runs the hop's ssh
itself; that session runs a hop daemon on the head node which holds the
connection to the tunnel's port. When the hop's ssh or its session dies
(the head's sshd restarted with its sessions), the relay starts another
and both ends replay what the other had not acknowledged: the worker keeps
its connection and its tasks. With several head nodes the relay moves
between them as the plain hop does. A node without that Python, or
TaskVine's peer transfers (they need the node's address as the head sees
it), get the plain hop.

Without a hop (workers on the head node itself) the script runs the worker
against ``127.0.0.1:REMOTE_PORT`` directly (and its transfer address,
``127.0.0.1``, is right for the other workers there). Everything it writes is
0600/0700.
"""

from __future__ import annotations

import os
import shlex
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .relay.headmain import BOOTSTRAP, NODE_UP
from .relay.program import source

_TEMPLATE = r"""#!/bin/sh
# wqsupervisor node launcher, generated: one work_queue_worker through an ssh -L hop
# to the head node's forwarded Work Queue port. Do not edit; regenerate.
set -u
umask 077
REMOTE_PORT=%(remote_port)d
LOCAL_PORT=%(local_port)d
HOP=%(hop)d
IDLE=%(idle)d
MAX_BACKOFF=%(max_backoff)d
REFUSED_MOVE=%(refused_move)d
PEER=%(peer)d
RESUME_HOP=%(resume_hop)d
HOP_LINGER=%(hop_linger)d

log() { printf '%%s wqs-node[%%s]: %%s\n' "$(date '+%%H:%%M:%%S')" "$$" "$*" >&2; }

# The directories of launchers that were SIGKILLed (no trap ran): ours, their launcher gone.
for old in "${TMPDIR:-/tmp}"/wqs-node.*; do
    [ -d "$old" ] && [ -O "$old" ] && [ -f "$old/owner.pid" ] || continue
    kill -0 "$(cat "$old/owner.pid" 2>/dev/null)" 2>/dev/null || rm -rf "$old"
done
set -f  # no globbing from here on: the head nodes below are words
HEADS=%(heads)s
head=${HEADS%%%% *}
MANY_HEADS=0
[ "$head" != "$HEADS" ] && MANY_HEADS=1
tmp=$(mktemp -d "${TMPDIR:-/tmp}/wqs-node.XXXXXX") || { log "cannot create a temporary directory"; exit 1; }
echo $$ >"$tmp/owner.pid"
hop_loop_pid=
relay_pid=
worker_pid=
cleanup() {
    trap - EXIT INT TERM HUP
    [ -n "$worker_pid" ] && kill "$worker_pid" 2>/dev/null
    # The node relay ends its hop daemon on the head first (at most 2 s), then exits.
    [ -n "$relay_pid" ] && kill "$relay_pid" 2>/dev/null
    if [ -n "$hop_loop_pid" ]; then
        kill "$hop_loop_pid" 2>/dev/null
        [ -f "$tmp/hop.pid" ] && kill "$(cat "$tmp/hop.pid")" 2>/dev/null
    fi
    wait 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
trap 'exit 129' HUP

hop() {
    # $1: local port. The remote command says when the session runs, then waits on a
    # FIFO that only this script holds open, so it ends with the script. exec: the
    # background job's pid is ssh's own, so killing it ends the hop.
    exec %(ssh)s %(hop_options)s \
        -L "127.0.0.1:$1:127.0.0.1:$REMOTE_PORT" %(ssh_args)s "$head" %(hop_command)s \
        <"$tmp/keep" >"$tmp/hop.out" 2>"$tmp/hop.err"
}

start_hop() {
    # Start one hop in the background and wait until it carries a session; 0 when up.
    : >"$tmp/hop.out"
    hop "$1" &
    echo $! >"$tmp/hop.pid"
    i=0
    while [ $i -lt 1500 ]; do
        grep -q %(hop_up)s "$tmp/hop.out" 2>/dev/null && return 0
        kill -0 "$(cat "$tmp/hop.pid")" 2>/dev/null || return 1
        sleep 0.02
        i=$((i + 1))
    done
    stop_hop
    return 1
}

stop_hop() {
    # End the current hop and wait (at most 5 s) until its local port is free again.
    pid=$(cat "$tmp/hop.pid" 2>/dev/null) || return 0
    kill "$pid" 2>/dev/null || return 0
    i=0
    while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
}

next_head() {
    # The head node after $head in $HEADS, wrapping around.
    first=
    found=
    for h in $HEADS; do
        [ -z "$first" ] && first=$h
        if [ -n "$found" ]; then head=$h; return 0; fi
        [ "$h" = "$head" ] && found=1
    done
    head=$first
}

some_hop() {
    # A hop to the current head node, else to each of the others in turn; 0 when one is up.
    for _ in $HEADS; do
        start_hop "$1" && return 0
        [ "$LOCAL_PORT" = 0 ] && grep -q -e 'already in use' -e 'cannot listen' "$tmp/hop.err" && return 1
        failed=$head
        next_head
        [ "$head" = "$failed" ] && continue
        log "hop to $failed failed: $(tail -n 1 "$tmp/hop.err" 2>/dev/null); trying $head"
    done
    return 1
}

refused_too_long() {
    # With other heads to go to: 0 once the master's port behind this hop has refused the
    # worker (ssh's "open failed") for REFUSED_MOVE s on end: the tunnel is no longer on this
    # head, though its sshd still answers. A pause of a few s in the refusals means the
    # worker got through, and the count starts again. Called once a second.
    [ "$MANY_HEADS" = 1 ] || return 1
    now=$(date +%%s)
    n=$(grep -c 'open failed' "$tmp/hop.err" 2>/dev/null) || n=0
    if [ "$n" -gt "$refused" ]; then
        refused=$n
        last_refused=$now
        [ -z "$refused_since" ] && refused_since=$now
    elif [ -n "$last_refused" ] && [ $((now - last_refused)) -gt $((MAX_BACKOFF + 3)) ]; then
        refused_since=
        last_refused=
    fi
    [ -n "$refused_since" ] && [ $((now - refused_since)) -ge $REFUSED_MOVE ]
}

free_port() {
    # The first port from $1 on that no socket of this node listens on (/proc/net/tcp*).
    p=$1
    n=0
    while [ $n -lt 200 ]; do
        awk -v h=":$(printf '%%04X' "$p")" '$4 == "0A" && substr($2, length($2) - 4) == h { f = 1 }
            END { exit !f }' /proc/net/tcp /proc/net/tcp6 2>/dev/null || { echo "$p"; return 0; }
        p=$((p + 1)); [ "$p" -gt 60999 ] && p=30000
        n=$((n + 1))
    done
    return 1
}

relay_program() {
    cat <<'WQS_RELAY_PROGRAM'
@@RELAY_PROGRAM@@WQS_RELAY_PROGRAM
}

start_relay() {
    # A node relay that holds the worker's connection while the hop's ssh comes and goes (it runs
    # that ssh itself, and restarts it with a backoff); 0 once its first hop is up, its port in
    # $port. It gives up when no hop daemon answered 3 sessions (no Python on the head, say).
    command -v %(python)s >/dev/null 2>&1 || { log "no %(python)s on this node: a plain hop"; return 1; }
    %(python)s -c 'import sys; sys.exit(sys.version_info < (3, 6))' 2>/dev/null ||
        { log "%(python)s on this node is older than 3.6: a plain hop"; return 1; }
    relay_program >"$tmp/relay.py" || return 1
    %(python)s -c %(relay_boot)s %(relay_size)d node "$LOCAL_PORT" "$REMOTE_PORT" "$HOP_LINGER" \
        %(head_python)s "$REFUSED_MOVE" "$HEADS" %(ssh)s %(hop_options)s %(ssh_args)s \
        <"$tmp/relay.py" >"$tmp/relay.out" &
    relay_pid=$!
    i=0
    while [ $i -lt 1500 ]; do
        port=$(sed -n 's/^%(relay_up)s \([0-9]*\)$/\1/p' "$tmp/relay.out" 2>/dev/null)
        [ -n "$port" ] && return 0
        kill -0 "$relay_pid" 2>/dev/null || break
        sleep 0.02
        i=$((i + 1))
    done
    kill "$relay_pid" 2>/dev/null
    wait "$relay_pid" 2>/dev/null
    relay_pid=
    log "the node relay's hop did not come up: a plain hop"
    return 1
}

hop_loop() {
    delay=1
    while :; do
        wait_pid=$(cat "$tmp/hop.pid")
        started=$(date +%%s)
        refused=0
        refused_since=
        last_refused=
        while kill -0 "$wait_pid" 2>/dev/null; do
            sleep 1
            refused_too_long || continue
            log "hop to $head: the master's port there refused the worker" \
                "for $((now - refused_since))s; moving on"
            stop_hop
            next_head
            some_hop "$port" || log "hop restart failed: $(tail -n 1 "$tmp/hop.err" 2>/dev/null)"
            continue 2
        done
        lived=$(( $(date +%%s) - started ))
        [ "$lived" -ge 30 ] && delay=1
        why=$(tail -n 1 "$tmp/hop.err" 2>/dev/null)
        log "hop to $head ended after ${lived}s: $why; again in ${delay}s"
        sleep "$delay"
        delay=$((delay * 2)); [ "$delay" -gt 30 ] && delay=30
        some_hop "$port" || log "hop restart failed: $(tail -n 1 "$tmp/hop.err" 2>/dev/null)"
    done
}

if [ "$HOP" = 1 ] && [ "$RESUME_HOP" = 1 ] && [ "$PEER" = 0 ] && start_relay; then
    log "node relay up: 127.0.0.1:$port -> 127.0.0.1:$REMOTE_PORT on $HEADS, resumable"
    target_port=$port
elif [ "$HOP" = 1 ]; then
    mkfifo "$tmp/keep" || exit 1
    exec 3<>"$tmp/keep"
    port=$LOCAL_PORT
    [ "$port" = 0 ] && port=$(( 20000 + $$ %% 20000 ))
    tries=0
    delay=1
    until some_hop "$port"; do
        tries=$((tries + 1))
        if [ "$LOCAL_PORT" = 0 ] && grep -q -e 'already in use' -e 'cannot listen' "$tmp/hop.err"; then
            port=$((port + 1))
        else
            log "hop to the head node failed: $(tail -n 1 "$tmp/hop.err" 2>/dev/null); again in ${delay}s"
            sleep "$delay"
            delay=$((delay * 2)); [ "$delay" -gt 30 ] && delay=30
        fi
        [ $tries -ge 50 ] && { log "giving up on the hop"; exit 75; }
    done
    log "hop up: 127.0.0.1:$port -> $head:127.0.0.1:$REMOTE_PORT"
    # The head's sshd prints where the hop comes from: this node's address on the cluster's network.
    node_addr=$(sed -n 's/^%(hop_up)s \([0-9.]*\) .*/\1/p' "$tmp/hop.out" | head -n 1)
    hop_loop &
    hop_loop_pid=$!
    target_port=$port
else
    target_port=$REMOTE_PORT
fi

peer_args=
if [ "$PEER" = 1 ] && [ "$HOP" = 1 ]; then
    # Through the tunnel the manager sees every worker come from 127.0.0.1 and would send the
    # other workers there for this one's files: give it this node's address and a port of ours.
    if [ -n "$node_addr" ] && transfer_port=$(free_port $((30000 + $$ %% 30000))); then
        peer_args="--transfer-port $transfer_port --contact-hostport $node_addr:$transfer_port"
        log "peer transfers at $node_addr:$transfer_port"
    else
        log "no address of this node for peer transfers: other workers cannot fetch from this one"
    fi
fi

disk_arg=
if [ %(measure_disk)d = 1 ]; then
    # A worker claims all the disk that is free when it starts, and a task that asks for no
    # resources is given the whole worker: once a neighbour on the node writes a byte, the task
    # no longer fits and the worker forsakes it. Claim half of what is free instead.
    free=$(df -Pm "${TMPDIR:-/tmp}" 2>/dev/null | awk 'NR == 2 {print $4}')
    case "$free" in
        '' | *[!0-9]*) ;;
        *) [ "$free" -ge 2 ] && disk_arg="--disk=$((free / 2))" ;;
    esac
fi
%(worker)s --parent-death --min-backoff 1 --max-backoff "$MAX_BACKOFF" -t "$IDLE" \
    $disk_arg $peer_args %(worker_args)s 127.0.0.1 "$target_port" &
worker_pid=$!
wait "$worker_pid"
status=$?
worker_pid=
log "worker exited with status $status"
exit $status
"""


# The hop's ssh: a session (for TCP_NODELAY), a broken hop that exits instead of hanging, never
# someone else's master connection. The remote command says when the session runs, then waits.
# LogLevel INFO whatever the user's config says: a forward the head refuses ("channel N: open
# failed") is logged at that level, and the launcher counts those lines to leave a head the
# tunnel is no longer on.
HOP_OPTIONS = (
    "-T",
    "-o",
    "BatchMode=yes",
    "-o",
    "LogLevel=INFO",
    "-o",
    "ExitOnForwardFailure=yes",
    "-o",
    "ServerAliveInterval=5",
    "-o",
    "ServerAliveCountMax=3",
    "-o",
    "ControlMaster=no",
    "-o",
    "ControlPath=none",
)
HOP_UP = "wqs-hop-up"
# $SSH_CONNECTION is expanded on the head: "NODE_ADDR NODE_PORT HEAD_ADDR HEAD_PORT".
HOP_COMMAND = f"echo {HOP_UP} $SSH_CONNECTION; exec cat"


def hop_argv(
    via: str, local_port: int, remote_port: int, ssh_args: Sequence[str] = (), ssh: str = "ssh"
) -> list[str]:
    """The hop's command line, as the launcher runs it: 127.0.0.1:local_port to the head's remote port."""
    return [
        ssh,
        *HOP_OPTIONS,
        "-L",
        f"127.0.0.1:{local_port}:127.0.0.1:{remote_port}",
        *ssh_args,
        via,
        HOP_COMMAND,
    ]


def node_relay_argv(
    heads: Sequence[str],
    remote_port: int,
    ssh_args: Sequence[str] = (),
    ssh: str = "ssh",
    python: str = "python3",
    linger: int = 120,
    local_port: int = 0,
    head_python: str | None = None,
    refused_move: int = 10,
) -> list[str]:
    """A node relay's command line, as the launcher runs it with ``resume_hop``; its stdin must be
    the program (:func:`~wqsupervisor.relay.program.source`), and it prints ``wqs-node-relay-up
    PORT`` once its first hop is up, the worker's port being ``127.0.0.1:PORT``. ``python``
    runs it on the node, ``head_python`` (the same by default) its hop daemon on the head; it
    goes to ``heads`` in turn (see :class:`~wqsupervisor.relay.headmain.NodeRelay`)."""
    return [
        python,
        "-c",
        BOOTSTRAP,
        str(len(source())),
        "node",
        str(local_port),
        str(remote_port),
        str(linger),
        head_python or python,
        str(refused_move),
        " ".join(heads),
        ssh,
        *HOP_OPTIONS,
        *ssh_args,
    ]


@dataclass(frozen=True)
class NodeLauncher:
    """Settings of the generated script; :meth:`script` renders it, :meth:`write` saves it."""

    remote_port: int
    via: str | None = None
    also_via: Sequence[str] = field(default_factory=tuple)
    """Other head nodes of the cluster, tried in turn when a hop to the current one fails."""
    ssh_args: Sequence[str] = field(default_factory=tuple)
    ssh_program: str = "ssh"
    local_port: int = 0
    worker: str = "work_queue_worker"
    password_file: str | None = None
    cores: int | None = None
    memory_mb: int | None = None
    disk_mb: int | None = None
    idle_timeout: int = 900
    max_backoff: int = 2
    refused_move: int = 10
    """With other head nodes: seconds of refusals from the master's port behind the hop before
    the hop moves to the next head (the tunnel left this head while its sshd still answers)."""
    ssl: bool = False
    peer_transfers: bool = False
    """TaskVine's workers fetch files from each other: give each the node's own address for that."""
    resume_hop: bool = False
    """The hop resumes when its ssh dies (a node relay, where the node has :attr:`python`)."""
    hop_linger: int = 120
    """Seconds the hop daemon on the head holds the worker's connection for a node relay that went
    away: long enough for the relay's backoff across a head sshd restart, short enough that the
    master soon hears of a node that died."""
    python: str = "python3"
    """The node's Python (3.6 or later) for a resumable hop."""
    head_python: str | None = None
    """The head node's Python for the hop daemon (by default :attr:`python`)."""
    worker_args: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not 0 < self.remote_port < 65536:
            raise ValueError(f"remote_port {self.remote_port} is not a port")
        for via in (self.via, *self.also_via):
            if via is not None and (not via or via.startswith("-") or any(c.isspace() for c in via)):
                raise ValueError(f"via {via!r} is not an ssh destination")

    def _worker_args(self) -> list[str]:
        args: list[str] = []
        if self.password_file:
            args += ["-P", self.password_file]
        if self.cores is not None:
            args += ["--cores", str(self.cores)]
        if self.memory_mb is not None:
            args += ["--memory", str(self.memory_mb)]
        if self.disk_mb is not None:
            args += ["--disk", str(self.disk_mb)]
        if self.ssl:
            args.append("--ssl")
        return [*args, *self.worker_args]

    def script(self) -> str:
        """The launcher as POSIX ``sh`` text."""
        program = source().decode()
        text = _TEMPLATE % {
            "remote_port": self.remote_port,
            "local_port": self.local_port,
            "hop": 1 if self.via else 0,
            "idle": self.idle_timeout,
            "ssh": shlex.quote(self.ssh_program),
            "hop_options": " ".join(shlex.quote(a) for a in HOP_OPTIONS),
            "hop_command": shlex.quote(HOP_COMMAND),
            "hop_up": HOP_UP,
            "ssh_args": " ".join(shlex.quote(a) for a in self.ssh_args),
            "heads": shlex.quote(" ".join([self.via or "-", *self.also_via])),
            "worker": shlex.quote(self.worker),
            "worker_args": " ".join(shlex.quote(a) for a in self._worker_args()),
            "max_backoff": self.max_backoff,
            "refused_move": self.refused_move,
            "peer": 1 if self.peer_transfers else 0,
            "measure_disk": 1 if self.disk_mb is None else 0,
            "resume_hop": 1 if self.resume_hop else 0,
            "hop_linger": self.hop_linger,
            "python": shlex.quote(self.python),
            "head_python": shlex.quote(self.head_python or self.python),
            "relay_boot": shlex.quote(BOOTSTRAP),
            "relay_size": len(source()),
            "relay_up": NODE_UP,
        }
        # The program goes in last, as it is (it has % signs); a quoted here-document expands nothing.
        return text.replace("@@RELAY_PROGRAM@@", program if self.resume_hop else "")

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the script with mode 0700, atomically (no half-written file is ever seen)."""
        target = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=".wqs-launcher-", dir=target.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(self.script())
            os.chmod(tmp, 0o700)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target
