"""``python -m wqsupervisor status``: what every running supervisor of this user is doing.

Each engine (the agent of a drop-in supervisor, or the ``run`` command)
listens on a unix socket ``<pid>-<n>.sock`` in :func:`status_dir`, a directory
only this user can enter (0700), the socket itself 0600. The status command
asks each for its snapshot (read-only) and prints it, or ``--json`` for
scripts. Sockets of supervisors that died are removed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from .logs import redact

_DIR_MODE = 0o700


def status_dir() -> Path:
    """``$XDG_RUNTIME_DIR/wqsupervisor`` when there is one, else ``~/.cache/wqsupervisor/run`` (0700)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = (
        Path(runtime) / "wqsupervisor"
        if runtime and Path(runtime).is_dir()
        else (Path.home() / ".cache" / "wqsupervisor" / "run")
    )
    base.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    os.chmod(base, _DIR_MODE)
    return base


_engines = itertools.count(1)


def new_socket_path() -> Path:
    """A socket path for one more engine of this process (``<pid>-<n>.sock``)."""
    return status_dir() / f"{os.getpid()}-{next(_engines)}.sock"


def ask(path: Path, timeout: float = 5.0) -> dict[str, Any]:
    """One snapshot from the engine listening on ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(b'{"op": "snapshot"}\n')
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    for line in buf.splitlines():
        reply = json.loads(line)
        if reply.get("reply") == "snapshot":
            data: dict[str, Any] = reply["data"]
            return data
    raise OSError("no snapshot in the reply")


def collect(pid: int | None = None) -> list[dict[str, Any]]:
    """Snapshots of every running supervisor of this user (or of ``pid``); stale sockets are removed."""
    pattern = f"{pid}-*.sock" if pid else "*.sock"
    found = []
    for path in sorted(status_dir().glob(pattern)):
        try:
            found.append(redact(ask(path)))
        except (OSError, ValueError):
            owner = path.stem.split("-")[0]
            if owner.isdigit() and not Path(f"/proc/{owner}").exists():
                with contextlib.suppress(OSError):
                    path.unlink()
    return found


def _ago(at: float | None, now: float) -> str:
    if not at:
        return "?"
    seconds = max(0, now - at)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def format_text(snapshots: list[dict[str, Any]], now: float | None = None) -> str:
    """A human-readable report of the snapshots."""
    now = time.time() if now is None else now
    if not snapshots:
        return "no running wqsupervisor found for this user"
    lines: list[str] = []
    for snap in snapshots:
        lines.append(
            f"supervisor pid {snap.get('pid')} (wqsupervisor {snap.get('version')}), "
            f"started {_ago(snap.get('started'), now)}"
        )
        for entry in snap.get("masters", []):
            t, w, k = entry["tunnel"], entry["workers"], entry["tasks"]
            master = entry["master"]
            waits = master.get("reply_timeout")
            lines.append(
                f"  master port {master.get('port')}"
                + (f" ({master['name']})" if master.get("name") else "")
                + (f", waits {waits} s for a worker's reply" if waits else "")
            )
            rtt = f", rtt {t['rtt_ms']} ms" if t.get("rtt_ms") is not None else ""
            lines.append(
                f"    tunnel {t['via']}:{t['remote_port']}  {t['state'].upper()} since "
                f"{_ago(t.get('since'), now)}; restarts {t['restarts']}, stalls {t.get('stalls', 0)}"
                f"{rtt}; socket {t.get('socket')}, rto capped {t.get('rto_capped')}"
            )
            if t.get("last_error"):
                lines.append(f"      last error: {t['last_error']}")
            lines.append(
                f"    workers connected {w['connected']} (idle {w['idle']}, busy {w['busy']}, "
                f"peak {w['peak']})"
            )
            lines.append(f"    tasks waiting {k['waiting']}, running {k['running']}, done {k['done']}")
            jobs = entry.get("jobs")
            if jobs:
                states = ", ".join(
                    f"{s} {jobs.get(s, 0)}" for s in ("pending", "running", "done", "failed", "cancelled")
                )
                lines.append(f"    jobs ({jobs.get('system')}): {states}")
        events = snap.get("events", [])[-8:]
        if events:
            lines.append("  last events:")
            for e in events:
                clock = time.strftime("%H:%M:%S", time.localtime(e.get("at", 0)))
                extra = e.get("reason") or e.get("error") or e.get("why") or ""
                lines.append(f"    {clock} {e.get('event')} {e.get('source', '')} {extra}".rstrip())
    return "\n".join(lines)


def main(as_json: bool = False, pid: int | None = None) -> int:
    """Print the status; returns 0 when a supervisor answered, 1 when none runs."""
    snapshots = collect(pid)
    if as_json:
        print(json.dumps(snapshots, indent=2))
    else:
        print(format_text(snapshots))
    return 0 if snapshots else 1
