"""Is one ssh connection the limit for bulk data? N streams through one tunnel against N tunnels.

Each round sends N x 64 MiB: once as N streams through one supervised tunnel
(one ssh connection, N channels), once as one stream through each of N
supervised tunnels to the same head node (N ssh connections), interleaved.
Plain forwarding, so that only ssh is measured, or with ``--resume`` resumable
tunnels, each with its head relay. Where the N connections carry more,
spreading workers over several connections would pay.

:func:`run_tasks` asks the same of the workload itself: a real master sending
large inputs to N real workers, all through one tunnel against one tunnel per
worker, interleaved. The master sends a task's inputs before it turns to the
next worker, so only what the connections' buffers hold can overlap.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import threading
import time
from typing import Any

from ..common import machine, save, summary
from ..sandbox import HeadNode, workers
from .master import MasterProcess
from .netpaths import Bed
from .report import interleaved, paired_ratios
from .taskrate import input_files, rates
from .traffic import Client
from .tunnels import Supervised

MIB = 1024 * 1024
MB = 1_000_000


def run(streams: int, rounds: int, mib: int = 64, resume: bool = False) -> dict[str, Any]:
    """Aggregate MB/s of ``streams`` streams: one connection against one per stream (each
    tunnel with a head relay of its own when ``resume``)."""
    size = mib * MIB
    raw: dict[str, list[float]] = {"one": [], "many": []}
    with Bed() as bed:
        tunnels: list[Supervised] = []
        clients: list[Client] = []
        try:
            for _ in range(streams):
                tunnels.append(Supervised(bed.head, bed.server.port, resume=resume))
                clients.append(Client())
                bed.client.bulk(tunnels[-1].remote_port, 8 * MIB)  # windows grown first
            for r in range(rounds):
                for kind in interleaved(("one", "many"), r):
                    started = time.monotonic()
                    if kind == "one":
                        bed.client.bulk(tunnels[0].remote_port, size * streams, streams)
                    else:
                        threads = [
                            threading.Thread(target=c.bulk, args=(tunnel.remote_port, size))
                            for c, tunnel in zip(clients, tunnels, strict=True)
                        ]
                        for th in threads:
                            th.start()
                        for th in threads:
                            th.join()
                    raw[kind].append(size * streams / (time.monotonic() - started) / 1e6)
        finally:
            for c in clients:
                c.close()
            for tunnel in tunnels:
                tunnel.close()
    return {
        "machine": machine(),
        "streams": streams,
        "rounds": rounds,
        "forwarding": "resumable" if resume else "plain",
        "one_connection": raw["one"],
        "connections": raw["many"],
        "ratio": summary(paired_ratios(raw["many"], raw["one"])),
    }


def _task_rate(head: HeadNode, n_workers: int, kind: str, tasks: int, path: str, resume: bool) -> float:
    """Tasks/s of a fresh master whose workers share one tunnel (``one``), have one each (``many``)
    or connect to it directly (``direct``)."""
    with contextlib.ExitStack() as stack:
        master = MasterProcess()
        stack.callback(master.close)
        if kind == "direct":
            stack.enter_context(workers(master.port, n_workers))
        for _ in range({"one": 1, "many": n_workers}.get(kind, 0)):
            tunnel = Supervised(head, master.port, resume=resume)
            stack.callback(tunnel.close)
            stack.enter_context(workers(tunnel.remote_port, 1 if kind == "many" else n_workers))
        answer = master.send(f"workers {n_workers} 60")
        if not answer.startswith("ok"):
            raise RuntimeError(f"{kind}: the workers did not connect ({answer})")
        result = json.loads(master.send(f"run {tasks} true --input {path}"))
    # From submission to the last completion: with a few large tasks the first completions come in
    # pairs, and a rate from the first to the last would count one round of transfers too few.
    return rates(result, tasks, kind)["whole"]


def run_tasks(
    n_workers: int, rounds: int, mb: int = 100, tasks: int = 16, resume: bool = False
) -> dict[str, Any]:
    """Tasks/s with ``mb`` MB inputs on ``n_workers`` workers: one tunnel for all against one each,
    and the workers connected directly for scale."""
    raw: dict[str, list[float]] = {"one": [], "many": [], "direct": []}
    size = (("input", mb * MB, tasks),)
    with tempfile.TemporaryDirectory(prefix="wqs-bench-inputs-") as folder, HeadNode() as head:
        path = input_files(folder, size)["input"]
        assert path is not None
        for r in range(rounds):
            for kind in interleaved(tuple(raw), r):
                raw[kind].append(_task_rate(head, n_workers, kind, tasks, path, resume))
    return {
        "machine": machine(),
        "workers": n_workers,
        "input_mb": mb,
        "tasks": tasks,
        "rounds": rounds,
        "forwarding": "resumable" if resume else "plain",
        "one_connection": raw["one"],
        "connections": raw["many"],
        "direct": raw["direct"],
        "ratio": summary(paired_ratios(raw["many"], raw["one"])),
    }


def main(argv: list[str] | None = None) -> int:
    """``benchmarks/connections.py``: one line per stream count, and OUT/connections.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="bench-out")
    parser.add_argument(
        "--resume", action="store_true", help="resumable tunnels (a head relay each) instead of plain"
    )
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[],
        help="instead of bulk streams: a real master and this many workers, large inputs",
    )
    parser.add_argument("--input-mb", type=int, default=100, help="with --workers: each task's input")
    parser.add_argument("--tasks", type=int, default=16, help="with --workers: tasks per run")
    args = parser.parse_args(argv)
    if args.workers:
        results = [
            run_tasks(n, args.rounds, args.input_mb, args.tasks, resume=args.resume) for n in args.workers
        ]
        what, unit = "workers", "tasks/s"
    else:
        results = [run(n, args.rounds, resume=args.resume) for n in args.streams]
        what, unit = "streams", "MB/s"
    save({"runs": results}, args.out, "connections.json")
    for res in results:
        r, n = res["ratio"], res[what]
        one, many = statistics.median(res["one_connection"]), statistics.median(res["connections"])
        load = ""
        if what == "workers":
            load = f" ({res['input_mb']} MB inputs; direct {statistics.median(res['direct']):.1f} {unit})"
        print(
            f"{res['forwarding']}, {n} {what}{load}: one ssh connection {one:.1f} {unit}, "
            f"{n} connections {many:.1f} {unit}, ratio "
            f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f}, n={res['rounds']})"
        )
    return 0
