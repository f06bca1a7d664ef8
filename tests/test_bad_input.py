"""Every bad input: one line on stderr, exit 2, no traceback, nothing started, nothing left.

Each setting gets its bad values through each of the three sources (a flag,
the ``--config`` TOML file, a ``WQSUPERVISOR_*`` variable) on a real
``python -m wqsupervisor run``, whose script would leave a marker file if it
ever ran. Nothing here needs a head node: a bad value must stop the command
before anything would try to reach one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from wqsupervisor import config, rules
from wqsupervisor.cli import _flag

from support import processes_matching, python_env

# (setting, bad value as it is typed after the flag or in the variable)
BAD: list[tuple[str, str]] = [
    ("via", "-oProxyCommand=id"),
    ("also_via", "-oProxyCommand=id"),
    ("via", "two words"),
    ("via", "head\nnode"),
    ("remote_port", "70000"),
    ("remote_port", "-1"),
    ("remote_port", "many"),
    ("ssh_port", "0"),
    ("identity", "key\nfile"),
    ("ssh_options", "Foo"),
    ("ssh_options", "Bad Key=x"),
    ("ssh_options", "ProxyCommand=a\x01b"),
    ("ssh_config", "conf\x1b[2J"),
    ("ssh_program", "-oProxyCommand=id"),
    ("remote_bind", "-x"),
    ("remote_bind", "0.0.0.0 1"),
    ("backend", "telnet"),
    ("resume", "perhaps"),
    ("resume_hop", "sometimes"),
    ("relay_linger", "0"),
    ("relay_linger", "nan"),
    ("relay_python", "-c"),
    ("relay_python", "python3\nrm"),
    ("node_python", "-c"),
    ("node_python", "python3\nrm"),
    ("own_socket", "maybe"),
    ("password_file", "pw\nfile"),
    ("allow_no_password", "maybe"),
    ("ssl", "sometimes"),
    ("metrics_port", "70000"),
    ("metrics_port", "0"),
    ("metrics_host", "-h"),
    ("keepalive_interval", "inf"),
    ("keepalive_interval", "0"),
    ("stall_after", "nan"),
    ("stall_after", "-1"),
    ("master_timeout", "-1"),
    ("master_timeout", "99999999"),
    ("probe_interval", "nan"),
    ("stats_interval", "0"),
    ("connect_timeout", "nan"),
    ("connect_timeout", "1e400"),
    ("start_attempts", "-1"),
    ("stable_after", "-1"),
    ("backoff_initial", "nan"),
    ("backoff_cap", "inf"),
    ("log_format", "xml"),
    ("workers", "pbsx"),
    ("min_workers", "-1"),
    ("max_workers", "0"),
    ("tasks_per_worker", "0"),
    ("max_pending", "0"),
    ("max_per_cycle", "-3"),
    ("scale_cooldown", "nan"),
    ("idle_time", "inf"),
    ("factory_type", "-T"),
    ("worker_cores", "-2"),
    ("worker_cores", "1.5"),
    ("worker_memory", "0"),
    ("worker_disk", "-5"),
    ("worker_program", "-x"),
    ("factory_program", "-x"),
    ("node_via", "-oProxyCommand=id"),
    ("also_node_via", "-oProxyCommand=id"),
    ("node_ssh_args", "-o 'unbalanced"),
    ("partition", "long\nhostname"),
    ("partition", "-x"),
    ("account", "chem\n#SBATCH --uid=0"),
    ("walltime", "1:00:00\nrequirements = true"),
    ("batch_directives", "#SBATCH --qos=low\rhostname"),
    ("batch_env", "=x"),
    ("batch_env", "--chdir=/etc"),
]
FIELDS = {f.name: f for f in config.setting_fields()}
# How a message names a setting when it does not use the setting's own name.
NAMED = {
    "ssh_options": "ssh option",
    "backend": "backend",
    "log_format": "log format",
    "workers": "worker system",
}
SOURCES = ("flag", "toml", "environment")


def test_every_setting_has_a_rule_and_a_bad_value_here():
    """Each declared setting has a validation rule, and the table below feeds it a bad value."""
    assert set(rules.RULES) == set(FIELDS)
    assert {name for name, _ in BAD} == set(FIELDS)


def _toml_literal(name: str, text: str) -> str:
    kind = str(FIELDS[name].type)
    if kind.startswith("tuple"):
        return f"[{json.dumps(text)}]"
    if kind.startswith(("int", "float")):
        try:
            tomllib.loads(f"x = {text}")
        except tomllib.TOMLDecodeError:
            return json.dumps(text)
        return text
    return json.dumps(text)


@pytest.fixture
def scratch(tmp_path: Path) -> dict[str, Path]:
    """An empty HOME, runtime directory, TMPDIR and working directory, and a script that leaves a marker."""
    places = {name: tmp_path / name for name in ("home", "xdg", "tmp", "cwd")}
    for path in places.values():
        path.mkdir()
    places["marker"] = tmp_path / "marker"
    places["app"] = tmp_path / "wqs_bad_input_app.py"
    places["app"].write_text(f"open({str(places['marker'])!r}, 'w').close()\n")
    return places


def _env(scratch: dict[str, Path], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in python_env().items() if not k.startswith("WQSUPERVISOR_")}
    env.update(HOME=str(scratch["home"]), XDG_RUNTIME_DIR=str(scratch["xdg"]), TMPDIR=str(scratch["tmp"]))
    env.update(extra)
    return env


def _run(scratch: dict[str, Path], args: list[str], **extra_env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wqsupervisor", *args],
        capture_output=True,
        text=True,
        env=_env(scratch, **extra_env),
        cwd=scratch["cwd"],
        timeout=60,
        check=False,
    )


def _assert_refused(res: subprocess.CompletedProcess[str], scratch: dict[str, Path], *words: str) -> str:
    lines = res.stderr.splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert lines[0].startswith(("wqsupervisor: error: ", "python -m wqsupervisor")), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    assert not scratch["marker"].exists(), "the script ran"
    assert not processes_matching(str(scratch["app"]))
    for name in ("home", "xdg", "tmp", "cwd"):
        assert not any(scratch[name].iterdir()), f"{name} is not empty: {list(scratch[name].iterdir())}"
    return lines[0]


def _run_args(scratch: dict[str, Path], *extra: str) -> list[str]:
    return [
        "run",
        "--via",
        "headnode",
        "--remote-port",
        "10001",
        "--allow-no-password",
        *extra,
        str(scratch["app"]),
    ]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize(("name", "value"), BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_a_bad_setting_is_one_line_and_exit_2_from_every_source(scratch, tmp_path, source, name, value):
    """A bad value from a flag, the TOML file or the environment: one line naming it, exit 2, nothing run."""
    env: dict[str, str] = {}
    extra: list[str] = []
    if source == "flag":
        extra = [f"{_flag(name)}={value}"]  # one word, so that a value starting with '-' stays a value
    elif source == "toml":
        cfg = tmp_path / "bad.toml"
        cfg.write_text(f"{name} = {_toml_literal(name, value)}\n")
        extra = ["--config", str(cfg)]
    else:
        env = {config.ENV_PREFIX + name.upper(): value}
    res = _run(scratch, _run_args(scratch, *extra), **env)
    line = _assert_refused(res, scratch)
    if source == "flag" and str(FIELDS[name].type).startswith("bool"):
        assert f"argument {_flag(name)}" in line, line  # argparse's own words for a value given to a switch
    else:
        assert NAMED.get(name, name) in line, line


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--stall-after", "nan"], ["stall_after", "finite"]),
        (["--grace", "nan"], ["--grace"]),
        (["--grace", "-1"], ["--grace"]),
        (["--no-such-flag"], ["--no-such-flag"]),
        (["--password-file", "/proc/1/nonexistent/pw"], ["cannot create password file"]),
    ],
)
def test_other_bad_run_arguments_are_one_line(scratch, args, words):
    """--grace out of range, an unknown flag, a password file that cannot be made: one line, exit 2."""
    _assert_refused(_run(scratch, _run_args(scratch, *args)), scratch, *words)


def test_a_password_file_that_is_not_a_regular_file_is_refused_without_a_chmod_hint(scratch):
    """/dev/null or a directory as the password file: "not a regular file", and no chmod advice."""
    for path in ("/dev/null", str(scratch["app"].parent)):
        line = _assert_refused(
            _run(scratch, _run_args(scratch, "--password-file", path)), scratch, "not a regular file"
        )
        assert "chmod" not in line


def test_a_password_file_others_can_read_gets_a_chmod_hint(scratch, tmp_path):
    """A regular password file that others can read: the hint is the chmod that fixes it, quoted."""
    pw = tmp_path / "my pw"
    pw.write_text("secret\n")
    pw.chmod(0o644)
    _assert_refused(
        _run(scratch, _run_args(scratch, "--password-file", str(pw))), scratch, f"chmod 600 '{pw}'"
    )


def _config_cases(tmp_path: Path) -> list[tuple[str, str]]:
    not_utf8 = tmp_path / "latin1.toml"
    not_utf8.write_bytes(b'via = "h\xf6st"\n')
    broken = tmp_path / "broken.toml"
    broken.write_text("via = \n")
    not_table = tmp_path / "not-table.toml"
    not_table.write_text("wqsupervisor = 5\n")
    cases = [
        (str(tmp_path), "is a directory"),
        ("/proc/self/mem", "cannot read config file"),  # unreadable for every user, root included
        (str(not_utf8), "not UTF-8"),
        (str(broken), "not valid TOML"),
        (str(not_table), "not a table"),
        (str(tmp_path / "missing.toml"), "does not exist"),
    ]
    if os.geteuid() != 0:
        locked = tmp_path / "locked.toml"
        locked.write_text('via = "h"\n')
        locked.chmod(0)
        cases.append((str(locked), "Permission denied"))
    return cases


def test_a_config_file_that_cannot_be_read_is_one_line(scratch, tmp_path):
    """--config naming a directory, an unreadable, non-UTF-8, invalid or missing file: one line, exit 2."""
    for path, words in _config_cases(tmp_path):
        _assert_refused(_run(scratch, _run_args(scratch, "--config", path)), scratch, words)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--workers", "0"], "workers must be 1 or more"),
        (["--tasks", "-5"], "tasks must be 1 or more"),
        (["--cuts", "500"], "cuts must be at most 199"),
        (["--tasks", "x"], "invalid int value"),
    ],
)
def test_demo_refuses_counts_it_cannot_run(scratch, args, words):
    """demo with no workers, no tasks, more cuts than tasks, or a non-number: one line, exit 2, no sshd."""
    _assert_refused(_run(scratch, ["demo", *args]), scratch, words)
    # The demo's head node would live in TMPDIR (checked empty above), its sshd with it.
    assert not processes_matching(str(scratch["tmp"]))


def test_status_with_a_home_that_is_not_a_directory_is_one_line(scratch, tmp_path):
    """status with HOME pointing at a file and no runtime directory: one line, exit 2."""
    home = tmp_path / "home-file"
    home.write_text("")
    res = _run(scratch, ["status"], HOME=str(home), XDG_RUNTIME_DIR="")
    _assert_refused(res, scratch, "home directory")


def test_status_with_an_uncreatable_runtime_directory_is_one_line(scratch, tmp_path):
    """status whose runtime directory cannot be created (a file is in the way): one line, exit 2."""
    (scratch["xdg"] / "wqsupervisor").write_text("")
    res = _run(scratch, ["status"])
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr
    assert "not a directory" in res.stderr or "cannot create" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_status_refuses_a_runtime_directory_of_another_user(scratch):
    """A runtime directory owned by someone else is refused, not used or re-moded."""
    other = scratch["xdg"] / "wqsupervisor"
    other.mkdir()
    other.chmod(0o777)
    os.chown(other, 65534, 65534)
    res = _run(scratch, ["status"])
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr
    assert "belongs to uid 65534" in res.stderr and "Traceback" not in res.stderr
    assert other.stat().st_mode & 0o777 == 0o777


def test_status_refuses_a_pid_that_is_no_process_id(scratch):
    """status --pid 0: one line, exit 2."""
    _assert_refused(_run(scratch, ["status", "--pid", "0"]), scratch, "--pid")
