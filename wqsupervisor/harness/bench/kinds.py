"""Work Queue master beside TaskVine manager, in one run: recovery after an ssh kill and task rates.

For each kind of master (ndcctools' Work Queue and TaskVine, from one cctools
build; its own workers), alternating the kinds from round to round:

* the empty-task steady rate direct and through the supervised tunnel, the
  two paths interleaved in the round (:mod:`.taskrate`), and their ratio;
* one SIGKILL of the supervised tunnel's ssh, with its workers connected
  through it: seconds to the head's remote port answering the master's
  status again ("forward back") and to every worker connected again
  (:func:`.recovery._measure`).

Both kinds need ndcctools (``--pythonpath``) and the build's ``bin``
directory (``--cctools-bin``) for ``work_queue_worker`` and ``vine_worker``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from typing import Any

from ..common import machine, save, summary
from ..sandbox import HeadNode, workers
from .master import MasterProcess
from .recovery import _fmt, _measure, _wait_all_connected
from .report import interleaved
from .taskrate import _one
from .tunnels import Supervised

KINDS = {"work_queue": ("ndcctools", "work_queue_worker"), "taskvine": ("taskvine", "vine_worker")}


def _recovery(head: HeadNode, binding: str, pythonpath: str, worker: str, n_workers: int) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        master = MasterProcess(binding, pythonpath)
        stack.callback(master.close)
        tool = Supervised(head, master.port)
        stack.callback(tool.close)
        stack.enter_context(workers(tool.remote_port, n_workers, program=worker))
        master.start("serve 100000")  # in wait(), so status requests are answered
        _wait_all_connected(master, n_workers)
        time.sleep(6)  # past the tunnel's stable_after
        return _measure(tool, master, n_workers)


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
                binding, program = KINDS[kind]
                worker = os.path.join(cctools_bin, program)
                rate: dict[str, Any] = {}
                for path in interleaved(("direct", "wqsupervisor"), r):
                    rate[path] = _one(path, head, tasks, n_workers, "true", binding, pythonpath, worker)
                back = _recovery(head, binding, pythonpath, worker, n_workers)
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
                    f"forward back {_fmt(back['restored'])}, workers back {_fmt(back['workers'])}"
                )
    out: dict[str, Any] = {"machine": machine(), "rounds": rounds, "tasks": tasks, "workers": n_workers}
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
    print(f"saved {save(result, args.out, 'kinds.json')}")
    return 0
