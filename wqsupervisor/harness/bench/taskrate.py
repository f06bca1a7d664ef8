"""Work Queue task throughput: direct, through the supervised tunnel, through the HOWTO's tunnel.

Each round starts a fresh master per path, connects the same number of real
workers through that path, runs the same tasks, and records every completion.
The steady rate is (N - 1) tasks over the time from the first completion to
the last, which leaves out the master's own stall at the start (when the last
worker's handshake lands in a ``wait()`` with no other event, cctools'
``busy_waiting_flag`` makes its next poll wait 1000 ms, on any path, direct
included); the whole-run rate counts from submission. Paths
are interleaved inside each round, and each path's rate is divided by the
direct rate of the same round.

:func:`run_sizes` does the same for tasks that carry an input file (sent
uncached to every task, so each one moves its bytes through the path), with
one master, path and set of workers per path and round serving every size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..common import machine, save, summary
from ..sandbox import HeadNode, workers
from .master import MasterProcess
from .netpaths import ResumableTwoHop, SocatHops, SupervisedTwoHop, TwoHop
from .report import compare, interleaved
from .tunnels import PlainSsh, Supervised

PATHS = ("direct", "wqsupervisor", "ssh -N -R")
# The same forward as the HOWTO's, with a session: the ceiling an ssh relay allows.
SESSION = "ssh -T -R cat"
# The HOWTO's whole chain: ssh -N -R from the campus, the node's own ssh -N -L to it.
TWO_HOP = "two-hop"
# The supervised tunnel with resumable forwarding: the head relay and the agent on the data path.
RESUMABLE = "resumable"
# The compute nodes' path: the supervised tunnel and the node launcher's hop.
SUPERVISED_TWO_HOP = "wqsupervisor two-hop"
# Both hops resumable: the resumable tunnel and a node relay (the launcher's resume_hop).
RESUMABLE_TWO_HOP = "resumable two-hop"
# The floor of any resumable design: the plain tunnel with a socat relay (C) at each end.
SOCAT_HOPS = SocatHops.name
# What each path's rate is divided by, round by round.
COMPARATORS = {
    "wqsupervisor": ("direct", "ssh -N -R"),
    "ssh -N -R": ("direct",),
    SESSION: ("direct", "ssh -N -R"),
    TWO_HOP: ("direct", "ssh -N -R"),
    RESUMABLE: ("direct", "wqsupervisor", SOCAT_HOPS),
    SOCAT_HOPS: ("direct", "wqsupervisor"),
    SUPERVISED_TWO_HOP: ("direct", TWO_HOP),
    RESUMABLE_TWO_HOP: ("direct", SUPERVISED_TWO_HOP),
}
MB = 1_000_000
# (label, input bytes per task, tasks per run)
SIZES = (("empty", 0, 200), ("1 MB", MB, 50), ("100 MB", 100 * MB, 8))


def tunnel_path(kind: str, head: HeadNode, master_port: int) -> Any:
    """The path ``kind`` to the master on ``master_port`` (None for direct), to be closed."""
    if kind == "direct":
        return None
    if kind == "wqsupervisor":
        return Supervised(head, master_port)
    if kind == RESUMABLE:
        return Supervised(head, master_port, backend="resumable")
    if kind == TWO_HOP:
        return TwoHop(head, master_port)
    if kind == SUPERVISED_TWO_HOP:
        return SupervisedTwoHop(head, master_port)
    if kind == RESUMABLE_TWO_HOP:
        return ResumableTwoHop(head, master_port)
    if kind == SOCAT_HOPS:
        return SocatHops(head, master_port)
    return PlainSsh(head, master_port, session=kind == SESSION)


@contextlib.contextmanager
def _connected(
    kind: str,
    head: HeadNode,
    n_workers: int,
    binding: str,
    pythonpath: str | None,
    worker_program: str | None,
) -> Iterator[MasterProcess]:
    """A fresh master, the path ``kind`` to it, and ``n_workers`` connected through that path."""
    with contextlib.ExitStack() as stack:
        master = MasterProcess(binding, pythonpath)
        stack.callback(master.close)
        path = tunnel_path(kind, head, master.port)
        if path is not None:
            stack.callback(path.close)
        port = master.port if path is None else path.remote_port
        stack.enter_context(workers(port, n_workers, program=worker_program))
        answer = master.send(f"workers {n_workers} 60")
        if not answer.startswith("ok"):
            raise RuntimeError(f"{kind}: workers did not connect ({answer})")
        yield master


def rates(result: dict[str, Any], tasks: int, kind: str = "") -> dict[str, float]:
    """Steady (first to last completion) and whole-run (from submission) tasks/s of one run."""
    done = sorted(result["done"])
    if len(done) != tasks:
        raise RuntimeError(f"{kind}: {len(done)} of {tasks} tasks came back")
    if result.get("failed"):
        raise RuntimeError(f"{kind}: {result['failed']} of {tasks} tasks failed")
    steady = (len(done) - 1) / (done[-1] - done[0]) if done[-1] > done[0] else float("inf")
    whole = len(done) / (done[-1] - result["submitted"])
    return {"steady": steady, "whole": whole}


def steady_run(
    kind: str,
    head: HeadNode,
    tasks: int,
    n_workers: int,
    command: str,
    binding: str,
    pythonpath: str | None,
    worker_program: str | None,
) -> dict[str, float]:
    """One master, ``n_workers`` through the path ``kind``, ``tasks`` tasks of ``command``: its rates."""
    with _connected(kind, head, n_workers, binding, pythonpath, worker_program) as master:
        result = master.run(tasks, command)
    return rates(result, tasks, kind)


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
                figures = steady_run(
                    kind, head, tasks, n_workers, command, binding, pythonpath, worker_program
                )
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


def input_files(folder: str, sizes: Sequence[tuple[str, int, int]]) -> dict[str, str | None]:
    """One file per input size (sparse: the bytes the master sends are real, the disk reads are not)."""
    files: dict[str, str | None] = {}
    for label, nbytes, _ in sizes:
        if nbytes <= 0:
            files[label] = None
            continue
        path = os.path.join(folder, f"input-{nbytes}")
        with open(path, "wb") as fh:
            fh.truncate(nbytes)
        files[label] = path
    return files


def run_sizes(
    rounds: int = 5,
    sizes: Sequence[tuple[str, int, int]] = SIZES,
    n_workers: int = 2,
    command: str = "true",
    paths: Sequence[str] = (*PATHS, TWO_HOP),
    binding: str = "debian",
    pythonpath: str | None = None,
    worker_program: str | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Task rates per input size and path, paths interleaved in every round.

    ``sizes`` are ``(label, input bytes, tasks)``. Each path's steady and
    whole-run rates are divided by its comparators' (see ``COMPARATORS``) of
    the same round and size.
    """
    raw: dict[str, dict[str, list[dict[str, float]]]] = {
        label: {p: [] for p in paths} for label, _, _ in sizes
    }
    with tempfile.TemporaryDirectory(prefix="wqs-bench-inputs-") as folder, HeadNode() as head:
        files = input_files(folder, sizes)
        for r in range(rounds):
            for kind in interleaved(paths, r):
                with _connected(kind, head, n_workers, binding, pythonpath, worker_program) as master:
                    for label, _, tasks in sizes:
                        run_command = f"run {tasks} {command}"
                        if files[label] is not None:
                            run_command += f" --input {files[label]}"
                        result = json.loads(master.send(run_command))
                        figures = rates(result, tasks, f"{kind}, {label}")
                        raw[label][kind].append(figures)
                        progress(
                            f"tasks round {r + 1}/{rounds} {kind}, {label} inputs: steady "
                            f"{figures['steady']:.1f} tasks/s, whole run {figures['whole']:.1f} tasks/s"
                        )
    out: dict[str, Any] = {
        "rounds": rounds,
        "workers": n_workers,
        "command": command,
        "binding": binding,
        "paths": list(paths),
        "sizes": {},
    }
    for label, nbytes, tasks in sizes:
        per_path: dict[str, Any] = {}
        for which in ("steady", "whole"):
            table = {k: [f[which] for f in v] for k, v in raw[label].items()}
            for kind, entry in compare(table, COMPARATORS).items():
                per_path.setdefault(kind, {})[which] = entry
        out["sizes"][label] = {"input_bytes": nbytes, "tasks": tasks, "paths": per_path}
    return out


def main(argv: list[str] | None = None) -> int:
    """``benchmarks/task_rate.py``: empty-task rates by path, interleaved; figures on stdout."""
    parser = argparse.ArgumentParser(
        description="Work Queue empty-task rate direct vs through wqsupervisor "
        "vs through the HOWTO's ssh -N -R."
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--command", default="true")
    parser.add_argument("--binding", default="debian", choices=("debian", "ndcctools", "taskvine", "server"))
    parser.add_argument("--pythonpath", help="where ndcctools lives, for --binding ndcctools")
    parser.add_argument("--worker", help="work_queue_worker to use (e.g. /opt/cctools/bin/work_queue_worker)")
    parser.add_argument(
        "--session",
        action="store_true",
        help="also measure a plain 'ssh -T -R ... cat' session tunnel, without supervision",
    )
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args(argv)

    result = run(
        rounds=args.rounds,
        tasks=args.tasks,
        n_workers=args.workers,
        command=args.command,
        paths=(*PATHS, SESSION) if args.session else PATHS,
        binding=args.binding,
        pythonpath=args.pythonpath,
        worker_program=args.worker,
    )
    save(result, args.out, "task_rate.json")
    for name, path in result["paths"].items():
        s = path["steady"]
        line = f"{name:13s} steady {s['median']:7.1f} tasks/s (min {s['min']:.1f}, max {s['max']:.1f})"
        if "steady_ratio_to_direct" in path:
            r = path["steady_ratio_to_direct"]
            line += f"  / direct {r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f}, n={r['n']})"
        print(line)
    if "steady_ratio_wqs_over_plain" in result:
        print(f"wqsupervisor / ssh -N -R steady: {result['steady_ratio_wqs_over_plain']:.1f}x")
    return 0
