"""Per-fault detection and recovery in the firewall lab: wqsupervisor against autossh.

For each fault, one lab runs three tunnels side by side, each with its own
master and two node workers: (a) wqsupervisor with its defaults, (b)
``autossh -M 0`` with ``ServerAliveInterval=15 ServerAliveCountMax=3``, and
(c) ``autossh -M <port>`` with its defaults. The fault hits all three at once
(a tunnel-specific fault hits each tunnel's own ssh or session). Figures per
tool:

* detection: wqsupervisor's first ``tunnel.stalled`` or ``tunnel.down``;
  autossh's ssh exiting (autossh acts only when ssh exits);
* forward: when the head's remote port reaches the master again, watched
  from inside the head (from the fault for instant faults, from the heal for
  outages); None when it did not within the window;
* workers: when every worker is connected again;
* lost: worker connections the master lost;
* requeued: tasks sent to a worker again (dispatches that neither completed
  nor are still on a worker), and the task-seconds that cost at most
  (requeued times the task's length);
* flowing: when a task completed again once every worker was back (from the
  fault for instant faults, from the heal for outages), and for supervised
  tools, after the tunnel was up again;
* restarts (wqsupervisor only): sessions it replaced, to tell a loss that came
  with a replacement from one the master decided alone.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...children import comm, descendants
from ...process import pid_alive
from ..common import machine, save, summary
from ..lab import Lab
from ..labapps import CampusApp, HeadProbe, start_node_workers


@dataclass(frozen=True)
class _Spec:
    port: int
    tunnel: str  # who keeps it, as the lab app's --tunnel
    settings: dict[str, Any] = field(default_factory=dict)
    resume_hop: bool = False  # the node launchers' hops resume too (node relays)

    @property
    def supervised(self) -> bool:
        """True when wqsupervisor keeps this tool's tunnel."""
        return self.tunnel == "wqsupervisor"


TOOLS = {
    "wqsupervisor": _Spec(10001, "wqsupervisor", {"resume": False}),
    "wqsupervisor-resumable": _Spec(10005, "wqsupervisor", {"backend": "resumable"}),
    "autossh-M0": _Spec(10002, "autossh-M0"),
    "autossh-monitor": _Spec(10003, "autossh-monitor"),
}
# On request (--tools): wqsupervisor leaving the master's own 5 s reply
# timeout, to tell what the tunnel does from what the master's timeout does.
EXTRA_TOOLS = {
    "wqsupervisor-master-5s": _Spec(10004, "wqsupervisor", {"master_timeout": 0, "resume": False}),
    # Both the tunnel and the nodes' hops resumable (--resume-hop).
    "wqsupervisor-resumable-hops": _Spec(10006, "wqsupervisor", {"backend": "resumable"}, resume_hop=True),
}
WINDOW = 150.0


@dataclass
class _Tool:
    name: str
    app: CampusApp
    probe: HeadProbe
    spec: _Spec

    @property
    def port(self) -> int:
        """The head's remote port of this tool's tunnel."""
        return self.spec.port

    @property
    def supervised(self) -> bool:
        """True when wqsupervisor keeps this tool's tunnel."""
        return self.spec.supervised

    def ssh_pid(self) -> int | None:
        if self.supervised:
            pid = self.app.snapshot().masters[0].tunnel.ssh_pid
            return int(pid) if pid else None
        autossh = self.app.ready["autossh_pid"] if self.app.ready else None
        kids = [p for p in descendants(int(autossh or 0)) if comm(p) == "ssh"] if autossh else []
        return kids[0] if kids else None


Fault = tuple[Callable[[Lab, list[_Tool]], None], bool]


def _per_tunnel(act: Callable[[Lab, _Tool], None]) -> Callable[[Lab, list[_Tool]], None]:
    def apply(lab: Lab, tools: list[_Tool]) -> None:
        for tool in tools:
            act(lab, tool)

    return apply


def _outage(
    start: Callable[[Lab], None], end: Callable[[Lab], None], seconds: float
) -> Callable[[Lab, list[_Tool]], None]:
    def apply(lab: Lab, _tools: list[_Tool]) -> None:
        start(lab)
        time.sleep(seconds)
        end(lab)

    return apply


def _kill_ssh(lab: Lab, tool: _Tool) -> None:
    pid = tool.ssh_pid()
    if pid:
        os.kill(pid, signal.SIGKILL)


def _session(lab: Lab, tool: _Tool) -> int | None:
    """The tunnel's sshd session on the head (not the port's holder: with resumption, that is the relay)."""
    if tool.supervised:
        pid = tool.app.snapshot().masters[0].tunnel.remote_pid
        return int(pid) if pid else None
    return lab.port_holder(tool.port)


def _kill_session(lab: Lab, tool: _Tool) -> None:
    pid = _session(lab, tool)
    if pid:
        lab.kill_session(pid)


def _hang_session(lab: Lab, tool: _Tool) -> None:
    pid = _session(lab, tool)
    if pid:
        lab.stop_session(pid)


def _flap(lab: Lab, _tools: list[_Tool]) -> None:
    lab.flap(period=2.0, duration=30.0)


def _kill_hops(lab: Lab, _tools: list[_Tool]) -> None:
    for pid in lab.node_hops() + lab.node_relay_hops():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _busy(lab: Lab, tools: list[_Tool]) -> None:
    for tool in tools:
        tool.app.send("busy 60")
    time.sleep(62)


def faults() -> dict[str, Fault]:
    """Every fault of the lab: (apply it and block until healed, instant?)."""
    table: dict[str, Fault] = {
        "ssh-killed": (_per_tunnel(_kill_ssh), True),
        "session-killed": (_per_tunnel(_kill_session), True),
        "sshd-restarted": (lambda lab, _t: lab.restart_sshd(down_for=2.0), True),
        "peer-hung": (_per_tunnel(_hang_session), True),
        "link-down-5s": (_outage(Lab.link_down, Lab.link_up, 5), False),
        "link-down-90s": (_outage(Lab.link_down, Lab.link_up, 90), False),
        "flapping-30s": (_flap, False),
        "node-hop-killed": (_kill_hops, True),
        "busy-app-60s": (_busy, False),
    }
    for seconds in (5, 20, 90):
        for forget in (False, True):
            name = f"blackhole-{seconds}s-{'forgotten' if forget else 'kept'}"
            table[name] = (
                _outage(Lab.blackhole, lambda lab, f=forget: lab.heal(forget=f), seconds),  # type: ignore[misc]
                False,
            )
    return table


# Tasks queued per master: enough to keep two workers busy through the longest fault,
# few enough that the master answers queue_status fast (about 25 us per queued task).
BACKLOG = 5000
TASK_SECONDS = 0.2


def _one(
    name: str,
    fault: Fault,
    n_workers: int,
    progress: Callable[[str], None],
    specs: dict[str, _Spec],
    backlog: int = BACKLOG,
) -> dict[str, Any]:
    apply, instant = fault
    with Lab() as lab:
        tools: list[_Tool] = []
        for tool_name, spec in specs.items():
            app = CampusApp(lab, spec.port, tunnel=spec.tunnel, settings=spec.settings)
            start_node_workers(lab, spec.port, n=n_workers, resume_hop=spec.resume_hop)
            app.submit(backlog, f"sleep {TASK_SECONDS}; echo out-{{i}}")
            tools.append(_Tool(tool_name, app, HeadProbe(lab, spec.port), spec))
        for tool in tools:
            tool.app.wait_workers(n_workers, 120)
            tool.app.wait_for(functools.partial(_answering_now, tool), 60, "the forward")
        time.sleep(3)
        ssh_before = {t.name: t.ssh_pid() for t in tools}
        removed_before = {t.name: t.app.latest_stats().get("workers_removed", 0) for t in tools}
        stats_before = {t.name: dict(t.app.latest_stats()) for t in tools}
        began = time.time()
        detected: dict[str, float | None] = dict.fromkeys(specs)
        watch = _DetectionWatch(tools, ssh_before, detected, began)
        try:
            apply(lab, tools)
            healed = time.time()
            progress(f"{name}: fault at {began:.2f}, healed at {healed:.2f} (wall clock)")
            since = began if instant else healed
            deadline = time.monotonic() + WINDOW
            result: dict[str, Any] = {}
            pending = {t.name for t in tools}
            while pending and time.monotonic() < deadline:
                watch.poll()
                for tool in tools:
                    if (
                        tool.name in pending
                        and tool.probe.recovered(since)
                        and _workers_back(tool, n_workers, since)
                    ):
                        pending.discard(tool.name)
                time.sleep(0.1)
            watch.poll()
        finally:
            for tool in tools:
                with contextlib.suppress(Exception):
                    tool.probe.close()
                    tool.app.close()
        for tool in tools:
            back = tool.probe.recovered(since)
            workers = _workers_back(tool, n_workers, since)
            noticed = detected[tool.name]
            requeued = _requeued(stats_before[tool.name], tool.app.latest_stats())
            # Completions right after the fault may be results already on their way:
            # tasks flow again once every worker is back and a task completes.
            flowing = None if workers is None else _flowing(tool, max(since, workers))
            result[tool.name] = {
                "detected_s": None if noticed is None else noticed - began,
                "forward_s": None if back is None else back - since,
                "workers_s": None if workers is None else workers - since,
                "lost": tool.app.latest_stats().get("workers_removed", 0) - removed_before[tool.name],
                "requeued": requeued,
                "task_s_lost_max": round(requeued * TASK_SECONDS, 1),
                "flowing_s": None if flowing is None else flowing - since,
            }
            if tool.supervised:
                # Whether a loss came with a replaced session or without one.
                result[tool.name]["restarts"] = len(tool.app.named("tunnel.restarting", began))
                ups = [e["at"] for e in tool.app.named("tunnel.up", began)]
                if ups and flowing is not None:
                    result[tool.name]["flowing_after_up_s"] = flowing - min(ups)
        progress(f"{name}: " + "; ".join(f"{k} {_fmt(v)}" for k, v in result.items()))
        return result


def _requeued(before: dict[str, int], after: dict[str, int]) -> int:
    """Dispatches that did not end in a result and are not on a worker now: tasks tried again."""

    def delta(key: str) -> int:
        return after.get(key, 0) - before.get(key, 0)

    return max(0, delta("tasks_dispatched") - delta("tasks_done") - delta("tasks_on_workers"))


def _flowing(tool: _Tool, since: float) -> float | None:
    """The first stats line from ``since`` on with more tasks done than the last one before it."""
    before = [s.get("tasks_done", 0) for t, s in tool.app.stats if t < since]
    done0 = before[-1] if before else 0
    return next((t for t, s in tool.app.stats if t >= since and s.get("tasks_done", 0) > done0), None)


def _answering_now(tool: _Tool) -> float | None:
    return tool.probe.recovered(time.time())


def _workers_back(tool: _Tool, n: int, since: float) -> float | None:
    """When every worker was connected again after losing any (``since`` if none was lost).

    A worker loss shows as a fall of ``workers_connected`` or a rise of
    ``workers_removed``; the master may notice it a moment after the fault, so
    the count is only trusted once the loss has been seen or the fault is old.
    """
    stats = [(t, s) for t, s in tool.app.stats if t >= since]
    before = [s for t, s in tool.app.stats if t < since]
    removed0 = before[-1].get("workers_removed", 0) if before else 0
    lost_at = next(
        (t for t, s in stats if s.get("workers_connected", 0) < n or s.get("workers_removed", 0) > removed0),
        None,
    )
    if lost_at is None:
        return since if stats and stats[-1][0] - since > 10 else None
    return next((t for t, s in stats if t >= lost_at and s.get("workers_connected", 0) >= n), None)


class _DetectionWatch:
    """When each tool noticed the fault."""

    def __init__(
        self,
        tools: list[_Tool],
        ssh_before: dict[str, int | None],
        detected: dict[str, float | None],
        began: float,
    ) -> None:
        self.tools, self.ssh_before, self.detected, self.began = tools, ssh_before, detected, began

    def poll(self) -> None:
        for tool in self.tools:
            if self.detected[tool.name] is not None:
                continue
            if tool.supervised:
                seen = tool.app.named("tunnel.stalled", self.began) + tool.app.named(
                    "tunnel.down", self.began
                )
                if seen:
                    self.detected[tool.name] = min(e["at"] for e in seen)
            else:
                pid = self.ssh_before[tool.name]
                if pid is not None and not pid_alive(pid):
                    self.detected[tool.name] = time.time()


def _fmt(figures: dict[str, Any]) -> str:
    def s(v: float | None) -> str:
        return "never" if v is None else f"{v:.1f}s"

    return (
        f"detect {s(figures['detected_s'])} forward {s(figures['forward_s'])} "
        f"workers {s(figures['workers_s'])} lost {figures['lost']}"
        + f" requeued {figures.get('requeued', 0)} flowing {s(figures.get('flowing_s'))}"
        + (f" restarts {figures['restarts']}" if "restarts" in figures else "")
    )


def tool_names() -> list[str]:
    """Every tool the benchmark can run side by side (the first three by default)."""
    return [*TOOLS, *EXTRA_TOOLS]


def run(
    only: list[str] | None = None,
    reps: int = 1,
    n_workers: int = 2,
    progress: Callable[[str], None] = print,
    tools: list[str] | None = None,
) -> dict[str, Any]:
    """Every fault (or ``only`` these), ``reps`` times each, with ``tools`` (default: TOOLS)."""
    table = faults()
    names = only or list(table)
    every = TOOLS | EXTRA_TOOLS
    specs = {t: every[t] for t in tools} if tools else dict(TOOLS)
    raw: dict[str, list[dict[str, Any]]] = {}
    for _ in range(reps):
        for name in names:
            raw.setdefault(name, []).append(_one(name, table[name], n_workers, progress, specs))
    out: dict[str, Any] = {"machine": machine(), "reps": reps, "window_s": WINDOW, "faults": {}}
    for name, runs in raw.items():
        per_tool: dict[str, Any] = {}
        for tool in specs:
            rows = [r[tool] for r in runs]
            per_tool[tool] = {
                key: {
                    **summary([r[key] for r in rows if r[key] is not None]),
                    "never": sum(r[key] is None for r in rows),
                }
                for key in ("detected_s", "forward_s", "workers_s")
            } | {
                "lost": summary([r["lost"] for r in rows]),
                "requeued": summary([r.get("requeued", 0) for r in rows]),
                "task_s_lost_max": summary([r.get("task_s_lost_max", 0.0) for r in rows]),
                "flowing_s": summary([r["flowing_s"] for r in rows if r.get("flowing_s") is not None]),
            }
            if all("restarts" in r for r in rows):
                per_tool[tool]["restarts"] = summary([r["restarts"] for r in rows])
        out["faults"][name] = {"tools": per_tool, "raw": runs}
    return out


def _cell(figures: dict[str, Any]) -> str:
    if figures["n"] == 0:
        return "never"
    text = f"{figures['median']:.1f} ({figures['max']:.1f})"
    return text + (f" +{figures['never']} never" if figures.get("never") else "")


def _count(figures: dict[str, Any]) -> str:
    return "-" if figures["n"] == 0 else f"{figures['median']:g} ({figures['max']:g})"


def main(argv: list[str] | None = None) -> int:
    """``benchmarks/faults.py``: every fault (or some), the tools side by side, a table on stdout."""
    parser = argparse.ArgumentParser(
        description="Per fault: time to detection, to the forward working again, to all workers back, "
        "worker connections lost and tasks requeued, for wqsupervisor (resumable or not), autossh -M 0 "
        "and autossh -M PORT."
    )
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--only", nargs="*", choices=sorted(faults()))
    parser.add_argument("--out", default="bench-out")
    parser.add_argument(
        "--tools",
        nargs="*",
        choices=tool_names(),
        help="tools side by side (default: wqsupervisor wqsupervisor-resumable autossh-M0 autossh-monitor)",
    )
    args = parser.parse_args(argv)

    result = run(only=args.only, reps=args.reps, tools=args.tools)
    save(result, args.out, "faults.json")
    print(
        "| fault | tool | detected s, median (worst) | forward back s | workers back s | connections lost "
        "| tasks requeued | task-s lost (at most) | tasks flowing s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, fault in result["faults"].items():
        for tool, figures in fault["tools"].items():
            cells = [_cell(figures[k]) for k in ("detected_s", "forward_s", "workers_s")]
            cells += [_count(figures[k]) for k in ("lost", "requeued", "task_s_lost_max")]
            print(f"| {name} | {tool} | " + " | ".join([*cells, _cell(figures["flowing_s"])]) + " |")
    return 0
