"""How one supervised tunnel carries many workers: task rates by worker count, and what it costs.

For 2, 8, 32 and 64 real workers, each round starts a fresh master and
connects the workers directly, through the supervised tunnel with plain
forwarding (``--no-resume``), or through it with resumable forwarding (the
default: the head relay and the agent on the data path), in rotating order,
and runs empty tasks and tasks with a 1 MB input (sent uncached to every
task). The supervisor is a real agent process of its own, ``python -m
wqsupervisor attach`` (the engine the drop-in handle and ``run`` use): its CPU
time and resident memory, its ssh's and the head relay's, are read from /proc
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

from ...children import comm, descendants
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
PATHS = ("direct", "wqsupervisor", "resumable")
_TICKS = os.sysconf("SC_CLK_TCK")


class Attached:
    """``python -m wqsupervisor attach`` for one master: the agent as users run it, in its own process."""

    def __init__(self, head: HeadNode, master_port: int, resume: bool) -> None:
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
            "--resume" if resume else "--no-resume",
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
        """The agent's pid, its ssh's and the head relay's (the loopback head node is this machine)."""
        found = {"agent": self.proc.pid}
        for pid in descendants(self.proc.pid):
            if comm(pid) == "ssh":
                found["ssh"] = pid
        for entry in os.listdir("/proc"):
            if entry.isdigit() and comm(int(entry)) == "wqs-relay" and self._serves(int(entry)):
                found["relay"] = int(entry)
        return found

    def _serves(self, pid: int) -> bool:
        """The relay's command line ends with its bind address, port and linger: this tunnel's port?"""
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as fh:
            return str(self.remote_port).encode() in fh.read().split(b"\0")
        return False

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
        if kind != "direct":
            tunnel = Attached(head, master.port, resume=kind == "resumable")
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
    cost: dict[int, dict[str, dict[str, list[dict[str, float]]]]] = {
        n: {label: {p: [] for p in PATHS[1:]} for label, _, _ in sizes} for n in counts
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
                                cost[n][label][kind].append(used)
                            progress(
                                f"{n} workers, round {r + 1}/{rounds}, {kind}, {label}: "
                                f"steady {figures['steady']:.1f} tasks/s"
                            )
    out: dict[str, Any] = {"machine": machine(), "rounds": rounds, "counts": list(counts), "table": []}
    for n in counts:
        for label, _, tasks in sizes:
            compared = compare(
                raw[n][label], {"wqsupervisor": ("direct",), "resumable": ("direct", "wqsupervisor")}
            )
            row: dict[str, Any] = {"workers": n, "inputs": label, "tasks": tasks, "paths": compared}
            row["cost"] = {
                kind: {key: statistics.median_high(c.get(key, 0.0) for c in got) for key in got[0]}
                for kind, got in cost[n][label].items()
                if got
            }
            out["table"].append(row)
    return out


def _ratio(paths: dict[str, Any], kind: str, to: str) -> str:
    r = paths[kind]["ratios"][to]
    return f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"


def _cpu(cost: dict[str, float], *who: str) -> str:
    return ", ".join(f"{100 * cost.get(f'{w}_cpu', 0):.0f}%" for w in who)


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
        "| workers | inputs | direct tasks/s | plain tasks/s | plain / direct | resumable tasks/s "
        "| resumable / direct | resumable / plain | plain: agent, ssh CPU | resumable: agent, ssh, "
        "relay CPU | resumable: agent, ssh, relay RSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in result["table"]:
        paths, cost = row["paths"], row.get("cost", {})
        plain, resumable = cost.get("wqsupervisor", {}), cost.get("resumable", {})

        rss = ", ".join(f"{resumable.get(f'{w}_rss_mib', 0):.0f}" for w in ("agent", "ssh", "relay"))
        print(
            f"| {row['workers']} | {row['inputs']} | {paths['direct']['figure']['median']:.0f} | "
            f"{paths['wqsupervisor']['figure']['median']:.0f} | {_ratio(paths, 'wqsupervisor', 'direct')} | "
            f"{paths['resumable']['figure']['median']:.0f} | {_ratio(paths, 'resumable', 'direct')} | "
            f"{_ratio(paths, 'resumable', 'wqsupervisor')} | {_cpu(plain, 'agent', 'ssh')} | "
            f"{_cpu(resumable, 'agent', 'ssh', 'relay')} | {rss} MiB |"
        )
    return 0
