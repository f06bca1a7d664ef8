"""``python -m wqsupervisor attach``: masters the supervisor did not start (a C master, Makeflow), by port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from wqsupervisor.children import port_listening
from wqsupervisor.wqserver import Task, WorkQueueServer

from support import (
    REPO,
    TunnelCuts,
    assert_exactly_once,
    free_port,
    head_argv,
    listening,
    python_env,
    run_tasks,
    wait_for,
)


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


def _makeflow(tmp_path: Path, port: int, rules: int, *extra: str) -> subprocess.Popen[str]:
    """Debian's makeflow -T wq on ``rules`` rules of 0.4 s, each writing rule-I to out.I, and one joining them."""
    outs = " ".join(f"out.{i}" for i in range(rules))
    text = f"all.txt: {outs}\n\tcat {outs} > all.txt\n\n"
    text += "\n".join(f"out.{i}:\n\tsleep 0.4; echo rule-{i} > out.{i}\n" for i in range(rules))
    (tmp_path / "Makeflow").write_text(text)
    # Debian's makeflow is linked with Open MPI, whose MPI_Init wants orted (openmpi-bin)
    # unless a lone process is allowed to start by itself.
    env = {**os.environ, "OMPI_MCA_ess_singleton_isolated": "1"}
    argv = ["makeflow", "-T", "wq", "-p", str(port), *extra, "Makeflow"]
    flow = subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        # (Read from /proc: a connection would be one more peer for makeflow to authenticate.)
        wait_for(lambda: port_listening(port), 30, "makeflow's master port")
    except BaseException:
        flow.kill()
        flow.communicate()
        raise
    return flow


def test_makeflow_runs_every_rule_through_an_ssh_kill_and_a_session_kill(
    head, remote_port, workers, tmp_path
):
    """Debian's makeflow -T wq with a password, 36 rules: attach gives it a tunnel; workers that know only
    the remote port run the rules; the ssh client and then the head's session are killed while rules run;
    makeflow exits 0, every output is right, attach ends with the master, and nothing is left. Nothing of
    ours ever reached makeflow without the password (its debug log has no "wrong password")."""
    rules, port, pw = 36, free_port(), tmp_path / "pw"
    pw.write_text("makeflow-secret\n")
    pw.chmod(0o600)
    flow = _makeflow(tmp_path, port, rules, "--password", str(pw), "-d", "wq", "-o", str(tmp_path / "debug"))
    proc = None
    try:
        proc = _start(_attach(head, port, remote_port, "--password-file", str(pw), "--until-master-exits"))
        wait_for(lambda: port_listening(remote_port), 30, "the tunnel's remote port")
        workers(remote_port, n=2, password_file=str(pw))
        cuts = TunnelCuts(proc.pid, lambda: len(list(tmp_path.glob("out.*"))), first=6, second=14)
        cuts.start()
        out, _ = flow.communicate(timeout=240)
        cuts.join(60)
        assert flow.returncode == 0, out
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        for p in (flow, proc):
            if p is not None:
                p.kill()
                p.communicate()
    assert cuts.cuts == ["ssh", "session"]
    assert (tmp_path / "all.txt").read_text().split() == [f"rule-{i}" for i in range(rules)]
    debug = (tmp_path / "debug").read_text()
    assert "authenticating" in debug and "wrong password" not in debug
    assert not listening(remote_port)


def test_a_c_master_keeps_every_task_through_an_ssh_kill_and_a_session_kill(head, remote_port, workers):
    """Debian's work_queue_server attached by port: the same two cuts while 40 tasks of 0.3 s run; every
    task comes back exactly once with its output."""
    n = 40
    with WorkQueueServer(name="wqs-cut") as master:
        proc = _start(_attach(head, master.port, remote_port, "--allow-no-password"))
        try:
            wait_for(lambda: listening(remote_port), 30, "the tunnel's remote port")
            workers(remote_port, n=2)
            for i in range(n):
                master.submit(Task(f"sleep 0.3; echo out-{i}", tag=str(i)))
            results: dict[str, list[str]] = {}
            cuts = TunnelCuts(proc.pid, lambda: len(results), first=6, second=16)
            cuts.start()
            deadline = time.monotonic() + 240
            while not master.empty():
                assert time.monotonic() < deadline, f"{len(results)} of {n} tasks back"
                r = master.wait(1)
                if r is not None:
                    assert r.ok, r
                    results.setdefault(r.tag, []).append(r.output.strip())
            cuts.join(60)
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
        finally:
            proc.kill()
            proc.communicate()
    assert cuts.cuts == ["ssh", "session"]
    assert results == {str(i): [f"out-{i}"] for i in range(n)}
    assert proc.returncode == 0


def test_a_master_with_another_password_is_refused(head, tmp_path):
    """makeflow with a password, attach given another: one line naming the refusal, exit 2, no tunnel."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for path, secret in ((ours, "makeflow-secret\n"), (theirs, "another-secret\n")):
        path.write_text(secret)
        path.chmod(0o600)
    port, remote = free_port(), free_port()
    (tmp_path / "flow").mkdir()
    flow = _makeflow(tmp_path / "flow", port, 1, "--password", str(ours))
    try:
        argv = _attach(head, port, remote, "--password-file", str(theirs))
        done = subprocess.run(argv, capture_output=True, text=True, env=python_env(), timeout=60)
    finally:
        flow.kill()
        flow.communicate()
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused the password" in lines[0] and "hint:" in lines[0], lines
    assert not listening(remote)


def test_the_makeflow_example_runs_a_workflow_to_the_end(head, remote_port, tmp_path):
    """examples/makeflow_attach.sh as a user runs it (the head node and workers from its variables, the
    loopback head's ssh config from the environment): every rule's output, makeflow and attach exit 0,
    the password file it made is private, and nothing is left."""
    rules = 12
    outs = " ".join(f"out.{i}" for i in range(rules))
    text = f"all.txt: {outs}\n\tcat {outs} > all.txt\n\n"
    text += "\n".join(f"out.{i}:\n\techo rule-{i} > out.{i}\n" for i in range(rules))
    (tmp_path / "workflow.mf").write_text(text)
    env = {
        **python_env(),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "VIA": "headnode",
        "REMOTE_PORT": str(remote_port),
        "WORKERS": "ssh",
        "WQSUPERVISOR_SSH_CONFIG": str(head.ssh_config),
        "WQSUPERVISOR_MIN_WORKERS": "2",
    }
    example = REPO / "examples" / "makeflow_attach.sh"
    done = subprocess.run(
        ["sh", str(example)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "all.txt").read_text().split() == [f"rule-{i}" for i in range(rules)]
    assert f"tunnel headnode:{remote_port} closed" in done.stderr, done.stderr
    assert (tmp_path / "wq.pw").stat().st_mode & 0o077 == 0
    assert not listening(remote_port)
