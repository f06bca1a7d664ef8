"""Work Queue master, TaskVine manager and Makeflow, in one run: recovery after an ssh kill and task rates.

For each kind of master (ndcctools' Work Queue and TaskVine, from one cctools
build; Debian's ``makeflow -T wq``, served by port as ``attach`` serves it;
each with its own workers), alternating the kinds from round to round:

* the empty-task steady rate direct and through the supervised tunnel, the
  two paths interleaved in the round (:mod:`.taskrate`), and their ratio;
* one SIGKILL of the supervised tunnel's ssh, with its workers connected
  through it: seconds to the head's remote port answering the master's
  status again ("forward back") and to every worker connected again
  (:func:`.recovery.measure_kill`).

Makeflow's rules each run ``true`` and touch their target; its rate is read
from its own log. Work Queue and TaskVine need ndcctools (``--pythonpath``) and the build's ``bin``
directory (``--cctools-bin``) for ``work_queue_worker`` and ``vine_worker``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from typing import Any

from ..common import machine, save, summary, version
from ..sandbox import HeadNode, workers
from . import makeflow
from .master import MasterProcess
from .recovery import fmt_seconds, measure_kill, wait_all_connected
from .report import interleaved
from .taskrate import steady_run, tunnel_path
from .tunnels import Supervised

MAKEFLOW = "makeflow"
KINDS = {
    "work_queue": ("ndcctools", "work_queue_worker"),
    "taskvine": ("taskvine", "vine_worker"),
    MAKEFLOW: ("", ""),
}


def _master(stack: contextlib.ExitStack, kind: str, pythonpath: str) -> int:
    """A master of ``kind`` that keeps answering status requests with its workers busy: its port."""
    if kind == MAKEFLOW:
        flow = makeflow.MakeflowMaster(rules=8, command="sleep 100000")  # rules outlast the measure
        stack.callback(flow.close)
        return flow.port
    master = MasterProcess(KINDS[kind][0], pythonpath)
    stack.callback(master.close)
    master.start("serve 100000")  # in wait(), so status requests are answered
    return master.port


def _recovery(head: HeadNode, kind: str, pythonpath: str, worker: str, n_workers: int) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        port = _master(stack, kind, pythonpath)
        tool = Supervised(head, port)
        stack.callback(tool.close)
        stack.enter_context(workers(tool.remote_port, n_workers, program=worker))
        wait_all_connected(port, n_workers)
        time.sleep(6)  # past the tunnel's stable_after
        return measure_kill(tool, port, n_workers)


def _makeflow_rate(path: str, head: HeadNode, rules: int, n_workers: int) -> dict[str, float]:
    """Makeflow's steady rule rate (first to last completion) through ``path``; workers join as it runs."""
    with contextlib.ExitStack() as stack:
        flow = makeflow.MakeflowMaster(rules)
        stack.callback(flow.close)
        tunnel = tunnel_path(path, head, flow.port)
        if tunnel is not None:
            stack.callback(tunnel.close)
        port = flow.port if tunnel is None else tunnel.remote_port
        stack.enter_context(workers(port, n_workers, program=makeflow.worker_program()))
        done = flow.completions()
    return {"steady": (len(done) - 1) / (done[-1] - done[0])}


def _worker(kind: str, cctools_bin: str) -> str:
    return makeflow.worker_program() if kind == MAKEFLOW else os.path.join(cctools_bin, KINDS[kind][1])


def run(
    rounds: int = 5,
    tasks: int = 200,
    n_workers: int = 2,
    pythonpath: str = "",
    cctools_bin: str = "",
    progress: Any = print,
) -> dict[str, Any]:
    """Every kind in every round, the kinds' order alternating."""
    rows: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    with HeadNode() as head:
        for r in range(rounds):
            for kind in interleaved(list(KINDS), r):
                worker = _worker(kind, cctools_bin)
                rate: dict[str, Any] = {}
                for path in interleaved(("direct", "wqsupervisor"), r):
                    if kind == MAKEFLOW:
                        rate[path] = _makeflow_rate(path, head, tasks, n_workers)
                    else:
                        binding = KINDS[kind][0]
                        rate[path] = steady_run(
                            path, head, tasks, n_workers, "true", binding, pythonpath, worker
                        )
                back = _recovery(head, kind, pythonpath, worker, n_workers)
                row = {
                    "steady_direct": rate["direct"]["steady"],
                    "steady_supervised": rate["wqsupervisor"]["steady"],
                    "ratio": rate["wqsupervisor"]["steady"] / rate["direct"]["steady"],
                    "forward_back": back["restored"],
                    "workers_back": back["workers"],
                }
                rows[kind].append(row)
                progress(
                    f"round {r + 1}/{rounds} {kind}: steady {row['steady_direct']:.0f} direct, "
                    f"{row['steady_supervised']:.0f} supervised tasks/s (ratio {row['ratio']:.2f}); "
                    f"forward back {fmt_seconds(back['restored'])}, "
                    f"workers back {fmt_seconds(back['workers'])}"
                )
    out: dict[str, Any] = {"machine": machine(), "rounds": rounds, "tasks": tasks, "workers": n_workers}
    out["versions"] = {"cctools": version([os.path.join(cctools_bin, "work_queue_worker"), "-v"])}
    out["versions"][MAKEFLOW] = makeflow.version()
    for kind, samples in rows.items():
        out[kind] = {
            field: summary([s[field] for s in samples if s[field] is not None])
            for field in ("steady_direct", "steady_supervised", "ratio", "forward_back", "workers_back")
        }
        out[kind]["raw"] = samples
    return out


def main(argv: list[str] | None = None) -> int:
    """``benchmarks/kinds.py``: medians per kind on stdout, everything in bench-out/kinds.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pythonpath", required=True, help="where ndcctools lives (a cctools build)")
    parser.add_argument("--cctools-bin", required=True, help="that build's bin directory")
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args(argv)
    result = run(args.rounds, args.tasks, args.workers, args.pythonpath, args.cctools_bin)
    for kind in KINDS:
        k = result[kind]
        print(
            f"{kind}: steady ratio supervised/direct {k['ratio']['median']:.2f} "
            f"(direct {k['steady_direct']['median']:.0f} tasks/s), forward back "
            f"{k['forward_back']['median']:.3f} s, workers back {k['workers_back']['median']:.2f} s "
            f"(medians of {args.rounds})"
        )
    print(f"versions: {result['versions']}")
    print(f"saved {save(result, args.out, 'kinds.json')}")
    return 0
