"""Is one ssh connection the limit for bulk data? N streams through one tunnel against N tunnels.

Each round sends N x 64 MiB: once as N streams through one supervised tunnel
(one ssh connection, N channels), once as one stream through each of N
supervised tunnels to the same head node (N ssh connections), interleaved.
Plain forwarding, so that only ssh is measured. Where the N connections carry
more, spreading workers over several connections would pay.
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


def run(streams: int, rounds: int, mib: int = 64) -> dict[str, Any]:
    """Aggregate MB/s of ``streams`` streams: one connection against one per stream."""
    size = mib * MIB
    raw: dict[str, list[float]] = {"one": [], "many": []}
    with Bed() as bed:
        tunnels: list[Supervised] = []
        clients: list[Client] = []
        try:
            for _ in range(streams):
                tunnels.append(Supervised(bed.head, bed.server.port))
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
    args = parser.parse_args(argv)
    results = [run(n, args.rounds) for n in args.streams]
    save({"runs": results}, args.out, "connections.json")
    for res in results:
        r, n = res["ratio"], res["streams"]
        one, many = statistics.median(res["one_connection"]), statistics.median(res["connections"])
        print(
            f"{n} streams: one ssh connection {one:.0f} MB/s, {n} connections {many:.0f} MB/s, ratio "
            f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f}, n={res['rounds']})"
        )
    return 0
