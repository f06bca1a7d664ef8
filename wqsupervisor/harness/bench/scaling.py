"""Scaling with Slurm in the lab: wqsupervisor's policy against ``work_queue_factory -T slurm``.

Both run against the same real single-node Slurm on ``node`` and the same
master behind the same supervised tunnel; only who decides and submits the
worker jobs differs. The factory runs on the head node, pointed at the
forwarded port, with the node launcher as its worker binary (without it its
workers could not reach the master from a compute node at all). Runs
alternate between the two tools.

* first task: from the moment a backlog appears (tasks submitted to an idle
  master with no worker) to the first task running on a newly started worker;
* jobs per task: worker jobs Slurm received per task completed, on a bursty
  workload (bursts of short tasks with quiet gaps), lower is better.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..common import machine, save, summary
from ..lab import Lab
from ..labapps import CampusApp

REMOTE_PORT = 10001
TOOLS = ("wqsupervisor", "work_queue_factory")


def _settings(lab: Lab, tool: str, max_workers: int) -> dict[str, Any]:
    common = {
        "min_workers": 0,
        "max_workers": max_workers,
        "idle_time": 20.0,
        "batch_env": [f"SLURM_CONF={lab.slurm_conf}"],
        "node_via": "headnode",
    }
    if tool == "wqsupervisor":
        return {"workers": "slurm", "scale_cooldown": 1.0, "max_per_cycle": 2, **common}
    return {"workers": "factory", "factory_type": "slurm", **common}


def _jobs_seen(lab: Lab) -> set[str]:
    """Every job id Slurm knows of or has finished (jobcomp log plus the queue)."""
    ids = set()
    log = Path(lab.slurm_conf).parent / "log" / "jobcomp.txt"
    if log.exists():
        for line in log.read_text().splitlines():
            for word in line.split():
                if word.startswith("JobId="):
                    ids.add(word[6:])
    ids.update(line.split()[0] for line in lab.squeue() if line.strip())
    return ids


def _first_running(app: CampusApp, since: float) -> float | None:
    for t, stats in app.stats:
        if t >= since and (stats.get("tasks_running", 0) > 0 or stats.get("tasks_done", 0) > 0):
            return t - since
    return None


def _one(
    tool: str, bursts: int, burst_size: int, gap: float, max_workers: int, progress: Callable[[str], None]
) -> dict[str, Any]:
    with Lab() as lab:
        lab.start_slurm(cpus=max_workers)
        app = CampusApp(lab, REMOTE_PORT, _settings(lab, tool, max_workers))
        try:
            app.wait_event("tunnel.up", 60)
            time.sleep(3)
            before = _jobs_seen(lab)
            first: float | None = None
            total = 0
            for b in range(bursts):
                since = time.time()
                app.submit(burst_size, "sleep 1; echo out-{i}")
                total += burst_size
                if b == 0:
                    app.wait_for(functools.partial(_first_running, app, since), 300, "the first task to run")
                    first = _first_running(app, since)
                app.wait_done(total, 600)
                progress(f"{tool}: burst {b + 1}/{bursts} done")
                time.sleep(gap)
            jobs = len(_jobs_seen(lab) - before)
        finally:
            app.close()
    return {"first_task_s": first, "jobs": jobs, "tasks": total, "jobs_per_task": jobs / total}


def run(
    reps: int = 2,
    bursts: int = 3,
    burst_size: int = 20,
    gap: float = 30.0,
    max_workers: int = 4,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Alternate the two tools ``reps`` times on the same bursty workload."""
    raw: dict[str, list[dict[str, Any]]] = {t: [] for t in TOOLS}
    for r in range(reps):
        order = TOOLS if r % 2 == 0 else tuple(reversed(TOOLS))
        for tool in order:
            figures = _one(tool, bursts, burst_size, gap, max_workers, progress)
            raw[tool].append(figures)
            progress(
                f"{tool}: first task after {figures['first_task_s']:.1f} s, {figures['jobs']} jobs for "
                f"{figures['tasks']} tasks"
            )
    out: dict[str, Any] = {
        "machine": machine(),
        "reps": reps,
        "bursts": bursts,
        "burst_size": burst_size,
        "gap_s": gap,
        "max_workers": max_workers,
        "tools": {},
    }
    for tool, rows in raw.items():
        out["tools"][tool] = {
            "first_task_s": summary([r["first_task_s"] for r in rows if r["first_task_s"] is not None]),
            "jobs_per_task": summary([r["jobs_per_task"] for r in rows]),
            "raw": rows,
        }
    w, f = out["tools"]["wqsupervisor"], out["tools"]["work_queue_factory"]
    if w["first_task_s"]["n"] and f["first_task_s"]["n"]:
        out["ratio_first_task_wqs_over_factory"] = w["first_task_s"]["median"] / f["first_task_s"]["median"]
    out["ratio_jobs_per_task_wqs_over_factory"] = w["jobs_per_task"]["median"] / f["jobs_per_task"]["median"]
    return out


def main(argv: list[str] | None = None) -> int:
    """``benchmarks/scaling.py``: the two tools alternated on a bursty workload; figures on stdout."""
    parser = argparse.ArgumentParser(
        description="Time to the first task on a new worker, and jobs per task on a bursty workload: "
        "wqsupervisor's policy against work_queue_factory -T slurm, with a real Slurm in the lab."
    )
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--burst-size", type=int, default=20)
    parser.add_argument("--gap", type=float, default=30.0)
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args(argv)

    result = run(reps=args.reps, bursts=args.bursts, burst_size=args.burst_size, gap=args.gap)
    save(result, args.out, "scaling.json")
    for tool, figures in result["tools"].items():
        first, jobs = figures["first_task_s"], figures["jobs_per_task"]
        print(
            f"{tool:19s} first task {first['median']:.1f} s "
            f"(min {first['min']:.1f}, max {first['max']:.1f}); "
            f"jobs per task {jobs['median']:.3f} "
            f"(min {jobs['min']:.3f}, max {jobs['max']:.3f}), n={jobs['n']}"
        )
    if "ratio_first_task_wqs_over_factory" in result:
        print(
            "wqsupervisor / work_queue_factory: "
            f"first task {result['ratio_first_task_wqs_over_factory']:.2f}, "
            f"jobs per task {result['ratio_jobs_per_task_wqs_over_factory']:.2f}"
        )
    return 0
