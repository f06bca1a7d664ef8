"""Passwords in the firewall lab: only workers with the password join; other users cannot read it."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from wqsupervisor.harness.lab import Lab
from wqsupervisor.harness.labapps import CampusApp, start_node_workers

from support import root_lab

pytestmark = pytest.mark.lab
REMOTE_PORT = 10001


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A fresh lab."""
    with root_lab() as built:
        yield built


def test_workers_need_the_password_and_other_users_cannot_read_it(lab):
    """Workers the supervisor starts get the password (0600 on the cluster side) and run the tasks;
    a worker without it never joins; another user of the head node cannot read the file."""
    settings = {
        "password_file": "auto",
        "workers": "ssh",
        "max_workers": 2,
        "max_per_cycle": 2,
        "idle_time": 600,
        "scale_cooldown": 1.0,
    }
    app = CampusApp(lab, REMOTE_PORT, settings)
    try:
        app.wait_event("tunnel.up", 60)
        intruders = start_node_workers(lab, REMOTE_PORT, n=2)
        app.submit(60, "sleep 0.2; echo out-{i}")
        app.wait_done(60, 180)
        assert sorted(app.results, key=int) == [str(i) for i in range(60)]
        peak = max(s.get("workers_connected", 0) for _, s in app.stats)
        assert peak <= 2, f"{peak} workers connected: one without the password got in"
        assert all(p.poll() is None for p in intruders), "the intruders are still knocking, not in"
        jobs = app.snapshot().masters[0].jobs
        assert jobs is not None
        workdir = jobs.workdir
        password = f"{workdir}/password"
        mode = os.stat(password).st_mode & 0o777
        assert mode == 0o600, oct(mode)
        lab.add_other_user()
        peek = lab.as_other_user(["cat", password])
        assert peek.returncode != 0 and "Permission denied" in peek.stderr
        listing = lab.as_other_user(["ls", workdir])
        assert listing.returncode != 0
    finally:
        app.close()
    time.sleep(0.5)
    assert not lab.pids("campus")
