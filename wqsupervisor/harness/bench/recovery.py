"""Recovery after the ssh client is killed: wqsupervisor against autossh, interleaved.

For each kill: the time from SIGKILL of the tunnel's ssh to the head node's
remote port answering ``queue_status`` from the master again ("forward
restored"), and to every worker being connected again. Kills are spaced so
that each tunnel has been up for longer than wqsupervisor's ``stable_after``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time
from typing import Any, Protocol

from ..common import machine, queue_status, save, summary
from ..sandbox import HeadNode, workers
from .master import MasterProcess
from .tunnels import PlainSsh, Supervised


class Tool(Protocol):
    """A tunnel whose ssh a benchmark kills."""

    name: str
    remote_port: int

    def ssh_pid(self) -> int: ...

    def close(self) -> None: ...


def measure_kill(
    tool: Tool, master_port: int, n_workers: int, limit: float = 120.0
) -> dict[str, float | None]:
    """Kill the tool's ssh once; seconds to forward restored and to all workers back (None: not
    within ``limit``). The master on ``master_port`` must be answering status requests."""
    before = queue_status(master_port) or {}
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
            if through is not None and through.get("port") == master_port:
                restored = now - killed
        if workers_back is None:
            here = queue_status(master_port, timeout=0.3) or {}
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
        tools: list[tuple[Tool, MasterProcess]] = []
        for kind in ("wqsupervisor", "autossh"):
            master = MasterProcess(binding, pythonpath)
            stack.callback(master.close)
            tool: Tool = (
                Supervised(head, master.port)
                if kind == "wqsupervisor"
                else PlainSsh(head, master.port, session=True, autossh=True)
            )
            stack.callback(tool.close)
            stack.enter_context(workers(tool.remote_port, n_workers, program=worker_program))
            master.start("serve 100000")  # sit in wait() so status requests are answered
            tools.append((tool, master))
        for _, master in tools:
            wait_all_connected(master.port, n_workers)
        time.sleep(settle)
        for k in range(kills):
            for tool, master in tools:
                figures = measure_kill(tool, master.port, n_workers)
                results[tool.name].append(figures)
                progress(
                    f"kill {k + 1}/{kills} {tool.name}: "
                    f"forward restored in {fmt_seconds(figures['restored'])}, "
                    f"workers back in {fmt_seconds(figures['workers'])}"
                )
                if figures["workers"] is None:
                    wait_all_connected(master.port, n_workers, limit=300)
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


def fmt_seconds(seconds: float | None) -> str:
    """Seconds to three places, or that they did not come within the 120 s limit."""
    return "not within 120 s" if seconds is None else f"{seconds:.3f} s"


def wait_all_connected(master_port: int, n: int, limit: float = 60.0) -> None:
    """Until the master on ``master_port`` has ``n`` workers connected (RuntimeError after ``limit``)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        here = queue_status(master_port) or {}
        if int(here.get("workers_connected", 0)) >= n:
            return
        time.sleep(0.1)
    raise RuntimeError("the workers did not connect")


def main(argv: list[str] | None = None) -> int:
    """``benchmarks/recovery.py``: kill each tool's ssh in turn; medians and ratios on stdout."""
    parser = argparse.ArgumentParser(
        description="Median time from a killed ssh client to the forward restored and all workers back."
    )
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--binding", default="debian", choices=("debian", "ndcctools", "taskvine", "server"))
    parser.add_argument("--pythonpath", help="where ndcctools lives, for --binding ndcctools")
    parser.add_argument("--worker", help="work_queue_worker to use (e.g. /opt/cctools/bin/work_queue_worker)")
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args(argv)

    result = run(
        kills=args.kills,
        n_workers=args.workers,
        binding=args.binding,
        pythonpath=args.pythonpath,
        worker_program=args.worker,
    )
    save(result, args.out, "recovery.json")
    for name, tool in result["tools"].items():
        r, w = tool["restored"], tool["workers"]
        print(
            f"{name:13s} forward restored median {r['median']:.3f} s "
            f"(min {r['min']:.3f}, max {r['max']:.3f}, n={r['n']}); "
            f"all workers back median {w['median']:.2f} s (min {w['min']:.2f}, max {w['max']:.2f})"
        )
    print(
        f"ratio wqsupervisor/autossh: restored {result['ratio_restored_wqs_over_autossh']:.2f}, "
        f"workers {result['ratio_workers_wqs_over_autossh']:.2f}"
    )
    return 0
