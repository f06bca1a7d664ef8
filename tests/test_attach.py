"""``python -m wqsupervisor attach``: masters the supervisor did not start (a C master, Makeflow), by port."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from wqsupervisor.wqserver import Task, WorkQueueServer

from support import assert_exactly_once, free_port, head_argv, listening, python_env, run_tasks, wait_for


def _attach(head, master_port: int, remote_port: int, *extra: str) -> list[str]:
    return head_argv("attach", head, remote_port, "--master-port", str(master_port), *extra)


def _start(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=python_env())


def test_attach_supervises_a_master_it_did_not_start_until_sigterm(head, remote_port, workers):
    """A C master in its own process: workers through the tunnel run every task; SIGTERM ends it, exit 0."""
    with WorkQueueServer(name="wqs-attached") as master:
        proc = _start(_attach(head, master.port, remote_port, "--allow-no-password"))
        try:
            wait_for(lambda: listening(remote_port), 30, "the tunnel's remote port")
            workers(remote_port, n=2)
            assert_exactly_once(run_tasks(master, 20), 20)
            # The engine counts workers from the master's status answers, given only inside wait():
            # keep it waiting on a slower task for a few samples.
            master.submit(Task("sleep 3; echo late", tag="late"))
            late = wait_for(lambda: master.wait(1), 30, "the late task")
            assert late.output.strip() == "late"
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    summary = err.strip().splitlines()[-1]
    assert summary.startswith(f"wqsupervisor: master on port {master.port}"), summary
    assert "after SIGTERM" in summary and f"tunnel headnode:{remote_port} closed" in summary, summary
    assert "workers peak 2" in summary, summary
    assert not listening(remote_port)


def test_until_master_exits_ends_once_the_master_is_gone(head, remote_port):
    """--until-master-exits: the master stops listening, and ten seconds later the run ends by itself, 0."""
    master = WorkQueueServer(name="wqs-leaving")
    master.__enter__()
    proc = _start(_attach(head, master.port, remote_port, "--allow-no-password", "--until-master-exits"))
    try:
        wait_for(lambda: listening(remote_port), 30, "the tunnel's remote port")
        master.__exit__(None, None, None)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
        master.__exit__(None, None, None)
    assert proc.returncode == 0, err
    assert not listening(remote_port)


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (("--allow-no-password",), "nothing listens on port"),
        (("--password-file", "auto"), "--password-file auto makes a new password"),
        ((), "no --password-file for the master"),
    ],
    ids=["nothing-listening", "auto-password", "no-password"],
)
def test_bad_attach_input_is_one_line_and_exit_2(head, extra, says):
    """Nothing on the port, a password it cannot have, none at all: one line that says what to do, exit 2."""
    argv = _attach(head, free_port(), free_port(), *extra)
    done = subprocess.run(argv, capture_output=True, text=True, env=python_env(), timeout=60)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "hint:" in lines[0], lines


def test_a_port_that_is_no_master_is_refused(head):
    """Something else answers on the port: attach says it is not a Work Queue master."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(100)
            conn.sendall(b"HTTP/1.0 400 no\r\n\r\n")

    threading.Thread(target=answer, daemon=True).start()
    try:
        argv = _attach(head, port, free_port(), "--allow-no-password")
        done = subprocess.run(argv, capture_output=True, text=True, env=python_env(), timeout=60)
    finally:
        server.close()
    assert done.returncode == 2, done.stderr
    assert "is not a Work Queue master" in done.stderr


def test_makeflow_runs_every_rule_on_workers_behind_the_tunnel(head, remote_port, workers, tmp_path):
    """Debian's makeflow -T wq: attach gives it a tunnel; workers that know only the remote port run each rule."""
    rules = [f"out.{i}: \n\techo rule-{i} > out.{i}\n" for i in range(4)]
    (tmp_path / "Makeflow").write_text(
        "all.txt: out.0 out.1 out.2 out.3\n\tcat out.0 out.1 out.2 out.3 > all.txt\n\n" + "\n".join(rules)
    )
    port = free_port()
    # Debian's makeflow is linked with Open MPI, whose MPI_Init wants orted (openmpi-bin)
    # unless a lone process is allowed to start by itself.
    env = {**os.environ, "OMPI_MCA_ess_singleton_isolated": "1"}
    flow = subprocess.Popen(
        ["makeflow", "-T", "wq", "-p", str(port), "Makeflow"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc = None
    try:
        wait_for(lambda: listening(port), 30, "makeflow's master port")
        proc = _start(_attach(head, port, remote_port, "--allow-no-password", "--until-master-exits"))
        wait_for(lambda: listening(remote_port), 30, "the tunnel's remote port")
        workers(remote_port, n=2)
        out, _ = flow.communicate(timeout=120)
        assert flow.returncode == 0, out
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        for p in (flow, proc):
            if p is not None:
                p.kill()
                p.wait()
    assert (tmp_path / "all.txt").read_text().split() == [f"rule-{i}" for i in range(4)]
