"""Work Queue task throughput: direct, through the supervised tunnel, through the HOWTO's tunnel.

Each round starts a fresh master per path, connects the same number of real
workers through that path, runs the same tasks, and records every completion.
The steady rate is (N - 1) tasks over the time from the first completion to
the last, which leaves out the master's own one-second dispatch stall at the
start (see the facts file); the whole-run rate counts from submission. Paths
are interleaved inside each round, and each path's rate is divided by the
direct rate of the same round.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any

from ..sandbox import HeadNode
from .harness import MasterProcess, PlainSsh, Supervised, machine, summary, workers

PATHS = ("direct", "wqsupervisor", "ssh -N -R")
# The same forward as the HOWTO's, with a session: the ceiling an ssh relay allows.
SESSION = "ssh -T -R cat"


def _path(kind: str, head: HeadNode, master: MasterProcess) -> Any:
    if kind == "direct":
        return None
    if kind == "wqsupervisor":
        return Supervised(head, master.port)
    return PlainSsh(head, master.port, session=kind == SESSION)


def _one(
    kind: str,
    head: HeadNode,
    tasks: int,
    n_workers: int,
    command: str,
    binding: str,
    pythonpath: str | None,
    worker_program: str | None,
) -> dict[str, float]:
    with contextlib.ExitStack() as stack:
        master = MasterProcess(binding, pythonpath)
        stack.callback(master.close)
        path = _path(kind, head, master)
        if path is not None:
            stack.callback(path.close)
        port = master.port if path is None else path.remote_port
        stack.enter_context(workers(port, n_workers, program=worker_program))
        answer = master.send(f"workers {n_workers} 60")
        if not answer.startswith("ok"):
            raise RuntimeError(f"{kind}: workers did not connect ({answer})")
        result = master.run(tasks, command)
    done = sorted(result["done"])
    if len(done) != tasks:
        raise RuntimeError(f"{kind}: {len(done)} of {tasks} tasks came back")
    steady = (len(done) - 1) / (done[-1] - done[0]) if done[-1] > done[0] else float("inf")
    whole = len(done) / (done[-1] - result["submitted"])
    return {"steady": steady, "whole": whole}


def run(
    rounds: int = 5,
    tasks: int = 200,
    n_workers: int = 2,
    command: str = "true",
    paths: tuple[str, ...] = PATHS,
    binding: str = "debian",
    pythonpath: str | None = None,
    worker_program: str | None = None,
    progress: Any = print,
) -> dict[str, Any]:
    """Measure every path in every round, interleaved; ratios are to direct in the same round."""
    rows: dict[str, list[dict[str, float]]] = {p: [] for p in paths}
    with HeadNode() as head:
        for r in range(rounds):
            order = list(paths) if r % 2 == 0 else list(reversed(paths))
            for kind in order:
                figures = _one(kind, head, tasks, n_workers, command, binding, pythonpath, worker_program)
                rows[kind].append(figures)
                progress(
                    f"round {r + 1}/{rounds} {kind}: steady {figures['steady']:.1f} tasks/s, "
                    f"whole run {figures['whole']:.1f} tasks/s"
                )
                time.sleep(0.5)
    out: dict[str, Any] = {
        "machine": machine(),
        "rounds": rounds,
        "tasks": tasks,
        "workers": n_workers,
        "command": command,
        "binding": binding,
        "paths": {},
    }
    direct = rows.get("direct")
    for kind, samples in rows.items():
        entry: dict[str, Any] = {
            "steady": summary([f["steady"] for f in samples]),
            "whole": summary([f["whole"] for f in samples]),
            "raw": samples,
        }
        if direct and kind != "direct":
            ratios = [f["steady"] / d["steady"] for f, d in zip(samples, direct, strict=True)]
            entry["steady_ratio_to_direct"] = summary(ratios)
            wholes = [f["whole"] / d["whole"] for f, d in zip(samples, direct, strict=True)]
            entry["whole_ratio_to_direct"] = summary(wholes)
        out["paths"][kind] = entry
    if "wqsupervisor" in rows and "ssh -N -R" in rows:
        out["steady_ratio_wqs_over_plain"] = statistics.median(
            w["steady"] / p["steady"] for w, p in zip(rows["wqsupervisor"], rows["ssh -N -R"], strict=True)
        )
    return out
