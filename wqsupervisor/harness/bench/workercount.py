"""How one supervised tunnel carries many workers: task rates by worker count, and what it costs.

For 2, 8, 32 and 64 real workers, each round starts a fresh master and
connects the workers either directly or through the supervised tunnel, in
alternating order, and runs empty tasks and tasks with a 1 MB input (sent
uncached to every task). The supervisor is a real agent process of its own,
``python -m wqsupervisor attach`` (the engine the drop-in handle and ``run``
use): its CPU time and resident memory, and its ssh's, are read from /proc
while the tasks run. Every worker is on this machine, so the direct rate is
the master's own limit with that many workers: where the supervised rate
stops following it is where the tunnel is the limit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ...children import descendants
from ...process import owned_argv, terminate
from ...wqserver import free_port
from ..common import machine, save
from ..sandbox import ALIAS, HeadNode, workers
from .master import MasterProcess
from .netpaths import wait_listening
from .report import compare, interleaved
from .taskrate import MB, input_files, rates

COUNTS = (2, 8, 32, 64)
SIZES = (("empty", 0, 400), ("1 MB", MB, 100))
PATHS = ("direct", "wqsupervisor")
_TICKS = os.sysconf("SC_CLK_TCK")


class Attached:
    """``python -m wqsupervisor attach`` for one master: the agent as users run it, in its own process."""

    def __init__(self, head: HeadNode, master_port: int) -> None:
        self.remote_port = free_port()
        argv = [
            sys.executable,
            "-m",
            "wqsupervisor",
            "attach",
            "--master-port",
            str(master_port),
            "--via",
            ALIAS,
            "--ssh-config",
            str(head.ssh_config),
            "--remote-port",
            str(self.remote_port),
            "--allow-no-password",
            "--no-resume",  # the figures are of the ssh connection; the relay has rows of its own in bench
        ]
        self.proc = subprocess.Popen(
            owned_argv(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_listening(self.remote_port, self.proc, timeout=60, what="wqsupervisor attach")
        except BaseException:
            self.close()
            raise

    def pids(self) -> dict[str, int]:
        """The agent's pid and its ssh's."""
        agent = self.proc.pid
        for pid in descendants(agent):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as fh:
                if fh.read().strip() == "ssh":
                    return {"agent": agent, "ssh": pid}
        return {"agent": agent}

    def close(self) -> None:
        """Stop the agent (it closes its tunnel)."""
        terminate(self.proc, grace=10)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid``, MiB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@contextlib.contextmanager
def _path(kind: str, head: HeadNode, n: int) -> Iterator[tuple[MasterProcess, Attached | None]]:
    with contextlib.ExitStack() as stack:
        master = MasterProcess("debian", None)
        stack.callback(master.close)
        tunnel = None
        if kind == "wqsupervisor":
            tunnel = Attached(head, master.port)
            stack.callback(tunnel.close)
        port = master.port if tunnel is None else tunnel.remote_port
        stack.enter_context(workers(port, n))
        answer = master.send(f"workers {n} 120")
        if not answer.startswith("ok"):
            raise RuntimeError(f"{kind}: {n} workers did not connect ({answer})")
        yield master, tunnel


def run(
    rounds: int = 3,
    counts: Sequence[int] = COUNTS,
    sizes: Sequence[tuple[str, int, int]] = SIZES,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Task rates for each worker count and size, direct and supervised interleaved; the agent's cost."""
    raw: dict[int, dict[str, dict[str, list[float]]]] = {
        n: {label: {p: [] for p in PATHS} for label, _, _ in sizes} for n in counts
    }
    cost: dict[int, dict[str, list[dict[str, float]]]] = {
        n: {label: [] for label, _, _ in sizes} for n in counts
    }
    with tempfile.TemporaryDirectory(prefix="wqs-bench-inputs-") as folder, HeadNode() as head:
        inputs = input_files(folder, sizes)
        for n in counts:
            for r in range(rounds):
                for kind in interleaved(PATHS, r):
                    with _path(kind, head, n) as (master, tunnel):
                        for label, _, tasks in sizes:
                            command = f"run {tasks} true"
                            if inputs[label]:
                                command += f" --input {inputs[label]}"
                            pids = tunnel.pids() if tunnel else {}
                            before = {k: cpu_seconds(p) for k, p in pids.items()}
                            started = time.monotonic()
                            result = json.loads(master.send(command))
                            wall = time.monotonic() - started
                            figures = rates(result, tasks, f"{kind}, {n} workers, {label}")
                            raw[n][label][kind].append(figures["steady"])
                            if pids:
                                used = {
                                    f"{k}_cpu": (cpu_seconds(p) - before[k]) / wall for k, p in pids.items()
                                }
                                used.update({f"{k}_rss_mib": rss_mib(p) for k, p in pids.items()})
                                cost[n][label].append(used)
                            progress(
                                f"{n} workers, round {r + 1}/{rounds}, {kind}, {label}: "
                                f"steady {figures['steady']:.1f} tasks/s"
                            )
    out: dict[str, Any] = {"machine": machine(), "rounds": rounds, "counts": list(counts), "table": []}
    for n in counts:
        for label, _, tasks in sizes:
            compared = compare(raw[n][label], {"wqsupervisor": ("direct",)})
            row: dict[str, Any] = {"workers": n, "inputs": label, "tasks": tasks, "paths": compared}
            if cost[n][label]:
                row["cost"] = {
                    key: statistics.median_high(c[key] for c in cost[n][label]) for key in cost[n][label][0]
                }
            out["table"].append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    """``benchmarks/worker_count.py``: the table, on stdout and in OUT/worker_count.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--counts", type=int, nargs="+", default=list(COUNTS))
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args(argv)
    result = run(rounds=args.rounds, counts=args.counts)
    save(result, args.out, "worker_count.json")
    print(
        "| workers | inputs | direct tasks/s | supervised tasks/s | supervised / direct "
        "| agent CPU | agent RSS | ssh CPU | ssh RSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in result["table"]:
        d, w = row["paths"]["direct"]["figure"], row["paths"]["wqsupervisor"]["figure"]
        c = row.get("cost", {})
        ratio = row["paths"]["wqsupervisor"]["ratios"]["direct"]
        print(
            f"| {row['workers']} | {row['inputs']} | {d['median']:.0f} | {w['median']:.0f} | "
            f"{ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f}) | "
            f"{100 * c.get('agent_cpu', 0):.1f}% | {c.get('agent_rss_mib', 0):.0f} MiB | "
            f"{100 * c.get('ssh_cpu', 0):.1f}% | {c.get('ssh_rss_mib', 0):.0f} MiB |"
        )
    return 0
