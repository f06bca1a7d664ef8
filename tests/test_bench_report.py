"""The benchmark's statistics, ratios, tables and plots on fixed numbers, and one short real run."""

from __future__ import annotations

import json
import sys

import pytest

from wqsupervisor.errors import WQSupervisorError
from wqsupervisor.harness.bench import report, suite, taskrate
from wqsupervisor.harness.bench.master import split_run
from wqsupervisor.harness.bench.netpaths import PATHS, first_cipher


def _s(median, lo, hi, n=3):
    return {"median": median, "min": lo, "max": hi, "n": n}


# -- statistics -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([4.0, 1.0, 3.0, 2.0], 0, 1.0),
        ([4.0, 1.0, 3.0, 2.0], 100, 4.0),
        ([float(i) for i in range(1, 101)], 99, 99.01),
        ([7.0], 99, 7.0),
        ([10.0, 20.0], 25, 12.5),
    ],
)
def test_percentile_interpolates_between_closest_ranks(values, q, expected):
    """Percentiles match numpy's default (linear) on fixed lists, whatever their order."""
    assert report.percentile(values, q) == pytest.approx(expected)


def test_percentile_refuses_nothing_and_out_of_range():
    """No values, or a percentile outside 0-100, is an error rather than a made-up figure."""
    with pytest.raises(ValueError, match="no values"):
        report.percentile([], 50)
    with pytest.raises(ValueError, match="outside"):
        report.percentile([1.0], 101)


def test_interleaved_reverses_every_other_repetition():
    """Repetitions alternate A B C and C B A, so every path is as often first as last."""
    assert report.interleaved(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert report.interleaved(["a", "b", "c"], 1) == ["c", "b", "a"]
    assert report.interleaved(["a", "b", "c"], 2) == ["a", "b", "c"]


def test_paired_ratios_skip_missing_and_zero_comparators():
    """A ratio exists only for repetitions where both figures were measured and the bottom is not 0."""
    assert report.paired_ratios([2.0, None, 3.0, 4.0], [1.0, 1.0, 0.0, 8.0]) == [2.0, 0.5]
    with pytest.raises(ValueError, match="2 figures against 1"):
        report.paired_ratios([1.0, 2.0], [1.0])


def test_compare_takes_the_median_of_per_repetition_ratios():
    """Ratios are paired by repetition, then summarised: not the ratio of the two medians."""
    raw = {"direct": [100.0, 200.0, 400.0], "ssh": [50.0, 20.0, 300.0]}
    out = report.compare(raw, {"ssh": ("direct", "missing")})
    assert out["direct"]["figure"] == _s(200.0, 100.0, 400.0)
    assert out["direct"]["ratios"] == {}
    ratio = out["ssh"]["ratios"]["direct"]
    assert ratio == _s(0.5, 0.1, 0.75)
    assert ratio["median"] != out["ssh"]["figure"]["median"] / out["direct"]["figure"]["median"]
    assert "missing" not in out["ssh"]["ratios"]
    assert out["ssh"]["raw"] == [50.0, 20.0, 300.0]


def test_recovery_ratios_count_the_runs_a_tool_never_recovered():
    """wqsupervisor over each tool, run by run; a tool's 'never' gives no ratio and is counted."""
    runs = [
        {
            "wqsupervisor": {"forward_s": 2.0},
            "autossh-M0": {"forward_s": 8.0},
            "autossh-monitor": {"forward_s": None},
        },
        {
            "wqsupervisor": {"forward_s": 3.0},
            "autossh-M0": {"forward_s": 6.0},
            "autossh-monitor": {"forward_s": None},
        },
    ]
    out = report.recovery_ratios(runs, "forward_s")
    assert out["autossh-M0"]["median"] == pytest.approx(0.375)
    assert (out["autossh-M0"]["never"], out["autossh-M0"]["n"]) == (0, 2)
    assert out["autossh-monitor"]["median"] is None
    assert out["autossh-monitor"]["never"] == 2
    assert "wqsupervisor" not in out


def test_task_rates_steady_leaves_out_the_wait_before_the_first_completion():
    """Steady = (N-1) tasks over first-to-last completion; whole run counts from submission."""
    result = {"submitted": 10.0, "done": [13.0, 11.0, 12.0, 11.5, 12.5], "failed": 0}
    rates = taskrate.rates(result, 5)
    assert rates["steady"] == pytest.approx(4 / 2.0)
    assert rates["whole"] == pytest.approx(5 / 3.0)
    with pytest.raises(RuntimeError, match="4 of 5 tasks"):
        taskrate.rates({"submitted": 0.0, "done": [1.0, 2.0, 3.0, 4.0]}, 5)
    with pytest.raises(RuntimeError, match="1 of 2 tasks failed"):
        taskrate.rates({"submitted": 0.0, "done": [1.0, 2.0], "failed": 1}, 2)


def test_master_run_command_takes_an_optional_input_file():
    """``run N CMD... [--input PATH]`` keeps the old form and adds the input."""
    assert split_run(["run", "5", "echo", "hi", "there"]) == (5, "echo hi there", None)
    assert split_run(["run", "3", "true", "--input", "/tmp/x"]) == (3, "true", "/tmp/x")


def test_first_cipher_reads_ssh_G():
    """The default cipher is the first one ``ssh -G`` lists."""
    text = "user me\nciphers chacha20-poly1305@openssh.com,aes128-ctr\nport 22\n"
    assert first_cipher(text) == "chacha20-poly1305@openssh.com"
    assert first_cipher("port 22\n") == "unknown"


def test_every_path_is_divided_by_paths_that_exist():
    """Each path's comparators are paths too; two-hop by one hop, paramiko by OpenSSH with its cipher."""
    for spec in PATHS.values():
        assert set(spec.comparators) <= set(PATHS) - {spec.key}
    assert PATHS["two-hop"].comparators == ("direct", "ssh -R")
    assert PATHS["paramiko"].comparators == ("direct", "ssh -R aes128-gcm")


# -- plans, targets, command ---------------------------------------------------------------------------


def test_plans_fit_their_budgets_and_name_their_faults():
    """Quick measures less than full; --only recovery alone runs every fault; --faults wins."""
    quick, full = suite.plan_for(True), suite.plan_for(False)
    assert (quick.bulk_mib, quick.reps) == (64, 3)
    assert full.bulk_mib >= 256 and full.reps >= 3 and full.task_rounds >= 3
    assert quick.faults == suite.QUICK_FAULTS and full.faults == suite.FULL_FAULTS
    assert len(suite.plan_for(False, ["recovery"]).faults) > len(full.faults)
    assert suite.plan_for(True, ["recovery"], ["peer-hung"]).faults == ("peer-hung",)
    assert quick.streams == full.streams == (1, 8, 64)


def _tasks(empty_vs_direct, ratios_vs_plain):
    sizes = {}
    for (label, vs_plain), vs_direct in zip(
        ratios_vs_plain.items(), [empty_vs_direct, 0.5, 0.4], strict=False
    ):
        sizes[label] = {
            "tasks": 10,
            "paths": {
                "wqsupervisor": {
                    "steady": {
                        "figure": _s(100.0, 90.0, 110.0),
                        "ratios": {
                            "direct": _s(vs_direct, vs_direct, vs_direct),
                            "ssh -N -R": _s(vs_plain, 1, 2),
                        },
                    },
                    "whole": {"figure": _s(90.0, 80.0, 95.0), "ratios": {"direct": _s(0.7, 0.6, 0.8)}},
                }
            },
        }
    return {"rounds": 3, "workers": 2, "sizes": sizes}


def test_task_targets_are_judged_on_median_steady_ratios():
    """Empty tasks need supervised/direct >= 0.75; every size needs supervised >= plain ssh -N -R."""
    met = suite.task_targets(_tasks(0.8, {"empty": 15.0, "1 MB": 9.0, "100 MB": 1.0}))
    assert [t["met"] for t in met] == [True, True, True, True]
    assert met[0]["value"] == "0.80 (0.80-0.80, n=3)"
    missed = suite.task_targets(_tasks(0.7, {"empty": 15.0, "1 MB": 9.0, "100 MB": 0.9}))
    assert [t["met"] for t in missed] == [False, True, True, False]


def test_bulk_and_echo_targets_judge_the_tunnel_against_its_cipher_and_the_relay_against_plain():
    """Bulk: supervised >= 0.95 of ssh -R with the same cipher, resumable >= 0.8 of plain;
    echo p50: resumable at most 1.3x plain. Paths not measured give no target."""
    paths = {
        "wqsupervisor": {"ratios": {"ssh -R aes128-gcm": _s(0.96, 0.9, 1.1)}},
        "resumable": {"ratios": {"wqsupervisor": _s(0.62, 0.59, 0.65)}},
    }
    judged = [(t["text"], t["met"]) for t in suite.bulk_targets(paths)]
    assert judged == [
        ("bulk: supervised / ssh -R with its cipher >= 0.95", True),
        ("bulk: resumable / plain >= 0.8", False),
    ]
    assert suite.bulk_targets({"wqsupervisor": paths["wqsupervisor"]})[0]["value"] == "0.96 (0.90-1.10, n=3)"
    echo = suite.ratio_target(
        "echo p50: resumable / plain", paths["resumable"], "wqsupervisor", 1.3, most=True
    )
    assert (echo["text"], echo["met"]) == ("echo p50: resumable / plain <= 1.3", True)
    slow = {"ratios": {"wqsupervisor": _s(2.4, 2.3, 3.1)}}
    assert not suite.ratio_target("echo", slow, "wqsupervisor", 1.3, most=True)["met"]
    assert not suite.ratio_target("bulk", {"ratios": {}}, "wqsupervisor", 0.8)["met"]


def test_command_line_names_the_way_it_was_started():
    """The recorded command is the one to type again."""
    assert (
        suite.command_line("/x/wqsupervisor/__main__.py", ["--quick"])
        == "python3 -m wqsupervisor bench --quick"
    )
    assert (
        suite.command_line("/x/wqsupervisor/harness/bench/suite.py", [])
        == "python3 -m wqsupervisor.harness.bench.suite"
    )
    assert suite.command_line("/usr/bin/wqsupervisor", ["--out", "a b"]) == "wqsupervisor bench --out 'a b'"


# -- text and plots ----------------------------------------------------------------------------------------


def _results():
    paths = {
        "direct": {"figure": _s(3000.0, 2900.0, 3100.0), "raw": [3000.0] * 3, "ratios": {}},
        "ssh -R": {
            "figure": _s(300.0, 280.0, 320.0),
            "raw": [300.0] * 3,
            "ratios": {"direct": _s(0.1, 0.09, 0.11)},
        },
        "two-hop": {
            "figure": _s(150.0, 140.0, 160.0),
            "raw": [150.0] * 3,
            "ratios": {"direct": _s(0.05, 0.04, 0.06), "ssh -R": _s(0.5, 0.45, 0.55)},
        },
    }
    lat = {
        k: {"p50_us": v, "p99_us": {**v, "figure": _s(v["figure"]["median"] / 10, 1.0, 500.0)}}
        for k, v in {
            "direct": {"figure": _s(28.0, 27.0, 30.0), "ratios": {}},
            "ssh -R": {"figure": _s(110.0, 100.0, 150.0), "ratios": {"direct": _s(3.9, 3.5, 4.2)}},
        }.items()
    }
    fault_tools = {
        tool: {
            "detected_s": {**_s(d, d, d, 1), "never": 0} if d else {**_s(None, None, None, 0), "never": 1},
            "forward_s": {**_s(f, f, f, 1), "never": 0} if f else {**_s(None, None, None, 0), "never": 1},
            "workers_s": {**_s(w, w, w, 1), "never": 0} if w else {**_s(None, None, None, 0), "never": 1},
            "lost": _s(2, 2, 2, 1),
        }
        for tool, (d, f, w) in {
            "wqsupervisor": (3.0, 4.0, 6.0),
            "autossh-M0": (45.0, 46.0, 50.0),
            "autossh-monitor": (None, None, None),
        }.items()
    }
    raw_run = {
        t: {k: v[k]["median"] for k in ("detected_s", "forward_s", "workers_s")}
        for t, v in fault_tools.items()
    }
    return {
        "command": "python3 -m wqsupervisor bench",
        "mode": "full",
        "started": "2026-01-01T00:00:00+00:00",
        "duration_s": 512.0,
        "machine": {
            "cpus": 2,
            "kernel": "6.1",
            "python": "3.11.2",
            "openssh": "OpenSSH_9.2p1",
            "cctools": "work_queue_worker version 7.4.16",
            "wqsupervisor": "0.1.0",
            "paramiko": "5.1.0",
        },
        "bulk": {"mib": 256, "reps": 3, "labels": {"direct": "direct loopback TCP"}, "paths": paths},
        "concurrency": {
            "mib": 256,
            "reps": 3,
            "streams": {
                "1": {k: paths[k] for k in ("direct", "ssh -R")},
                "64": {k: paths[k] for k in ("direct", "ssh -R")},
            },
        },
        "latency": {"count": 2000, "size": 64, "reps": 3, "paths": lat},
        "tasks": {
            **_tasks(0.8, {"empty": 15.0}),
            "targets": suite.task_targets(_tasks(0.8, {"empty": 15.0})),
        },
        "recovery": {
            "note": "subset",
            "reps": 1,
            "window_s": 150.0,
            "faults": {
                "peer-hung": {
                    "tools": fault_tools,
                    "raw": [raw_run],
                    "ratios": {
                        k: report.recovery_ratios([raw_run], k)
                        for k in ("detected_s", "forward_s", "workers_s")
                    },
                }
            },
        },
        "notes": ["full run, 512 s on this machine"],
    }


def test_markdown_shows_medians_ranges_and_ratios_to_comparators():
    """The tables carry median (min-max), each ratio with its n, the comparator's name, and 'never'."""
    text = report.markdown(_results())
    assert "| direct loopback TCP | 3000 (2900-3100) | - | - |" in text
    assert "| two-hop | 150 (140-160) | 0.05 (0.04-0.06, n=3) | 0.50 (0.45-0.55, n=3) vs ssh -R |" in text
    assert "| 64 | ssh -R | 300 (280-320) | 0.10 (0.09-0.11, n=3) |" in text
    assert "| ssh -R | 110 (100-150) | 11 (1-500) | 3.90 (3.50-4.20, n=3) | - |" in text
    assert (
        "| empty (10 tasks) | wqsupervisor | 100.0 (90.0-110.0) | 90.0 (80.0-95.0) | 0.80 (0.80-0.80, n=3) |"
        in text
    )
    assert (
        "target: supervised / direct, steady rate, empty tasks >= 0.75: 0.80 (0.80-0.80, n=3) -> met" in text
    )
    assert "| peer-hung | autossh-M0 | 45.0 | 46.0 | 50.0 | 2 | 0.09 (n=1) |" in text
    assert (
        "| peer-hung | autossh-monitor | never | never | never | 2 | - (tool never back within 150 s)" in text
    )
    assert text.endswith("- full run, 512 s on this machine\n")


def test_publish_page_names_the_command_the_machine_and_the_plots():
    """RESULTS.md starts with the exact command and the machine, and links every plot."""
    page = report.publish_page(_results(), {"Throughput by path": "results/throughput.png"})
    assert "```\npython3 -m wqsupervisor bench\n```" in page
    assert "2 CPUs, Linux 6.1, Python 3.11.2" in page and "OpenSSH_9.2p1" in page
    assert "![Throughput by path](results/throughput.png)" in page


def test_plots_are_written_for_every_section_with_figures(tmp_path):
    """throughput, latency, tasks and recovery PNGs come out of fixed figures."""
    pytest.importorskip("matplotlib")
    files = report.write_all(_results(), tmp_path)
    for name in ("throughput", "latency", "tasks", "recovery"):
        assert files[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(files["json"].read_text())["bulk"]["mib"] == 256
    assert files["markdown"].read_text() == report.markdown(_results())


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
    """Without matplotlib the error says how to install it, and JSON/Markdown still need nothing."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(WQSupervisorError) as err:
        report.plot_latency(_results(), tmp_path / "latency.png")
    assert err.value.hint == "pip install 'wqsupervisor[bench]'"
    files = report.write_all(_results(), tmp_path, plots=False)
    assert set(files) == {"json", "markdown"}


# -- one real run -------------------------------------------------------------------------------------------


def test_quick_latency_run_measures_every_path_and_cleans_up(tmp_path, capsys):
    """bench --quick --only latency: real sshd, ssh, paramiko and engine; figures for every path, no leftovers."""
    status = suite.main(["--quick", "--only", "latency", "--out", str(tmp_path), "--no-plots"])
    assert status == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["errors"] == {}
    lat = results["latency"]["paths"]
    assert set(lat) == set(PATHS)
    assert lat["direct"]["p50_us"]["figure"]["median"] < lat["two-hop"]["p50_us"]["figure"]["median"]
    assert lat["two-hop"]["p50_us"]["ratios"]["ssh -R"]["n"] == 3
    out = capsys.readouterr()
    assert "### Latency" in out.out and "latency 3/3 wqsupervisor" in out.err
