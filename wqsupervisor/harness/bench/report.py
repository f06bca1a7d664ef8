"""The benchmark's figures, and how they are shown: statistics, JSON, Markdown, PNG plots.

The statistics are pure functions of fixed numbers. Each figure is the median
of its repetitions with the min and max beside it; a ratio to a comparator is
taken repetition by repetition (both measured in the same repetition,
interleaved), and then summarised the same way. matplotlib is imported only
when a plot is drawn.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...errors import WQSupervisorError
from ..common import summary

Summary = dict[str, Any]
# Display order and labels of the recovery comparators.
RECOVERY_BASE = "wqsupervisor"


# -- statistics ------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), interpolating between closest ranks as numpy does by default."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0-100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def interleaved(names: Sequence[str], rep: int) -> list[str]:
    """The order of the paths in repetition ``rep``: as given, reversed every other time (A B, B A).

    Alternating the order puts every path as often early as late in a
    repetition, so a drift of the machine's speed weighs on all of them alike.
    """
    return list(names) if rep % 2 == 0 else list(reversed(names))


def paired_ratios(tops: Sequence[float | None], bottoms: Sequence[float | None]) -> list[float]:
    """``top / bottom`` for each repetition where both were measured (and the bottom is not 0)."""
    if len(tops) != len(bottoms):
        raise ValueError(f"{len(tops)} figures against {len(bottoms)} comparators")
    return [t / b for t, b in zip(tops, bottoms, strict=True) if t is not None and b is not None and b != 0]


def compare(raw: Mapping[str, Sequence[float]], comparators: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Each path's summary, its raw figures, and its ratio to each of its comparators measured here."""
    out: dict[str, Any] = {}
    for name, values in raw.items():
        out[name] = {
            "figure": summary(list(values)),
            "raw": list(values),
            "ratios": {
                other: summary(paired_ratios(values, raw[other]))
                for other in comparators.get(name, ())
                if other in raw and other != name
            },
        }
    return out


def recovery_ratios(runs: Sequence[Mapping[str, Mapping[str, Any]]], key: str) -> dict[str, Any]:
    """wqsupervisor's ``key`` seconds over each other tool's, run by run, where both recovered.

    ``runs`` is a list of ``{tool: {key: seconds or None}}``. A run where the
    other tool never recovered gives no ratio; it is counted in ``never``.
    """
    tools = [t for t in (runs[0] if runs else {}) if t != RECOVERY_BASE]
    out: dict[str, Any] = {}
    for tool in tools:
        ours = [r[RECOVERY_BASE][key] for r in runs]
        theirs = [r[tool][key] for r in runs]
        out[tool] = summary(paired_ratios(ours, theirs)) | {
            "never": sum(t is None for t in theirs),
            "ours_never": sum(o is None for o in ours),
        }
    return out


# -- text ---------------------------------------------------------------------------------------------


def fmt_summary(s: Mapping[str, Any], digits: int = 0, scale: float = 1.0) -> str:
    """``median (min-max)``, or ``n/a`` when nothing was measured."""
    if not s or s.get("median") is None:
        return "n/a"
    if s.get("n", 0) == 1:
        return f"{s['median'] * scale:.{digits}f}"
    return f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f})"


def fmt_ratio(s: Mapping[str, Any] | None) -> str:
    """A ratio summary with its count: ``0.18 (0.16-0.19, n=5)``."""
    if not s or s.get("median") is None:
        return "n/a"
    if s["n"] == 1:
        return f"{s['median']:.2f} (n=1)"
    return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}, n={s['n']})"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _ratio_cells(entry: Mapping[str, Any], first: str = "direct") -> tuple[str, str]:
    """The ratio to ``first`` and the ratio to the path's own comparator (named)."""
    ratios = entry.get("ratios", {})
    own = [(k, v) for k, v in ratios.items() if k != first]
    own_text = "; ".join(f"{fmt_ratio(v)} vs {k}" for k, v in own) or "-"
    return fmt_ratio(ratios.get(first)) if first in ratios else "-", own_text


def _label(section: Mapping[str, Any], key: str) -> str:
    return str(section.get("labels", {}).get(key, key))


def markdown(results: Mapping[str, Any]) -> str:
    """Every measured section as Markdown tables, with what was measured and how."""
    out: list[str] = []
    bulk = results.get("bulk")
    if bulk:
        out += [
            f"### Bulk throughput: {bulk['mib']} MiB, one stream, MB/s (10^6 bytes/s)",
            "",
            f"Median (min-max) of {bulk['reps']} repetitions; ratios per repetition, paths interleaved.",
            "",
        ]
        rows = []
        for key, entry in bulk["paths"].items():
            vs_direct, vs_own = _ratio_cells(entry)
            rows.append([_label(bulk, key), fmt_summary(entry["figure"]), vs_direct, vs_own])
        out += [*_table(["path", "MB/s", "/ direct", "/ its comparator"], rows), ""]
        if bulk.get("targets"):
            out += [*_targets(bulk), ""]
    conc = results.get("concurrency")
    if conc:
        out += [
            f"### Concurrency: {conc['mib']} MiB split over N simultaneous streams, aggregate MB/s",
            "",
            "Every stream of a tunnel shares its one ssh connection (as many workers do). "
            f"Median (min-max) of {conc['reps']} repetitions.",
            "",
        ]
        rows = []
        for streams, paths in conc["streams"].items():
            for key, entry in paths.items():
                vs_direct, _ = _ratio_cells(entry)
                rows.append([streams, _label(conc, key), fmt_summary(entry["figure"]), vs_direct])
        out += [*_table(["streams", "path", "MB/s", "/ direct"], rows), ""]
    lat = results.get("latency")
    if lat:
        out += [
            f"### Latency: {lat['size']}-byte request and echo, {lat['count']} round trips, microseconds",
            "",
            f"p50 and p99 of each repetition; median (min-max) of {lat['reps']} repetitions; "
            "ratios are of p50.",
            "",
        ]
        rows = []
        for key, entry in lat["paths"].items():
            p50, p99 = entry["p50_us"], entry["p99_us"]
            vs_direct, vs_own = _ratio_cells(p50)
            rows.append(
                [_label(lat, key), fmt_summary(p50["figure"]), fmt_summary(p99["figure"]), vs_direct, vs_own]
            )
        out += [*_table(["path", "p50 us", "p99 us", "p50 / direct", "p50 / its comparator"], rows), ""]
        if lat.get("targets"):
            out += [*_targets(lat), ""]
    tasks = results.get("tasks")
    if tasks:
        out += _tasks_markdown(tasks)
    rec = results.get("recovery")
    if rec:
        out += _recovery_markdown(rec)
    for note in results.get("notes", []):
        out.append(f"- {note}")
    return "\n".join(out).rstrip() + "\n"


def _tasks_markdown(tasks: Mapping[str, Any]) -> list[str]:
    out = [
        f"### Work Queue task throughput: {tasks['workers']} real workers, tasks/s",
        "",
        "Steady rate = tasks between the first and the last completion; whole run = from submission "
        "(it includes the master's own 1-second dispatch stall, so it is bimodal). "
        f"Median (min-max) of {tasks['rounds']} rounds; paths interleaved in every round; each ratio is "
        "to the comparator measured in the same round. Inputs are sent to every task (no cache). "
        "With 100 MB inputs the master sends one input at a time and sees the first completion late, "
        "so the steady rate reads high there; the whole-run rate is the fairer figure for that size.",
        "",
    ]
    rows = []
    for size, block in tasks["sizes"].items():
        for kind, entry in block["paths"].items():
            ratios = entry["steady"]["ratios"]
            rows.append(
                [
                    f"{size} ({block['tasks']} tasks)",
                    kind,
                    fmt_summary(entry["steady"]["figure"], 1),
                    fmt_summary(entry["whole"]["figure"], 1),
                    fmt_ratio(ratios.get("direct")) if kind != "direct" else "-",
                    "; ".join(f"{fmt_ratio(r)} vs {name}" for name, r in ratios.items() if name != "direct")
                    or "-",
                    fmt_ratio(entry["whole"]["ratios"].get("direct")) if kind != "direct" else "-",
                ]
            )
    out += _table(
        [
            "inputs",
            "path",
            "steady tasks/s",
            "whole-run tasks/s",
            "steady / direct",
            "steady / its comparator",
            "whole / direct",
        ],
        rows,
    )
    out += ["", *_targets(tasks), ""]
    return out


def _targets(section: Mapping[str, Any]) -> list[str]:
    """One line per target of a section: the ratio and whether it is met."""
    return [
        f"- target: {target['text']}: {target['value']} -> {'met' if target['met'] else 'NOT met'}"
        for target in section.get("targets", [])
    ]


def _recovery_markdown(rec: Mapping[str, Any]) -> list[str]:
    out = [
        "### Recovery in the firewall lab: seconds from the fault (from the heal, for outages)",
        "",
        str(rec.get("note", "")),
        "",
    ]
    if "skipped" in rec:
        return [*out, f"Skipped: {rec['skipped']}", ""]

    def cell(s: Mapping[str, Any]) -> str:
        text = fmt_summary(s, 1) if s.get("n") else "never"
        if s.get("never") and s.get("n"):
            text += f" +{s['never']} never"
        return text

    rows = []
    for fault, block in rec["faults"].items():
        for tool, figures in block["tools"].items():
            ratio = (
                _recovery_ratio_cell(block["ratios"]["forward_s"].get(tool), rec)
                if tool != RECOVERY_BASE
                else "-"
            )
            rows.append(
                [
                    fault,
                    tool,
                    cell(figures["detected_s"]),
                    cell(figures["forward_s"]),
                    cell(figures["workers_s"]),
                    f"{figures['lost']['median']:g}" if figures["lost"]["median"] is not None else "n/a",
                    ratio,
                ]
            )
    out += _table(
        [
            "fault",
            "tool",
            "detected",
            "forward back",
            "all workers back",
            "connections lost",
            "wqsupervisor / tool, forward back",
        ],
        rows,
    )
    out += [
        "",
        "The ratio is of 'forward back' (the head's remote port answers for the master again, seen from "
        "the head); below 1, wqsupervisor was faster. 'all workers back' is the first time the master "
        "counts every worker again: after an instant fault that can come before the master noticed the "
        "loss (0.0-0.4 s), so it is shown but not divided. The JSON has the ratios of every column.",
        "",
    ]
    return out


def _recovery_ratio_cell(ratio: Mapping[str, Any] | None, rec: Mapping[str, Any]) -> str:
    if ratio is None:
        return "n/a"
    if ratio.get("median") is None:
        if ratio.get("never"):
            return f"- (tool never back within {rec.get('window_s', 0):g} s)"
        if ratio.get("ours_never"):
            return "wqsupervisor: never"
        return "n/a"
    return fmt_ratio(ratio)


def publish_page(results: Mapping[str, Any], images: Mapping[str, str]) -> str:
    """The page ``benchmarks/RESULTS.md``: command, machine, durations, tables, plots."""
    m = results["machine"]
    lines = [
        "# wqsupervisor benchmark results",
        "",
        "Written by the benchmark itself; rerun the command below to refresh it.",
        "",
        "```",
        str(results["command"]),
        "```",
        "",
        f"- mode: {results['mode']}, started {results['started']}, took {results['duration_s']:.0f} s",
        f"- machine: {m['cpus']} CPUs, Linux {m['kernel']}, Python {m['python']}",
        f"- OpenSSH: {m['openssh']}; cctools: {m['cctools']}; paramiko: {m.get('paramiko', 'n/a')}; "
        f"wqsupervisor {m['wqsupervisor']}",
        "",
        markdown(results),
    ]
    for title, path in images.items():
        lines += [f"![{title}]({path})", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_json(results: Mapping[str, Any], path: Path) -> Path:
    """The whole result, raw figures included."""
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    return path


# -- plots -------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise WQSupervisorError(
            "the benchmark's plots need matplotlib", "pip install 'wqsupervisor[bench]'"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _spread(entries: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[list[float]]]:
    """Medians, and the distances down to the min and up to the max, for error bars."""
    medians = [float(e["median"] or 0.0) for e in entries]
    low = [m - float(e["min"] if e["min"] is not None else m) for m, e in zip(medians, entries, strict=True)]
    high = [float(e["max"] if e["max"] is not None else m) - m for m, e in zip(medians, entries, strict=True)]
    return medians, [low, high]


def plot_throughput(results: Mapping[str, Any], path: Path) -> Path:
    """Bulk MB/s by path (bars, min-max whiskers), and aggregate MB/s by number of streams."""
    plt = _pyplot()
    bulk, conc = results.get("bulk"), results.get("concurrency")
    panels = [p for p in (bulk, conc) if p]
    fig = plt.figure(figsize=(11, 4.4 * len(panels)), layout="constrained")
    # Sub-figures, so the long path names of one panel do not squeeze the other.
    subs = fig.subfigures(len(panels), 1, squeeze=False)
    row = 0
    if bulk:
        ax = subs[row][0].subplots()
        keys = list(bulk["paths"])
        med, err = _spread([bulk["paths"][k]["figure"] for k in keys])
        ys = list(range(len(keys)))
        ax.barh(ys, med, xerr=err, color="#4c72b0", capsize=3)
        ax.set_yticks(ys, [_label(bulk, k) for k in keys])
        ax.invert_yaxis()
        ax.set_xlabel("MB/s (median, whiskers min-max)")
        ax.set_title(f"Bulk throughput, {bulk['mib']} MiB, one stream ({bulk['reps']} repetitions)")
        top = max(m + e for m, e in zip(med, err[1], strict=True)) if med else 1.0
        for y, key, value, up in zip(ys, keys, med, err[1], strict=True):
            ratio = bulk["paths"][key]["ratios"].get("direct")
            note = f"{value:.0f}" + (f" ({ratio['median']:.2f}x direct)" if ratio and ratio["median"] else "")
            ax.text(value + up + top * 0.01, y, note, va="center", fontsize=8)
        ax.set_xlim(0, top * 1.3)
        row += 1
    if conc:
        ax = subs[row][0].subplots()
        counts = list(conc["streams"])
        keys = list(conc["streams"][counts[0]])
        width = 0.8 / max(1, len(keys))
        for i, key in enumerate(keys):
            med, err = _spread([conc["streams"][c][key]["figure"] for c in counts])
            xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(counts))]
            ax.bar(xs, med, width, yerr=err, capsize=3, label=key)
        ax.set_xticks(range(len(counts)), [f"{c} stream{'s' if c != '1' else ''}" for c in counts])
        ax.set_ylabel("aggregate MB/s")
        ax.set_yscale("log")
        ax.set_title(f"Concurrency: {conc['mib']} MiB over N streams sharing one connection")
        ax.legend(fontsize=8, loc="upper right")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency(results: Mapping[str, Any], path: Path) -> Path:
    """p50 and p99 round trips by path, log scale."""
    plt = _pyplot()
    lat = results["latency"]
    keys = list(lat["paths"])
    fig, ax = plt.subplots(figsize=(11, 0.6 * len(keys) + 1.8))
    ys = list(range(len(keys)))
    for offset, which, color in ((-0.2, "p50_us", "#4c72b0"), (0.2, "p99_us", "#dd8452")):
        med, err = _spread([lat["paths"][k][which]["figure"] for k in keys])
        ax.barh([y + offset for y in ys], med, 0.4, xerr=err, capsize=3, color=color, label=which[:3])
        for y, value, up in zip(ys, med, err[1], strict=True):
            ax.text((value + up) * 1.06, y + offset, f"{value:.0f}", va="center", fontsize=7)
    ax.set_yticks(ys, [_label(lat, k) for k in keys])
    ax.invert_yaxis()
    ax.set_xscale("log")
    from matplotlib import ticker

    ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlim(left=10, right=ax.get_xlim()[1] * 1.6)
    ax.set_xlabel("round trip, microseconds (log scale; median of the repetitions, whiskers min-max)")
    ax.set_title(f"Latency: {lat['size']}-byte request and echo, {lat['count']} round trips a repetition")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tasks(results: Mapping[str, Any], path: Path) -> Path:
    """Steady tasks/s by input size and path, log scale."""
    plt = _pyplot()
    tasks = results["tasks"]
    sizes = list(tasks["sizes"])
    kinds = list(tasks["sizes"][sizes[0]]["paths"])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, len(kinds))
    for i, kind in enumerate(kinds):
        med, err = _spread([tasks["sizes"][s]["paths"][kind]["steady"]["figure"] for s in sizes])
        xs = [j + (i - (len(kinds) - 1) / 2) * width for j in range(len(sizes))]
        ax.bar(xs, med, width, yerr=err, capsize=3, label=kind)
    ax.set_xticks(range(len(sizes)), sizes)
    ax.set_yscale("log")
    ax.set_ylabel("steady tasks/s (log scale)")
    ax.set_title(f"Work Queue tasks/s, {tasks['workers']} workers, by input size ({tasks['rounds']} rounds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_recovery(results: Mapping[str, Any], path: Path) -> Path:
    """Seconds until the forward and until every worker is back, by fault and tool.

    A tool that never recovered within the window is drawn at the window, hatched.
    """
    plt = _pyplot()
    rec = results["recovery"]
    faults = list(rec["faults"])
    tools = list(rec["faults"][faults[0]]["tools"])
    window = float(rec.get("window_s", 150))
    fig, axes = plt.subplots(2, 1, figsize=(10, 8), squeeze=False)
    width = 0.8 / max(1, len(tools))
    for ax, key, what in (
        (axes[0][0], "forward_s", "the forward reaches the master again"),
        (axes[1][0], "workers_s", "the master counts every worker again"),
    ):
        for i, tool in enumerate(tools):
            xs = [j + (i - (len(tools) - 1) / 2) * width for j in range(len(faults))]
            figures = [rec["faults"][f]["tools"][tool][key] for f in faults]
            heights = [float(s["median"]) if s.get("n") else window for s in figures]
            bars = ax.bar(xs, heights, width, label=tool)
            for bar, s, x, h in zip(bars, figures, xs, heights, strict=True):
                if not s.get("n"):
                    bar.set_hatch("//")
                    bar.set_alpha(0.45)
                ax.text(x, h, "never" if not s.get("n") else f"{h:.1f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(faults)), faults)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylim(0, window * 2.5)
        ax.set_ylabel("seconds (symlog)")
        ax.set_title(f"Until {what} (firewall lab, {rec.get('reps', 1)} run(s) per fault)")
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(results: Mapping[str, Any], out: Path, plots: bool = True) -> dict[str, Path]:
    """results.json, results.md and whichever plots have figures, into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "json": write_json(results, out / "results.json"),
        "markdown": out / "results.md",
    }
    files["markdown"].write_text(markdown(results))
    if not plots:
        return files
    if results.get("bulk") or results.get("concurrency"):
        files["throughput"] = plot_throughput(results, out / "throughput.png")
    if results.get("latency"):
        files["latency"] = plot_latency(results, out / "latency.png")
    if results.get("tasks"):
        files["tasks"] = plot_tasks(results, out / "tasks.png")
    if results.get("recovery", {}).get("faults"):
        files["recovery"] = plot_recovery(results, out / "recovery.png")
    return files


def relative(path: Path, start: Path) -> str:
    """``path`` as a link from a page in ``start``."""
    return Path(os.path.relpath(path, start)).as_posix()
