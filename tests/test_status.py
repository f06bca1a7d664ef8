"""python -m wqsupervisor status: a live supervisor's state, from a socket only its user can open."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from wqsupervisor import supervise
from wqsupervisor.errors import IllegalTransition
from wqsupervisor.lifecycle import TunnelState
from wqsupervisor.status import format_text, status_dir

from support import python_env


def test_status_shows_a_running_supervisor(head, master, remote_port, workers):
    """The status command finds the agent, shows tunnel, workers and tasks, and --json parses."""
    with supervise(master, head.settings(remote_port=remote_port), log_events=False) as sup:
        assert sup.wait_until_up(30)
        agent = sup._agent.pid
        res = subprocess.run(
            [sys.executable, "-m", "wqsupervisor", "status", "--json", "--pid", str(agent)],
            capture_output=True,
            text=True,
            env=python_env(),
            timeout=30,
            check=True,
        )
        snaps = json.loads(res.stdout)
        assert [s["pid"] for s in snaps] == [agent]
        tunnel = snaps[0]["masters"][0]["tunnel"]
        assert tunnel["state"] == "up" and tunnel["remote_port"] == remote_port
        text = subprocess.run(
            [sys.executable, "-m", "wqsupervisor", "status", "--pid", str(agent)],
            capture_output=True,
            text=True,
            env=python_env(),
            timeout=30,
            check=True,
        ).stdout
        assert f"tunnel headnode:{remote_port}  UP" in text and "workers connected" in text
        sockets = list(status_dir().glob(f"{agent}-*.sock"))
        assert sockets and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in sockets)
        assert stat.S_IMODE(status_dir().stat().st_mode) == 0o700
    assert not list(status_dir().glob(f"{agent}-*.sock")), "the socket outlived the supervisor"


def test_status_without_a_supervisor_says_so():
    """No supervisor for a pid: a plain sentence and exit status 1."""
    res = subprocess.run(
        [sys.executable, "-m", "wqsupervisor", "status", "--pid", str(os.getpid())],
        capture_output=True,
        text=True,
        env=python_env(),
        timeout=30,
        check=False,
    )
    assert res.returncode == 1 and "no running wqsupervisor" in res.stdout
    assert format_text([]) == "no running wqsupervisor found for this user"


def test_an_illegal_tunnel_transition_is_refused(head):
    """The lifecycle refuses a jump that makes no sense, with a named exception."""
    from wqsupervisor.backends import tunnel_for
    from wqsupervisor.master import MasterInfo

    async def direct(_timeout: float) -> None:
        return None

    tunnel = tunnel_for(
        head.settings(remote_port=10001),
        MasterInfo(port=9123),
        emit=lambda e: None,
        rundir="/tmp",
        direct_probe=direct,
    )
    with pytest.raises(IllegalTransition) as info:
        tunnel._transition(TunnelState.UP)
    assert (info.value.current, info.value.wanted) == ("new", "up")
    assert "NEW" in repr(tunnel)
