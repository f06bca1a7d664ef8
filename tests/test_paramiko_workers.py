"""backend=paramiko with every kind of workers, on a machine view with no ssh client: a real sshd, a real Slurm.

The head node is this machine's loopback sshd. Its commands run through the
supervisor's paramiko connection, found on the head's own PATH (its sshd
sessions get the machine's); the supervisor's own PATH holds python3 and sh
only. Slurm runs here too (:mod:`loopback_slurm`): its worker jobs' hop to the
head is the compute node's ssh (here, the machine's), which is the cluster's
client, not the supervisor's. Workers on the head node (``--workers ssh``)
and the factory run on exec channels that last as long as they do.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from loopback_slurm import LoopbackSlurm
from support import (
    assert_exactly_once,
    free_port,
    head_argv,
    listening,
    processes_matching,
    python_env,
    run_tasks,
    wait_for,
)


@pytest.fixture
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackSlurm]:
    """A single-node Slurm on loopback; every job cancelled and the daemons stopped afterwards."""
    why = LoopbackSlurm.missing()
    if why:
        pytest.fail(f"{why}: .ci/run installs Slurm and runs as root")
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


def _supervise(
    head, master, tmp_path: Path, remote_port: int, *options: str, backend: str = "paramiko"
) -> tuple[subprocess.Popen[str], list[str]]:
    """``attach`` with ``options``, its JSON log lines gathered as they come; with paramiko, no ssh on its PATH."""
    env = python_env()
    if backend == "paramiko":
        env["PATH"] = _no_ssh_path(tmp_path)
    argv = head_argv("attach", head, remote_port, "--master-port", str(master.port), "--allow-no-password")
    argv += [f"--backend={backend}", "--connect-timeout=5", "--log-format=json", *options]
    lines: list[str] = []
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or ()), daemon=True)
    reader.start()
    proc.reader = reader  # type: ignore[attr-defined]
    return proc, lines


def _finish(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()
    proc.reader.join(10)  # type: ignore[attr-defined]
    if proc.stderr is not None:
        proc.stderr.close()


def _tasks(master, lines: list[str], n: int) -> None:
    """Run ``n`` tasks (the master shows its backlog only inside wait()); the log tail on failure."""
    try:
        results = run_tasks(master, n, timeout=90)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the supervisor said:\n{''.join(lines)[-3000:]}") from None
    assert_exactly_once(results, n)


@pytest.mark.parametrize("backend", ["paramiko", "openssh"])
def test_head_node_workers_do_the_tasks_and_end_with_the_supervisor(head, master, tmp_path, backend):
    """Head-node workers (exec channels, or ssh sessions) do the tasks and end on the head with a SIGKILLed supervisor."""
    remote_port = free_port()
    workdir = Path.home() / ".wqsupervisor" / str(remote_port)
    # With OpenSSH the head relay holds the port: a SIGKILLed supervisor leaves it for its linger.
    options = [
        "--workers=ssh",
        "--max-workers=2",
        "--scale-cooldown=0.5",
        "--idle-time=30",
        "--relay-linger=5",
    ]
    proc, lines = _supervise(head, master, tmp_path, remote_port, *options, backend=backend)
    try:
        wait_for(lambda: _events(lines, "tunnel.up"), 30, "the tunnel to be up")
        _tasks(master, lines, 10)
        submitted = _events(lines, "jobs.submitted")
        assert submitted and all(e["system"] == "ssh" for e in submitted), submitted
        # Workers idle for 30 s: they are still there, each under its launcher in the workdir.
        assert processes_matching(f"{workdir}/ssh-job.sh"), "no head-node job runs"
        proc.kill()
        proc.wait()
        wait_for(lambda: not processes_matching(str(workdir)), 30, "the head-node jobs to end")
        wait_for(
            lambda: not processes_matching(f"127.0.0.1 {remote_port}"),
            30,
            "the head-node workers (and the head relay, after its linger) to end",
        )
    finally:
        _finish(proc)
        shutil.rmtree(workdir, ignore_errors=True)  # a killed supervisor cannot remove it


def test_the_factory_over_paramiko_feeds_the_master_and_stops_with_the_supervisor(head, master, tmp_path):
    """No ssh client: work_queue_factory on an exec channel feeds the tasks; a clean stop ends it and its directory."""
    if shutil.which("work_queue_factory") is None:
        pytest.fail("work_queue_factory is not installed: apt-get install coop-computing-tools")
    remote_port = free_port()
    workdir = Path.home() / ".wqsupervisor" / str(remote_port)
    options = ["--workers=factory", "--max-workers=2", "--idle-time=30"]
    proc, lines = _supervise(head, master, tmp_path, remote_port, *options)
    try:
        wait_for(lambda: _events(lines, "tunnel.up"), 30, "the tunnel to be up")
        _tasks(master, lines, 10)
        assert processes_matching(f"{workdir}/factory-job.sh"), "the factory's wrapper does not run"
        proc.send_signal(signal.SIGTERM)
        proc.wait(90)
        left = workdir.exists()
    finally:
        _finish(proc)
        shutil.rmtree(workdir, ignore_errors=True)
    err = "".join(lines)
    assert proc.returncode == 0, err
    assert not left, "the factory's directory was left on the head"
    assert [e["system"] for e in _events(lines, "jobs.submitted")] == ["factory"], err
    assert not _events(lines, "jobs.submit_failed"), err
    wait_for(lambda: not processes_matching(str(workdir)), 30, "the factory and its workers to end")


def test_slurm_workers_over_paramiko_need_no_ssh_client(head, master, slurm, tmp_path):
    """No ssh on the supervisor's PATH: sbatch over paramiko, Slurm's workers come through the tunnel, tasks run once."""
    remote_port = free_port()
    options = [
        "--workers=slurm",
        f"--batch-env=SLURM_CONF={slurm.conf}",
        "--node-via=headnode",
        f"--node-ssh-args=-F {head.ssh_config}",  # the compute node's hop: its own ssh, to the loopback head
        "--max-workers=2",
        "--scale-cooldown=0.5",
        "--idle-time=5",
    ]
    proc, lines = _supervise(head, master, tmp_path, remote_port, *options)
    try:
        wait_for(lambda: _events(lines, "tunnel.up"), 30, "the tunnel to be up")
        _tasks(master, lines, 10)
        proc.send_signal(signal.SIGTERM)
        proc.wait(90)
    finally:
        _finish(proc)
    err = "".join(lines)
    assert proc.returncode == 0, err
    assert not _events(lines, "jobs.submit_failed"), err
    submitted = _events(lines, "jobs.submitted")
    assert submitted and all(e["system"] == "slurm" for e in submitted), err
    # Slurm's own numbers, from sbatch over paramiko, and every one of them ended (cancelled on close).
    ids = {str(i) for e in submitted for i in e["ids"]}  # type: ignore[attr-defined]
    assert ids and all(i.isdigit() for i in ids), ids
    assert not slurm.squeue(), slurm.squeue()
    assert ids <= set(slurm.finished()), (ids, slurm.finished())
    assert not listening(remote_port)
