"""Scaling with Slurm in the lab: wqsupervisor's policy against ``work_queue_factory -T slurm``.

Both run against the same real single-node Slurm on ``node`` and the same
master behind the same supervised tunnel; only who decides and submits the
worker jobs differs. The factory runs on the head node, pointed at the
forwarded port, with the node launcher as its worker binary (without it its
workers could not reach the master from a compute node at all). Runs
alternate between the two tools.

* first task: from the moment a backlog appears (tasks submitted to an idle
  master with no worker) to the first task starting on a newly started worker,
  as the task itself tells it (each task prints the time it started);
* the factory's reaction: the factory looks at the master once a cycle (every
  30 s and more, cctools' ``factory_period``), so its first task comes after
  whatever is left of its cycle. Its own log says when it first saw the
  backlog; from that moment to the first task is what it takes once it looks,
  the best the factory can do. wqsupervisor's target is that best;
* wqsupervisor's own part of its first task: from the backlog until
  ``sbatch`` returned on the head (its ``jobs.submitted`` event); the rest is
  Slurm starting the job and the worker coming up, the same for both tools;
* jobs per task: worker jobs Slurm received per task completed, on a bursty
  workload (bursts of short tasks with quiet gaps), lower is better.

:func:`launch_ticks` (``--ticks``) measures what bounds the first task for
both tools: how long a job waits from ``sbatch`` to running, by the moment
of the wall-clock second it was submitted at.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..common import machine, save, summary
from ..lab import HEAD, Lab
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
        # As many jobs at once as the factory submits (up to max_workers): the first task is the
        # earliest of the first batch's workers, for both tools alike.
        return {"workers": "slurm", "scale_cooldown": 1.0, "max_per_cycle": max_workers, **common}
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


# Each task says when it started, by the clock every namespace of the lab shares.
TASK = "echo started=$(date +%s.%N); sleep 1; echo out-{i}"


def _first_running(app: CampusApp, since: float) -> float | None:
    for t, stats in app.stats:
        if t >= since and (stats.get("tasks_running", 0) > 0 or stats.get("tasks_done", 0) > 0):
            return t - since
    return None


def _first_start(app: CampusApp, since: float) -> float | None:
    """The earliest start any task reported, in seconds after ``since``."""
    starts = [
        float(line.split("=", 1)[1])
        for outputs in app.results.values()
        for output in outputs
        for line in output.splitlines()
        if line.startswith("started=")
    ]
    return min(starts) - since if starts else None


class FactoryLog:
    """Follows the factory's log on the head node: when did it first see tasks waiting?

    Each cycle the factory prints a table with a row per master (PROJECT HOST
    PORT WAITING RUNNING COMPLETE WORKERS); the moment a row with waiting tasks
    appears is when the factory looked. (Its PORT is what the master reports,
    not the forwarded port it was given.)
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.saw_backlog: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        offset = 0
        while not self._stop.wait(0.02):
            try:
                with open(self.path, "rb") as fh:
                    fh.seek(offset)
                    chunk = fh.read()
            except OSError:
                continue
            now = time.time()
            complete = chunk.rfind(b"\n") + 1
            offset += complete
            for line in chunk[:complete].decode(errors="replace").splitlines():
                words = line.split()
                row = len(words) == 7 and all(w.isdigit() for w in words[2:])
                if row and int(words[3]) > 0 and self.saw_backlog is None:
                    self.saw_backlog = now

    def close(self) -> None:
        """Stop following."""
        self._stop.set()
        self._thread.join(2)


def _one(
    tool: str, bursts: int, burst_size: int, gap: float, max_workers: int, progress: Callable[[str], None]
) -> dict[str, Any]:
    with Lab() as lab:
        lab.start_slurm(cpus=max_workers)
        app = CampusApp(lab, REMOTE_PORT, _settings(lab, tool, max_workers))
        try:
            app.wait_event("tunnel.up", 60)
            # slurmctld starts jobs on a tick of its own: a burst at a random moment of it, for both tools.
            time.sleep(3 + random.random())
            before = _jobs_seen(lab)
            workdir = lab.root / "home" / ".wqsupervisor" / str(REMOTE_PORT)
            log = FactoryLog(workdir / "factory.log")
            first: float | None = None
            reaction: float | None = None
            sbatch_done: float | None = None
            total = 0
            try:
                for b in range(bursts):
                    since = app.submit_now(burst_size, TASK)
                    total += burst_size
                    if b == 0:
                        running = functools.partial(_first_running, app, since)
                        app.wait_for(running, 300, "the first task to run")
                        app.wait_done(1, 60)
                        first = _first_start(app, since)
                        submitted = app.named("jobs.submitted", after=since)
                        if submitted:
                            sbatch_done = submitted[0]["at"] - since
                        if first is not None and log.saw_backlog is not None:
                            reaction = first - (log.saw_backlog - since)
                    app.wait_done(total, 600)
                    progress(f"{tool}: burst {b + 1}/{bursts} done")
                    time.sleep(gap)
            finally:
                log.close()
            jobs = len(_jobs_seen(lab) - before)
        finally:
            app.close()
    return {
        "first_task_s": first,
        "reaction_s": first if tool == "wqsupervisor" else reaction,
        # wqsupervisor's own part: from the backlog to sbatch having returned on the head.
        "submitted_s": sbatch_done,
        "jobs": jobs,
        "tasks": total,
        "jobs_per_task": jobs / total,
    }


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
            "reaction_s": summary([r["reaction_s"] for r in rows if r.get("reaction_s") is not None]),
            "submitted_s": summary([r["submitted_s"] for r in rows if r.get("submitted_s") is not None]),
            "jobs_per_task": summary([r["jobs_per_task"] for r in rows]),
            "raw": rows,
        }
    w, f = out["tools"]["wqsupervisor"], out["tools"]["work_queue_factory"]
    if w["first_task_s"]["n"] and f["first_task_s"]["n"]:
        out["ratio_first_task_wqs_over_factory"] = w["first_task_s"]["median"] / f["first_task_s"]["median"]
    if w["first_task_s"]["n"] and f["reaction_s"]["n"]:
        # The target: wqsupervisor's whole wait against the factory's best (its wait once it looked).
        out["ratio_first_task_wqs_over_factory_reaction"] = (
            w["first_task_s"]["median"] / f["reaction_s"]["median"]
        )
    out["ratio_jobs_per_task_wqs_over_factory"] = w["jobs_per_task"]["median"] / f["jobs_per_task"]["median"]
    return out


PHASES = (0.0, 0.25, 0.5, 0.75)


def launch_ticks(reps: int = 4, phases: tuple[float, ...] = PHASES) -> dict[str, Any]:
    """Seconds from ``sbatch`` to the job running, for jobs submitted ``phase`` s into a wall-clock
    second, and where in its second each job started (the lab's Slurm, one job at a time)."""
    waits: dict[str, list[float]] = {str(p): [] for p in phases}
    starts: list[float] = []
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="wqs-bench-ticks-") as folder:
        env = dict(os.environ, SLURM_CONF=lab.start_slurm(cpus=2))
        time.sleep(4)  # slurmctld's first scheduling pass comes about 3 s after it starts
        for rep in range(reps):
            for phase in phases:
                time.sleep(1 - time.time() % 1 + phase)
                mark = Path(folder) / f"start.{rep}.{phase}"
                submitted = time.time()
                subprocess.run(
                    lab.argv(HEAD, ["sbatch", "-o", "/dev/null", "--wrap", f"date +%s.%N > {mark}"]),
                    env=env,
                    check=True,
                    capture_output=True,
                )
                deadline = time.monotonic() + 30
                while not (mark.exists() and mark.stat().st_size):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"a job submitted {phase} s into a second did not run within 30 s")
                    time.sleep(0.01)
                started = float(mark.read_text())
                waits[str(phase)].append(started - submitted)
                starts.append(started % 1)
                time.sleep(1.2)
    return {"machine": machine(), "reps": reps, "wait_s": waits, "start_fraction": starts}


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
    parser.add_argument(
        "--ticks",
        action="store_true",
        help="instead: sbatch to running by the moment of the second a job is submitted at",
    )
    args = parser.parse_args(argv)

    if args.ticks:
        ticks = launch_ticks(reps=args.reps)
        save(ticks, args.out, "slurm-ticks.json")
        for phase, waits in ticks["wait_s"].items():
            print(f"submitted {phase} s into a second: running after " + ", ".join(f"{w:.2f}" for w in waits))
        fractions = sorted(ticks["start_fraction"])
        print("the jobs started this far into their second: " + ", ".join(f"{f:.2f}" for f in fractions))
        return 0

    result = run(reps=args.reps, bursts=args.bursts, burst_size=args.burst_size, gap=args.gap)
    save(result, args.out, "scaling.json")
    for tool, figures in result["tools"].items():
        first, reaction, jobs = figures["first_task_s"], figures["reaction_s"], figures["jobs_per_task"]
        detail = ""
        if figures["submitted_s"]["n"]:
            sub = figures["submitted_s"]
            detail = (
                f"; sbatch returned after {sub['median']:.3f} s (min {sub['min']:.3f}, max {sub['max']:.3f})"
            )
        if tool != "wqsupervisor" and reaction["n"]:
            detail = (
                f"; {reaction['median']:.2f} s once it looked "
                f"(min {reaction['min']:.2f}, max {reaction['max']:.2f})"
            )
        print(
            f"{tool:19s} first task {first['median']:.2f} s "
            f"(min {first['min']:.2f}, max {first['max']:.2f}){detail}; "
            f"jobs per task {jobs['median']:.3f} "
            f"(min {jobs['min']:.3f}, max {jobs['max']:.3f}), n={jobs['n']}"
        )
    if "ratio_first_task_wqs_over_factory" in result:
        print(
            "wqsupervisor / work_queue_factory: "
            f"first task {result['ratio_first_task_wqs_over_factory']:.2f}, "
            f"jobs per task {result['ratio_jobs_per_task_wqs_over_factory']:.2f}"
        )
    if "ratio_first_task_wqs_over_factory_reaction" in result:
        print(
            "wqsupervisor's first task / the factory's once it looked (target <= 1.0): "
            f"{result['ratio_first_task_wqs_over_factory_reaction']:.2f}"
        )
    return 0
