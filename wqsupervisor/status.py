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
import time
from pathlib import Path

from . import privatedir
from .errors import WQSupervisorError
from .kinds import kind_named
from .protocol import JOB_STATES, EngineClient, SupervisorSnapshot


def status_dir() -> Path:
    """``$XDG_RUNTIME_DIR/wqsupervisor`` when there is one, else ``~/.cache/wqsupervisor/run`` (0700).

    Raises :class:`WQSupervisorError` when it cannot be made, or when it is not
    a directory of this user's own: sockets there answer with a supervisor's
    state, so another user's directory must not be used (nor re-moded).
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = (
        Path(runtime) / "wqsupervisor"
        if runtime and Path(runtime).is_dir()
        else (Path.home() / ".cache" / "wqsupervisor" / "run")
    )
    hint = "set XDG_RUNTIME_DIR (or HOME) to a directory of your own"
    if not (runtime and Path(runtime).is_dir()) and not Path.home().is_dir():
        raise WQSupervisorError(f"the home directory {Path.home()} is not a directory", hint)
    return privatedir.ensure(base, "the runtime directory", hint)


_engines = itertools.count(1)


def new_socket_path() -> Path:
    """A socket path for one more engine of this process (``<pid>-<n>.sock``)."""
    return status_dir() / f"{os.getpid()}-{next(_engines)}.sock"


def ask(path: Path, timeout: float = 5.0) -> SupervisorSnapshot:
    """One snapshot from the engine listening on ``path``."""
    with EngineClient.connect(str(path), timeout=timeout) as client:
        return client.snapshot()


def collect(pid: int | None = None) -> list[SupervisorSnapshot]:
    """Snapshots of every running supervisor of this user (or of ``pid``); stale sockets are removed."""
    pattern = f"{pid}-*.sock" if pid else "*.sock"
    found = []
    for path in sorted(status_dir().glob(pattern)):
        try:
            found.append(ask(path).redacted())
        except (OSError, WQSupervisorError):
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


def _kind_label(name: str) -> str:
    """'Work Queue master' for work_queue; a kind this version does not know keeps its name."""
    try:
        return kind_named(name).label
    except ValueError:
        return name


def format_text(snapshots: list[SupervisorSnapshot], now: float | None = None) -> str:
    """A human-readable report of the snapshots."""
    now = time.time() if now is None else now
    if not snapshots:
        return "no running wqsupervisor found for this user"
    lines: list[str] = []
    for snap in snapshots:
        lines.append(
            f"supervisor pid {snap.pid} (wqsupervisor {snap.version}), started {_ago(snap.started, now)}"
        )
        for entry in snap.masters:
            t, w, k, master = entry.tunnel, entry.workers, entry.tasks, entry.master
            waits = master.reply_timeout
            lines.append(
                f"  {_kind_label(master.kind)} port {master.port}"
                + (f" ({master.name})" if master.name else "")
                + (f", waits {waits} s for a worker's reply" if waits else "")
            )
            rtt = f", rtt {t.rtt_ms} ms" if t.rtt_ms is not None else ""
            lines.append(
                f"    tunnel {t.via}:{t.remote_port}  {t.state.value.upper()} since "
                f"{_ago(t.since, now)}; restarts {t.restarts}, stalls {t.stalls}"
                f"{rtt}; socket {t.socket}, rto capped {t.rto_capped}"
            )
            if t.last_error:
                lines.append(f"      last error: {t.last_error}")
            if t.relay is not None:
                lines.append(f"    {t.relay.describe()}")
            elif t.resume_off:
                lines.append(f"    resumption off: {t.resume_off}")
            lines.append(f"    workers connected {w.connected} (idle {w.idle}, busy {w.busy}, peak {w.peak})")
            lines.append(f"    tasks waiting {k.waiting}, running {k.running}, done {k.done}")
            jobs = entry.jobs
            if jobs is not None:
                states = ", ".join(f"{s} {jobs.count(s)}" for s in JOB_STATES)
                lines.append(f"    jobs ({jobs.system}): {states}")
        events = snap.events[-8:]
        if events:
            lines.append("  last events:")
            for e in events:
                clock = time.strftime("%H:%M:%S", time.localtime(e.at))
                extra = getattr(e, "reason", "") or getattr(e, "error", "") or getattr(e, "why", "") or ""
                lines.append(f"    {clock} {e.name} {e.source} {extra}".rstrip())
    return "\n".join(lines)


def main(as_json: bool = False, pid: int | None = None) -> int:
    """Print the status; returns 0 when a supervisor answered, 1 when none runs."""
    snapshots = collect(pid)
    if as_json:
        print(json.dumps([snap.to_dict() for snap in snapshots], indent=2))
    else:
        print(format_text(snapshots))
    return 0 if snapshots else 1
