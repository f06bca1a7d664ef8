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
    """--workers ssh: workers on the head node (on exec channels with paramiko and no ssh client, in ssh
    sessions with openssh) do the tasks; the supervisor SIGKILLed, the head ends every launcher and worker."""
    remote_port = free_port()
    workdir = Path.home() / ".wqsupervisor" / str(remote_port)
    options = ["--workers=ssh", "--max-workers=2", "--scale-cooldown=0.5", "--idle-time=30"]
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
            lambda: not processes_matching(f"127.0.0.1 {remote_port}"), 30, "the head-node workers to end"
        )
    finally:
        _finish(proc)
        shutil.rmtree(workdir, ignore_errors=True)  # a killed supervisor cannot remove it


def test_the_factory_over_paramiko_feeds_the_master_and_stops_with_the_supervisor(head, master, tmp_path):
    """--workers factory, no ssh client: work_queue_factory runs on an exec channel, its workers do the
    tasks, and a clean stop ends the factory and removes its directory on the head."""
    if shutil.which("work_queue_factory") is None:
        pytest.skip("work_queue_factory is not installed")
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
