"""backend=paramiko with Slurm workers, on a machine view with no ssh client: a real Slurm, a real sshd.

The head node is this machine's loopback sshd and Slurm runs here too
(:mod:`loopback_slurm`): ``sbatch``, ``squeue`` and ``scancel`` run on the
head through the supervisor's paramiko connection, found on the head's own
PATH (its sshd sessions get the machine's). The worker jobs' hop to the head
is the compute node's ssh (here, the machine's), which is the cluster's
client, not the supervisor's.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from loopback_slurm import LoopbackSlurm
from support import assert_exactly_once, free_port, head_argv, listening, python_env, run_tasks, wait_for


@pytest.fixture
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackSlurm]:
    """A single-node Slurm on loopback; every job cancelled and the daemons stopped afterwards."""
    why = LoopbackSlurm.missing()
    if why:
        pytest.skip(why)
    cluster = LoopbackSlurm(tmp_path_factory.mktemp("slurm")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _no_ssh_path(tmp_path: Path) -> str:
    """A PATH directory holding python3 and sh, and no ssh (as test_paramiko_routes builds it)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, real in (("python3", sys.executable), ("sh", "/bin/sh")):
        (bin_dir / name).symlink_to(real)
    assert not (bin_dir / "ssh").exists()
    return str(bin_dir)


def _events(lines: list[str], name: str) -> list[dict[str, object]]:
    found = [json.loads(line) for line in list(lines) if line.startswith("{")]
    return [e for e in found if e.get("event") == name]


def test_slurm_workers_over_paramiko_need_no_ssh_client(head, master, slurm, tmp_path):
    """No ssh on the supervisor's PATH: sbatch over paramiko, Slurm's workers come through the tunnel, tasks run once."""
    env = python_env()
    env["PATH"] = _no_ssh_path(tmp_path)
    remote_port = free_port()
    argv = head_argv("attach", head, remote_port, "--master-port", str(master.port), "--allow-no-password")
    argv += [
        "--backend=paramiko",
        "--connect-timeout=5",
        "--log-format=json",
        "--workers=slurm",
        f"--batch-env=SLURM_CONF={slurm.conf}",
        "--node-via=headnode",
        f"--node-ssh-args=-F {head.ssh_config}",
        "--min-workers=0",
        "--max-workers=2",
        "--scale-cooldown=0.5",
        "--idle-time=5",
    ]
    lines: list[str] = []
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or ()), daemon=True)
    reader.start()
    try:
        wait_for(lambda: _events(lines, "tunnel.up"), 30, "the tunnel to be up")
        # The master answers (and so shows a backlog) only inside wait(): the jobs come with the tasks.
        try:
            results = run_tasks(master, 10, timeout=90)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the supervisor said:\n{''.join(lines)[-3000:]}") from None
        assert_exactly_once(results, 10)
        submitted = _events(lines, "jobs.submitted")
        assert submitted and all(e["system"] == "slurm" for e in submitted), submitted
        ids = [i for e in submitted for i in e["ids"]]  # type: ignore[attr-defined]
        # Slurm's own numbers, from sbatch over paramiko: the workers are Slurm jobs.
        assert ids and all(str(i).isdigit() for i in ids), ids
        proc.send_signal(signal.SIGTERM)
        proc.wait(90)
    finally:
        proc.kill()
        proc.wait()
        reader.join(10)
        proc.stderr.close()
    err = "".join(lines)
    assert proc.returncode == 0, err
    assert not _events(lines, "jobs.submit_failed"), err
    # Closing cancelled every job it submitted, and Slurm agrees.
    assert not slurm.squeue(), slurm.squeue()
    assert set(map(str, ids)) <= set(slurm.finished()), (ids, slurm.finished())
    assert not listening(remote_port)
