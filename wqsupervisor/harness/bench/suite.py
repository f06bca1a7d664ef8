"""``python -m wqsupervisor bench``: the reference figures for choosing how a master reaches its workers.

One run on one machine measures, each against its comparator in the same run:

* ``bulk`` -- MB/s of one stream through every path of :mod:`.netpaths`;
* ``concurrency`` -- aggregate MB/s of 1, 8 and 64 streams sharing one connection;
* ``latency`` -- p50/p99 of 64-byte round trips through every path;
* ``tasks`` -- Work Queue tasks/s with real workers, empty and with 1 MB and
  100 MB inputs, direct / supervised / the HOWTO's ``ssh -N -R`` / its two-hop
  chain (:func:`.taskrate.run_sizes`);
* ``recovery`` -- per-fault detection and recovery in the firewall lab,
  wqsupervisor against autossh in both modes (:mod:`.faults`; needs root).

Paths are interleaved in every repetition, the order reversed every other
time; each figure is the median (min-max) of the repetitions, and each ratio
is taken repetition by repetition. Progress goes to stderr, the table to
stdout, and results.json, results.md and PNG plots to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import WQSupervisorError
from ..common import machine
from . import report, taskrate
from .netpaths import CONCURRENT_PATHS, PATHS, Bed

SECTIONS = ("bulk", "concurrency", "latency", "tasks", "recovery")
# Short enough for a full run; `--only recovery` runs every fault of the lab.
# A fault that a tool never recovers from costs the lab's whole 150 s window, so
# the full run keeps one such (peer-hung); `--only recovery` runs every fault.
FULL_FAULTS = ("ssh-killed", "session-killed", "peer-hung", "blackhole-20s-kept")
QUICK_FAULTS = ("ssh-killed",)
TASK_PATHS = (
    "direct",
    "wqsupervisor",
    "ssh -N -R",
    taskrate.TWO_HOP,
    taskrate.SUPERVISED_TWO_HOP,
    taskrate.RESUMABLE,
    taskrate.RESUMABLE_TWO_HOP,
    taskrate.SOCAT_HOPS,
)
MIB = 1 << 20
MB = 1_000_000

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Plan:
    """How much of everything one run measures."""

    mode: str
    reps: int
    bulk_mib: int
    concurrency_mib: int
    streams: tuple[int, ...]
    latency_count: int
    latency_size: int
    task_rounds: int
    task_workers: int
    sizes: tuple[tuple[str, int, int], ...]
    faults: tuple[str, ...]
    fault_reps: int


def plan_for(quick: bool, only: Sequence[str] = (), faults: Sequence[str] = ()) -> Plan:
    """The quick plan (under 2 minutes on 2 cores) or the full one (under 10)."""
    if faults:
        chosen = tuple(faults)
    elif quick:
        chosen = QUICK_FAULTS
    elif list(only) == ["recovery"]:
        from .faults import faults as every_fault

        chosen = tuple(every_fault())
    else:
        chosen = FULL_FAULTS
    if quick:
        return Plan(
            mode="quick",
            reps=3,
            bulk_mib=64,
            concurrency_mib=64,
            streams=(1, 8, 64),
            latency_count=1000,
            latency_size=64,
            task_rounds=3,
            task_workers=2,
            sizes=(("empty", 0, 40), ("1 MB", MB, 16), ("100 MB", 100 * MB, 3)),
            faults=chosen,
            fault_reps=1,
        )
    return Plan(
        mode="full",
        reps=4,  # even: as many repetitions in each order
        bulk_mib=256,
        concurrency_mib=256,
        streams=(1, 8, 64),
        latency_count=2000,
        latency_size=64,
        task_rounds=4,
        task_workers=2,
        sizes=(("empty", 0, 100), ("1 MB", MB, 40), ("100 MB", 100 * MB, 8)),
        faults=chosen,
        fault_reps=1,
    )


def command_line(argv0: str, args: Sequence[str]) -> str:
    """The command a person would type to repeat this run."""
    here = Path(argv0)
    if here.name == "__main__.py" and here.parent.name == "wqsupervisor":
        prefix = "python3 -m wqsupervisor bench"
    elif here.name == "suite.py" and here.parent.name == "bench":
        prefix = "python3 -m wqsupervisor.harness.bench.suite"
    elif here.name == "wqsupervisor":
        prefix = "wqsupervisor bench"
    else:
        with contextlib.suppress(ValueError):
            argv0 = os.path.relpath(argv0)
        prefix = f"python3 {argv0}"
    return " ".join([prefix, *map(shlex.quote, args)])


def labels(default_cipher: str) -> dict[str, str]:
    """The paths' names for tables and plots."""
    out = {key: spec.label for key, spec in PATHS.items()}
    out["ssh -R"] = f"ssh -N -R, default cipher ({default_cipher.removesuffix('@openssh.com')})"
    return out


def _comparators(keys: Sequence[str]) -> dict[str, tuple[str, ...]]:
    return {k: PATHS[k].comparators for k in keys}


# -- the sections ---------------------------------------------------------------------------------


def run_bulk(bed: Bed, plan: Plan, progress: Progress) -> dict[str, Any]:
    """One stream of ``bulk_mib`` MiB through every path, interleaved."""
    keys = list(PATHS)
    for key in keys:
        bed.port(key)
    raw: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(plan.reps):
        for key in report.interleaved(keys, r):
            rate = bed.client.bulk(bed.port(key), plan.bulk_mib * MIB)
            raw[key].append(rate)
            progress(f"bulk {r + 1}/{plan.reps} {key}: {rate:.0f} MB/s")
    paths = report.compare(raw, _comparators(keys))
    return {
        "mib": plan.bulk_mib,
        "reps": plan.reps,
        "labels": labels(bed.default_cipher),
        "default_cipher": bed.default_cipher,
        "paths": paths,
        "targets": bulk_targets(paths),
    }


def ratio_target(
    text: str, entry: dict[str, Any], comparator: str, bound: float, most: bool = False
) -> dict[str, Any]:
    """A target on a path's ratio to one of its comparators: at least ``bound`` (at most, ``most``)."""
    ratio = entry.get("ratios", {}).get(comparator, {})
    median = ratio.get("median")
    met = median is not None and (median <= bound if most else median >= bound)
    return {
        "text": f"{text} {'<=' if most else '>='} {bound:g}",
        "value": report.fmt_ratio(ratio),
        "met": met,
    }


def bulk_targets(paths: dict[str, Any]) -> list[dict[str, Any]]:
    """The issues' bulk targets: the supervised tunnel at least 0.95 of ssh with the same cipher, the
    relay at least 0.8 of plain forwarding."""
    out = []
    if "wqsupervisor" in paths:
        out.append(
            ratio_target(
                "bulk: supervised / ssh -R with its cipher", paths["wqsupervisor"], "ssh -R aes128-gcm", 0.95
            )
        )
    if "resumable" in paths:
        out.append(ratio_target("bulk: resumable / plain", paths["resumable"], "wqsupervisor", 0.8))
    return out


def run_concurrency(bed: Bed, plan: Plan, progress: Progress) -> dict[str, Any]:
    """``concurrency_mib`` MiB split over 1, 8, 64 streams, per path, interleaved."""
    keys = list(CONCURRENT_PATHS)
    raw: dict[int, dict[str, list[float]]] = {n: {k: [] for k in keys} for n in plan.streams}
    for r in range(plan.reps):
        for n in plan.streams:
            for key in report.interleaved(keys, r):
                rate = bed.client.bulk(bed.port(key), plan.concurrency_mib * MIB, n)
                raw[n][key].append(rate)
                progress(f"concurrency {r + 1}/{plan.reps} {n} streams {key}: {rate:.0f} MB/s")
    only_direct = {k: ("direct",) for k in keys if k != "direct"}
    return {
        "mib": plan.concurrency_mib,
        "reps": plan.reps,
        "labels": labels(bed.default_cipher),
        "streams": {str(n): report.compare(raw[n], only_direct) for n in plan.streams},
    }


def run_latency(bed: Bed, plan: Plan, progress: Progress) -> dict[str, Any]:
    """p50/p99 of small round trips through every path, interleaved."""
    keys = list(PATHS)
    for key in keys:
        bed.port(key)
    p50: dict[str, list[float]] = {k: [] for k in keys}
    p99: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(plan.reps):
        for key in report.interleaved(keys, r):
            rtts = bed.client.echo(bed.port(key), plan.latency_count, plan.latency_size)
            p50[key].append(report.percentile(rtts, 50))
            p99[key].append(report.percentile(rtts, 99))
            progress(
                f"latency {r + 1}/{plan.reps} {key}: p50 {p50[key][-1]:.0f} us, p99 {p99[key][-1]:.0f} us"
            )
    comparators = _comparators(keys)
    by50, by99 = report.compare(p50, comparators), report.compare(p99, comparators)
    return {
        "count": plan.latency_count,
        "size": plan.latency_size,
        "reps": plan.reps,
        "labels": labels(bed.default_cipher),
        "paths": {k: {"p50_us": by50[k], "p99_us": by99[k]} for k in keys},
        "targets": (
            [ratio_target("echo p50: resumable / plain", by50["resumable"], "wqsupervisor", 1.3, most=True)]
            if "resumable" in by50
            else []
        ),
    }


def task_targets(tasks: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets: supervised/direct >= 0.75 steady for empty tasks, >= plain for every size."""
    out: list[dict[str, Any]] = []
    sizes = tasks["sizes"]
    empty = sizes.get("empty", {}).get("paths", {}).get("wqsupervisor")
    if empty:
        out.append(
            ratio_target("supervised / direct, steady rate, empty tasks", empty["steady"], "direct", 0.75)
        )
    for label, block in sizes.items():
        entry = block["paths"].get("wqsupervisor")
        if not entry or "ssh -N -R" not in entry["steady"]["ratios"]:
            continue
        out.append(
            ratio_target(
                f"supervised / ssh -N -R, steady rate, {label} inputs", entry["steady"], "ssh -N -R", 1.0
            )
        )
    resumable = {label: block["paths"].get(taskrate.RESUMABLE) for label, block in sizes.items()}
    if resumable.get("empty"):
        out.append(
            ratio_target(
                "resumable / direct, steady rate, empty tasks", resumable["empty"]["steady"], "direct", 0.70
            )
        )
    if resumable.get("1 MB"):
        out.append(
            ratio_target(
                "resumable / supervised, steady rate, 1 MB inputs",
                resumable["1 MB"]["steady"],
                "wqsupervisor",
                0.9,
            )
        )
    return out


def run_tasks(plan: Plan, progress: Progress) -> dict[str, Any]:
    """Task rates by input size: direct, supervised, ssh -N -R, two-hop."""
    out = taskrate.run_sizes(
        rounds=plan.task_rounds,
        sizes=plan.sizes,
        n_workers=plan.task_workers,
        paths=TASK_PATHS,
        progress=progress,
    )
    out["targets"] = task_targets(out)
    return out


def run_recovery(plan: Plan, progress: Progress) -> dict[str, Any]:
    """The lab's faults, wqsupervisor against autossh -M 0 and autossh -M PORT, side by side."""
    from .faults import TOOLS, WINDOW
    from .faults import faults as every_fault

    subset = list(every_fault()) != list(plan.faults)
    note = (
        f"Faults measured: {', '.join(plan.faults)}; {plan.fault_reps} run each"
        + (
            " (a subset: `bench --only recovery` runs every fault of the lab, which takes long)"
            if subset
            else ""
        )
        + f". Tools side by side in one lab: {', '.join(TOOLS)}. 'never': not within {WINDOW:g} s."
        + f" Each lab master keeps {faults_backlog()} tasks queued."
        + (" With one run per fault a figure is that run's, not a median." if plan.fault_reps == 1 else "")
    )
    if os.geteuid() != 0:
        return {"skipped": "the firewall lab needs root (network namespaces); run as root", "note": note}
    from . import faults

    out = faults.run(only=list(plan.faults), reps=plan.fault_reps, progress=progress)
    out["note"] = note
    out["subset"] = subset
    for block in out["faults"].values():
        block["ratios"] = {
            key: report.recovery_ratios(block["raw"], key) for key in ("detected_s", "forward_s", "workers_s")
        }
    return out


_NETWORK: dict[str, Callable[[Bed, Plan, Progress], dict[str, Any]]] = {
    "bulk": run_bulk,
    "concurrency": run_concurrency,
    "latency": run_latency,
}


# -- the run ------------------------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    from importlib import metadata

    info = machine()
    for name in ("paramiko", "matplotlib"):
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = "missing"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        info["memory_gib"] = round(kib / 1024 / 1024, 1)
    return info


class _Progress:
    """Timestamped progress lines on stderr."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f} s] {text}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    """The options of ``bench``."""
    parser = argparse.ArgumentParser(
        prog="python -m wqsupervisor bench",
        description="Measure bulk throughput, concurrency, latency, Work Queue task rates and recovery "
        "through every way of connecting a master to its workers, each against its comparator.",
    )
    parser.add_argument("--quick", action="store_true", help="a short run (under 2 minutes on 2 cores)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        metavar="NAME",
        help=f"measure only these: {', '.join(SECTIONS)} (default: all; '--only recovery' runs every fault)",
    )
    parser.add_argument(
        "--out", default="bench-out", metavar="DIR", help="where the files go (default: bench-out)"
    )
    parser.add_argument("--faults", nargs="+", metavar="FAULT", help="the lab faults to run for recovery")
    parser.add_argument(
        "--publish",
        metavar="FILE",
        help="also write a results page (e.g. benchmarks/RESULTS.md) linking the plots in --out",
    )
    parser.add_argument("--no-plots", action="store_true", help="write JSON and Markdown only")
    return parser


def faults_backlog() -> int:
    """Tasks each lab master keeps queued during the recovery section."""
    from .faults import BACKLOG

    return BACKLOG


def main(argv: list[str] | None = None, *, command: str | None = None) -> int:
    """Run the benchmark; returns the exit status (1 when a section failed)."""
    args = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(args)
    sections = [s for s in SECTIONS if not ns.only or s in ns.only]
    if ns.faults:
        from .faults import faults

        unknown = sorted(set(ns.faults) - set(faults()))
        if unknown:
            print(f"bench: unknown faults {unknown}; known: {sorted(faults())}", file=sys.stderr)
            return 2
    plan = plan_for(ns.quick, ns.only or (), ns.faults or ())
    progress = _Progress()
    started = datetime.datetime.now(datetime.UTC)
    results: dict[str, Any] = {
        "command": command or command_line(sys.argv[0], args),
        "mode": plan.mode,
        "started": started.isoformat(timespec="seconds"),
        "machine": _machine(),
        "plan": dataclasses.asdict(plan),
        "sections": sections,
        "durations_s": {},
        "errors": {},
        "notes": [],
    }
    progress(f"bench ({plan.mode}): {', '.join(sections)}; files into {ns.out}")
    net = [s for s in sections if s in ("bulk", "concurrency", "latency")]
    try:
        if net:
            with Bed(progress) as bed:
                for name in net:
                    _section(results, name, functools.partial(_NETWORK[name], bed, plan, progress), progress)
        if "tasks" in sections:
            _section(results, "tasks", lambda: run_tasks(plan, progress), progress)
        if "recovery" in sections:
            _section(results, "recovery", lambda: run_recovery(plan, progress), progress)
    except KeyboardInterrupt:
        results["errors"]["interrupted"] = "stopped by Ctrl-C; the figures so far are kept"
    results["duration_s"] = round(time.monotonic() - progress.started, 1)
    results["notes"].append(
        f"{plan.mode} run, {results['duration_s']:.0f} s on this machine; repetitions per figure: "
        f"{plan.reps} (network), {plan.task_rounds} rounds (tasks), {plan.fault_reps} (recovery)."
    )
    return _finish(results, ns, progress)


def _section(
    results: dict[str, Any], name: str, measure: Callable[[], dict[str, Any]], progress: Progress
) -> None:
    began = time.monotonic()
    progress(f"-- {name}")
    try:
        results[name] = measure()
    except (RuntimeError, OSError, WQSupervisorError, TimeoutError, ValueError) as exc:
        results["errors"][name] = f"{type(exc).__name__}: {exc}"
        progress(f"{name} failed: {exc}")
    results["durations_s"][name] = round(time.monotonic() - began, 1)
    progress(f"-- {name} took {results['durations_s'][name]:.0f} s")


def write_outputs(
    results: dict[str, Any], out: Path, publish: Path | None = None, plots: bool = True
) -> dict[str, Path]:
    """results.json, results.md and the plots into ``out``; with ``publish``, the page linking them.

    Also the way to redraw a run's tables and plots from its results.json.
    """
    try:
        files = report.write_all(results, out, plots=plots)
    except WQSupervisorError as exc:
        print(f"bench: no plots: {exc.message} ({exc.hint})", file=sys.stderr)
        files = report.write_all(results, out, plots=False)
    if publish is not None:
        images = {
            title: report.relative(files[key], publish.parent)
            for key, title in (
                ("throughput", "Throughput by path"),
                ("latency", "Latency by path"),
                ("tasks", "Work Queue tasks/s by path and input size"),
                ("recovery", "Recovery by fault and tool"),
            )
            if key in files
        }
        publish.write_text(report.publish_page(results, images))
        files["page"] = publish
    return files


def _finish(results: dict[str, Any], ns: argparse.Namespace, progress: Progress) -> int:
    files = write_outputs(
        results, Path(ns.out), Path(ns.publish) if ns.publish else None, plots=not ns.no_plots
    )
    print(report.markdown(results))
    for name, error in results["errors"].items():
        print(f"bench: {name} failed: {error}", file=sys.stderr)
    progress("wrote " + ", ".join(str(p) for p in files.values()))
    progress(f"done in {results['duration_s']:.0f} s")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
