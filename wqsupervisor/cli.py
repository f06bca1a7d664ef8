"""The command line: ``python -m wqsupervisor {run,demo} ...``.

The only place that configures logging, and the only place that turns
errors into a message and an exit status instead of a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
import typing
from collections.abc import Sequence
from typing import Any

from ._version import __version__
from .config import SPREAD, resolve, setting_fields
from .errors import ConfigError, WQSupervisorError
from .logs import configure_cli_logging

# The settings the brief names, with the flag spellings users already know.
_FLAG_NAMES = {"ssh_options": "--ssh-option", "batch_directives": "--batch-directive"}


class _Parser(argparse.ArgumentParser):
    """argparse, with its complaints in one line (usage is one ``--help`` away)."""

    def error(self, message: str) -> typing.NoReturn:
        """Print what is wrong in one line and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {_one_line(message)}; see '{self.prog} --help'\n")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _add_no_view(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-view", action="store_true", help="log lines instead of the live view, even on a terminal"
    )


def _add_settings(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "tunnel settings (flags win over --config, which wins over WQSUPERVISOR_*)"
    )
    group.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file with the same settings (remote_port = 10001, ...)",
    )
    for f in setting_fields():
        flag = _flag(f.name)
        kind = str(f.type)
        help_text = f.metadata["help"]
        if f.default not in (None, (), False):
            help_text += f" (default: {f.default})"
        # Values stay text here: config turns them into their types and checks them,
        # with the same rules and messages as for the TOML file and the environment.
        if kind.startswith("tuple[tuple[str, str]") or kind == "tuple[str, ...]" or f.name in SPREAD:
            group.add_argument(
                flag,
                dest=f.name,
                action="append",
                default=None,
                metavar=f.metadata["metavar"],
                help=help_text,
            )
        elif kind.startswith("bool"):
            group.add_argument(
                flag, dest=f.name, action="store_const", const=True, default=None, help=help_text
            )
            if f.default is True:
                group.add_argument(
                    "--no-" + flag[2:],
                    dest=f.name,
                    action="store_const",
                    const=False,
                    default=None,
                    help=f"turn {flag} off",
                )
        else:
            group.add_argument(flag, dest=f.name, default=None, metavar=f.metadata["metavar"], help=help_text)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m wqsupervisor``."""
    parser = _Parser(
        prog="python -m wqsupervisor",
        description="Keep a Work Queue master reachable through a supervised SSH reverse tunnel.",
    )
    parser.add_argument("--version", action="version", version=f"wqsupervisor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        allow_abbrev=False,
        help="run an unmodified master script with every WorkQueue it creates supervised",
        description="Run a master script as if with 'python app.py', attaching a supervised tunnel to "
        "every WorkQueue it creates. Ctrl-C or SIGTERM ends the script, then the tunnels.",
    )
    _add_settings(run)
    run.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds the script gets to exit after Ctrl-C/SIGTERM before it is killed (default: 10)",
    )
    _add_no_view(run)
    run.add_argument("script", help="the master script to run")
    run.add_argument("args", nargs="*", metavar="ARG", help="arguments passed to the script, as they are")

    attach = sub.add_parser(
        "attach",
        allow_abbrev=False,
        help="supervise a master that is already listening on a port (Makeflow, Parsl, C masters...)",
        description=_attach_help(),
    )
    _add_settings(attach)
    attach.add_argument(
        "--master-port", type=int, required=True, metavar="PORT", help="the port the master listens on"
    )
    attach.add_argument(
        "--until-master-exits",
        action="store_true",
        help="end once the master has stopped listening for 10 s (tunnel, workers and jobs go; exit 0)",
    )
    _add_no_view(attach)

    sub.add_parser(
        "bench",
        add_help=False,
        help="benchmarks: throughput, latency, task rates and recovery by path (bench --help for options)",
    )

    status = sub.add_parser(
        "status",
        help="show what every running supervisor of this user is doing",
        description="Ask each running supervisor of this user (drop-in or run) for its state: tunnels, "
        "workers, tasks, jobs, last events.",
    )
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.add_argument("--pid", type=int, help="only the supervisor of this process")

    demo = sub.add_parser(
        "demo",
        help="the end-to-end demo: loopback head node, real master and workers, a tunnel cut mid-run",
        description="Start a throwaway loopback 'head node' sshd, a real Work Queue master and local "
        "workers that reach it only through the supervised tunnel; cut the tunnel mid-run and report "
        "the recovery.",
    )
    demo.add_argument("--tasks", type=int, default=200, help="number of tasks to run (default: 200)")
    demo.add_argument("--workers", type=int, default=2, help="number of local workers (default: 2)")
    demo.add_argument(
        "--cuts", type=int, default=1, help="how many times to cut the tunnel mid-run (default: 1)"
    )
    demo.add_argument("--log-format", default="console", choices=("console", "json"), help="log line format")
    return parser


def _attach_help() -> str:
    from .attachapp import HELP

    return HELP


def _flag(name: str) -> str:
    return _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def _script_position(tokens: list[str]) -> int | None:
    """Index of the script in ``run ...`` tokens: the first word that is not an option or its value."""
    takes_value = {"--config", "--grace"} | {
        _flag(f.name) for f in setting_fields() if not str(f.type).startswith("bool")
    }
    i = 1
    while i < len(tokens):
        word = tokens[i]
        if word == "--":
            return i + 1 if i + 1 < len(tokens) else None
        if not word.startswith("-") or word == "-":
            return i
        i += 2 if word in takes_value else 1
    return None


def _settings_flags(ns: argparse.Namespace) -> dict[str, Any]:
    return {f.name: getattr(ns, f.name) for f in setting_fields()}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = build_parser()
    tokens = list(sys.argv[1:] if argv is None else argv)
    if tokens[:1] == ["bench"]:
        from .harness.bench.suite import main as bench_main

        return bench_main(tokens[1:], command=" ".join(["python -m wqsupervisor", *tokens]))
    script_args: list[str] = []
    if tokens[:1] == ["run"]:
        # Everything from the script on belongs to the script, even words
        # that look like our own options.
        cut = _script_position(tokens)
        if cut is not None:
            tokens, script_args = tokens[: cut + 1], tokens[cut + 1 :]
    ns = parser.parse_args(tokens)
    if ns.command == "run":
        ns.args = script_args
    try:
        if ns.command == "run":
            from .runapp import run_script

            settings = resolve(_settings_flags(ns), ns.config)
            _check_grace(ns.grace)
            configure_cli_logging(settings.log_format)
            return run_script(settings, ns.script, ns.args, grace=ns.grace, view=not ns.no_view)
        if ns.command == "attach":
            from .attachapp import attach_master

            settings = resolve(_settings_flags(ns), ns.config)
            configure_cli_logging(settings.log_format)
            return attach_master(
                settings, ns.master_port, until_master_exits=ns.until_master_exits, view=not ns.no_view
            )
        if ns.command == "status":
            from .status import main as status_main

            if ns.pid is not None and ns.pid < 1:
                raise ConfigError(
                    f"--pid {ns.pid} is not a process id", "give the pid of a running supervisor"
                )
            return status_main(as_json=ns.json, pid=ns.pid)
        if ns.command == "demo":
            from .harness.demo import run_demo

            configure_cli_logging(ns.log_format)
            return run_demo(tasks=ns.tasks, workers=ns.workers, cuts=ns.cuts)
    except WQSupervisorError as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {ns.command!r}")
    return 2


def error_line(exc: WQSupervisorError) -> str:
    """An error and its hint for a person, on one line of stderr."""
    line = f"wqsupervisor: error: {_one_line(exc.message)}"
    if exc.hint:
        line += f"; hint: {_one_line(exc.hint)}"
    return line


def _check_grace(grace: float) -> None:
    if not math.isfinite(grace) or not 0 <= grace <= 3600:
        raise ConfigError(f"--grace {grace} is not a number of seconds", "use a number from 0 to 3600")


if __name__ == "__main__":
    sys.exit(main())
