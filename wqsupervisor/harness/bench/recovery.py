"""Recovery after the ssh client is killed: wqsupervisor against autossh, interleaved.

For each kill: the time from SIGKILL of the tunnel's ssh to the head node's
remote port answering ``queue_status`` from the master again ("forward
restored"), and to every worker being connected again. Kills are spaced so
that each tunnel has been up for longer than wqsupervisor's ``stable_after``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Any, Protocol

from ..sandbox import HeadNode
from .harness import MasterProcess, PlainSsh, Supervised, machine, queue_status, summary, workers


class _Tool(Protocol):
    name: str
    remote_port: int

    def ssh_pid(self) -> int: ...

    def close(self) -> None: ...


def _measure(
    tool: _Tool, master: MasterProcess, n_workers: int, limit: float = 120.0
) -> dict[str, float | None]:
    """Kill the tool's ssh once; seconds to forward restored and to all workers back (None: not
    within ``limit``)."""
    before = queue_status(master.port) or {}
    joined_before = int(before.get("workers_joined", 0))
    pid = tool.ssh_pid()
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    restored = workers_back = None
    deadline = killed + limit
    while time.monotonic() < deadline and (restored is None or workers_back is None):
        now = time.monotonic()
        if restored is None:
            through = queue_status(tool.remote_port, timeout=0.3)
            if through is not None and through.get("port") == master.port:
                restored = now - killed
        if workers_back is None:
            here = queue_status(master.port, timeout=0.3) or {}
            if (
                int(here.get("workers_joined", 0)) >= joined_before + n_workers
                and int(here.get("workers_connected", 0)) >= n_workers
            ):
                workers_back = now - killed
        time.sleep(0.005 if restored is None else 0.05)
    return {"restored": restored, "workers": workers_back}


def run(
    kills: int = 10,
    n_workers: int = 2,
    settle: float = 6.0,
    binding: str = "debian",
    pythonpath: str | None = None,
    worker_program: str | None = None,
    progress: Any = print,
) -> dict[str, Any]:
    """Kill each tool's ssh ``kills`` times, alternating between the tools."""
    results: dict[str, list[dict[str, float | None]]] = {"wqsupervisor": [], "autossh": []}
    with contextlib.ExitStack() as stack:
        head = stack.enter_context(HeadNode())
        tools: list[tuple[_Tool, MasterProcess]] = []
        for kind in ("wqsupervisor", "autossh"):
            master = MasterProcess(binding, pythonpath)
            stack.callback(master.close)
            tool: _Tool = (
                Supervised(head, master.port)
                if kind == "wqsupervisor"
                else PlainSsh(head, master.port, session=True, autossh=True)
            )
            stack.callback(tool.close)
            stack.enter_context(workers(tool.remote_port, n_workers, program=worker_program))
            master.start("serve 100000")  # sit in wait() so status requests are answered
            tools.append((tool, master))
        for _, master in tools:
            _wait_all_connected(master, n_workers)
        time.sleep(settle)
        for k in range(kills):
            for tool, master in tools:
                figures = _measure(tool, master, n_workers)
                results[tool.name].append(figures)
                progress(
                    f"kill {k + 1}/{kills} {tool.name}: forward restored in {_fmt(figures['restored'])}, "
                    f"workers back in {_fmt(figures['workers'])}"
                )
                if figures["workers"] is None:
                    _wait_all_connected(master, n_workers, limit=300)
                time.sleep(settle)
    out: dict[str, Any] = {"machine": machine(), "kills": kills, "workers": n_workers, "tools": {}}
    for name, rows in results.items():
        out["tools"][name] = {
            "restored": summary([r["restored"] for r in rows if r["restored"] is not None]),
            "workers": summary([r["workers"] for r in rows if r["workers"] is not None]),
            "not_recovered_in_120s": sum(r["restored"] is None for r in rows),
            "raw": rows,
        }
    w, a = out["tools"]["wqsupervisor"], out["tools"]["autossh"]
    out["ratio_restored_wqs_over_autossh"] = w["restored"]["median"] / a["restored"]["median"]
    out["ratio_workers_wqs_over_autossh"] = w["workers"]["median"] / a["workers"]["median"]
    return out


def _fmt(seconds: float | None) -> str:
    return "not within 120 s" if seconds is None else f"{seconds:.3f} s"


def _wait_all_connected(master: MasterProcess, n: int, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        here = queue_status(master.port) or {}
        if int(here.get("workers_connected", 0)) >= n:
            return
        time.sleep(0.1)
    raise RuntimeError("the workers did not connect")
