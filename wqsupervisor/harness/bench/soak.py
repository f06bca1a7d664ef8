"""Soak: tasks flow for M minutes while a random fault from the lab hits every K seconds.

Every fault is healed before the next one; after the last, the run waits for
every task and checks that each came back exactly once with its output. The
figures: tasks, faults by kind, recoveries (forward working again, seen from
the head node), the worst recovery, and losses (which must be zero).
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import signal
import time
from collections.abc import Callable
from typing import Any

from ..common import machine, save, summary
from ..lab import Lab
from ..labapps import CampusApp, HeadProbe, start_node_workers

REMOTE_PORT = 10001
# Tasks kept queued: two workers take about a minute for them, longer than a fault and its recovery.
BACKLOG = 400


def _faults(lab: Lab, app: CampusApp) -> dict[str, tuple[Callable[[], None], bool]]:
    """Each fault: (apply it, blocking until healed; True when it is instant)."""

    def ssh_pid() -> int:
        pid = app.snapshot().masters[0].tunnel.ssh_pid
        assert pid is not None, "the tunnel has no ssh client"
        return pid

    def remote_pid() -> int:
        pid = app.snapshot().masters[0].tunnel.remote_pid
        assert pid is not None, "the tunnel has no session on the head node"
        return pid

    def hung() -> None:
        pid = remote_pid()
        lab.stop_session(pid)
        time.sleep(8)
        lab.resume_session(pid)

    def blackhole(seconds: float, forget: bool) -> Callable[[], None]:
        def apply() -> None:
            lab.blackhole()
            time.sleep(seconds)
            lab.heal(forget=forget)

        return apply

    def link_down() -> None:
        lab.link_down()
        time.sleep(5)
        lab.link_up()

    def kill_hops() -> None:
        for pid in lab.node_hops() + lab.node_relay_hops():
            os.kill(pid, signal.SIGKILL)

    table = {
        "ssh-killed": (lambda: os.kill(ssh_pid(), signal.SIGKILL), True),
        "session-killed": (lambda: lab.kill_session(remote_pid()), True),
        "sshd-restarted": (lambda: lab.restart_sshd(down_for=1.0), True),
        "peer-hung": (hung, True),
        "link-down-5s": (link_down, False),
        "blackhole-5s-kept": (blackhole(5, False), False),
        "blackhole-20s-kept": (blackhole(20, False), False),
        "blackhole-5s-forgotten": (blackhole(5, True), False),
        "blackhole-20s-forgotten": (blackhole(20, True), False),
        "node-hop-killed": (kill_hops, True),
    }
    assert tuple(table) == FAULT_NAMES
    return table


# Faults that end the node launchers' own hops too (they resume only with resume_hop).
HOP_FAULTS = ("sshd-restarted", "node-hop-killed")


FAULT_NAMES = (
    "ssh-killed",
    "session-killed",
    "sshd-restarted",
    "peer-hung",
    "link-down-5s",
    "blackhole-5s-kept",
    "blackhole-20s-kept",
    "blackhole-5s-forgotten",
    "blackhole-20s-forgotten",
    "node-hop-killed",
)


def _backlog(task_seconds: float, workers: int) -> int:
    """Tasks kept queued: about a minute of the workers' time, never fewer than two each."""
    return max(2 * workers, min(BACKLOG, int(60 * workers / max(task_seconds, 0.05))))


def run(
    minutes: float = 2.0,
    every: float = 25.0,
    workers: int = 2,
    seed: int | None = None,
    progress: Callable[[str], None] = print,
    resumable: bool = False,
    task_seconds: float = 0.2,
    only: list[str] | None = None,
    resume_hop: bool = False,
) -> dict[str, Any]:
    """Soak the supervised tunnel; returns the figures (``lost`` and ``duplicated`` must be 0).

    ``resumable``: the tunnel forwards through the head relay (then ``requeued``
    and ``workers_removed`` must be 0 too, for faults of the tunnel itself);
    ``resume_hop``: the node launchers' hops resume too (then for every fault).
    """
    rng = random.Random(seed)
    deadline = time.monotonic() + minutes * 60
    submitted = 0
    backlog = _backlog(task_seconds, workers)
    faults: list[dict[str, Any]] = []
    with Lab() as lab:
        app = CampusApp(lab, REMOTE_PORT, {"backend": "resumable"} if resumable else {"resume": False})
        app.wait_event("tunnel.up", 60)
        start_node_workers(lab, REMOTE_PORT, n=workers, resume_hop=resume_hop)
        probe = HeadProbe(lab, REMOTE_PORT)
        kinds = _faults(lab, app)
        if only:
            kinds = {k: v for k, v in kinds.items() if k in only}
        try:
            while time.monotonic() < deadline:
                # Keep tasks queued through the fault and its recovery: the master answers
                # the head's probe only from inside wait(), which the app calls while it has tasks.
                top_up = backlog - (submitted - app.done())
                if top_up > 0:
                    app.submit(top_up, f"sleep {task_seconds:g}; echo out-{{i}}")
                    submitted += top_up
                app.wait_workers(workers, 120)
                time.sleep(max(1.0, every - 15))
                kind = rng.choice(sorted(kinds))
                apply, instant = kinds[kind]
                began = time.time()
                apply()
                healed = time.time()
                since = began if instant else healed
                # Recovery: the head's port reaches the master again (it may never have stopped).
                recovered = _wait(functools.partial(probe.recovered, since), 120)
                back = app.wait_workers(workers, 120, after=healed)
                faults.append(
                    {
                        "kind": kind,
                        "began": began,
                        "healed": healed,
                        "forward_back_s": (recovered - since) if recovered else None,
                        "workers_back_s": back - since,
                    }
                )
                forward = "not within 120 s" if recovered is None else f"{recovered - since:.2f} s"
                progress(f"{kind}: forward answering after {forward}, workers back in {back - healed:.1f} s")
            app.wait_done(submitted, 600 + 2 * backlog * task_seconds / workers)
            time.sleep(1)
            restarts = len(app.named("tunnel.starting")) - 1
            stats = app.latest_stats()
        finally:
            probe.close()
            app.close()
    lost = [str(i) for i in range(submitted) if str(i) not in app.results]
    duplicated = [t for t, v in app.results.items() if len(v) > 1]
    wrong = [t for t, v in app.results.items() if v[0] != f"out-{t}"]
    recoveries = [f["forward_back_s"] for f in faults if f["forward_back_s"] is not None]
    return {
        "machine": machine(),
        "minutes": minutes,
        "every": every,
        "seed": seed,
        "resumable": resumable,
        "resume_hop": resume_hop,
        "task_seconds": task_seconds,
        "tasks": submitted,
        # Sends of a task beyond its first: work thrown away and done again.
        "requeued": stats.get("tasks_dispatched", 0) - stats.get("tasks_submitted", 0),
        "workers_removed": stats.get("workers_removed", 0),
        "faults": len(faults),
        "by_kind": _count(f["kind"] for f in faults),
        "tunnel_restarts": restarts,
        "forward_back": summary(recoveries),
        "worst_forward_back_s": max(recoveries) if recoveries else None,
        "workers_back": summary([f["workers_back_s"] for f in faults]),
        "lost": len(lost),
        "duplicated": len(duplicated),
        "wrong_output": len(wrong),
        "raw": faults,
    }


def _wait(predicate: Callable[[], float | None], timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return None


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def main(argv: list[str] | None = None) -> int:
    """``benchmarks/soak.py``: soak for ``--minutes``; the figures on stdout."""
    parser = argparse.ArgumentParser(
        description="Soak the supervised tunnel: tasks flow while a random lab fault hits every K seconds."
    )
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--every", type=float, default=25.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--resumable", action="store_true", help="forward through the head relay")
    parser.add_argument(
        "--resume-hop", action="store_true", help="the node launchers' hops resume too (node relays)"
    )
    parser.add_argument("--task-seconds", type=float, default=0.2, help="how long each task runs")
    parser.add_argument(
        "--faults",
        nargs="*",
        choices=FAULT_NAMES,
        help=f"draw only from these (with --resumable and no --resume-hop, leave out "
        f"{' and '.join(HOP_FAULTS)}: they end the node hops)",
    )
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args(argv)

    result = run(
        minutes=args.minutes,
        every=args.every,
        seed=args.seed,
        resumable=args.resumable,
        task_seconds=args.task_seconds,
        only=args.faults,
        resume_hop=args.resume_hop,
    )
    save(result, args.out, "soak.json")
    fb = result["forward_back"]
    print(
        f"tasks {result['tasks']}, faults {result['faults']} {result['by_kind']}, tunnel restarts "
        f"{result['tunnel_restarts']}; forward back median {fb['median']:.2f} s, worst "
        f"{result['worst_forward_back_s']:.2f} s; lost {result['lost']}, duplicated {result['duplicated']}, "
        f"wrong output {result['wrong_output']}, requeued {result['requeued']}, "
        f"workers removed {result['workers_removed']}"
    )
    return 0
