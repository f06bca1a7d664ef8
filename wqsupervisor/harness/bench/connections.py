"""Is one ssh connection the limit for bulk data? N streams through one tunnel against N tunnels.

Each round sends N x 64 MiB: once as N streams through one supervised tunnel
(one ssh connection, N channels), once as one stream through each of N
supervised tunnels to the same head node (N ssh connections), interleaved.
Plain forwarding, so that only ssh is measured, or with ``--resume`` resumable
tunnels, each with its head relay. Where the N connections carry more,
spreading workers over several connections would pay.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Any

from ..common import machine, save
from .netpaths import Bed
from .report import interleaved
from .traffic import Client
from .tunnels import Supervised

MIB = 1024 * 1024


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
    ratios = [m / o for m, o in zip(raw["many"], raw["one"], strict=True)]
    return {
        "machine": machine(),
        "streams": streams,
        "rounds": rounds,
        "forwarding": "resumable" if resume else "plain",
        "one_connection": raw["one"],
        "connections": raw["many"],
        "ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
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
    args = parser.parse_args(argv)
    results = [run(n, args.rounds, resume=args.resume) for n in args.streams]
    save({"runs": results}, args.out, "connections.json")
    for res in results:
        r, n = res["ratio"], res["streams"]
        one, many = statistics.median(res["one_connection"]), statistics.median(res["connections"])
        print(
            f"{res['forwarding']}, {n} streams: one ssh connection {one:.0f} MB/s, "
            f"{n} connections {many:.0f} MB/s, ratio "
            f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f}, n={res['rounds']})"
        )
    return 0
