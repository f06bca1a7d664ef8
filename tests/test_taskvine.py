"""TaskVine managers end to end: ``supervise(m)``, ``run app.py`` and ``attach``, with real vine_workers.

TaskVine is not in Debian bookworm, so this runs only where ndcctools is
importable (``WQS_NDCCTOOLS_PYTHONPATH``, see the README); ``vine_worker`` is
taken from the same build.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from wqsupervisor.harness.sandbox import start_worker
from wqsupervisor.process import terminate

from support import free_port, head_argv, listening, ndcctools_bin, ndcctools_env, need_ndcctools, wait_for

pytestmark = pytest.mark.ndcctools
TASKS = 30

# The manager: tasks of 0.3 s; prints "ready SSH_PID", a "done OUTPUT" line per task, then a summary.
_MANAGER = textwrap.dedent(
    """
    import json, sys
    import ndcctools.taskvine as vine
    from wqsupervisor import Settings, supervise
    cfg, port, pw, n, ssl = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5:]
    m = vine.Manager(port=0, name="vine-test", ssl=tuple(ssl) or None)
    sup = supervise(m, Settings(via="headnode", ssh_config=cfg, remote_port=port, password_file=pw),
                    log_events=False)
    assert sup.wait_until_up(30), sup.failure
    for i in range(n):
        m.submit(vine.Task(f"sleep 0.3; echo vine-{i}"))
    print("ready", sup.snapshot().masters[0].tunnel.ssh_pid, flush=True)
    done = 0
    while done < n:
        t = m.wait(5)
        if t:
            done += 1
            print("done", t.output.strip(), flush=True)
    snap = sup.snapshot().masters[0]
    print(json.dumps({"master": snap.master.to_dict(), "tunnel": snap.tunnel.to_dict()}), flush=True)
    sup.close()
    """
)


@pytest.fixture(autouse=True)
def _taskvine() -> None:
    need_ndcctools("ndcctools.taskvine")


def _key_pair(tmp_path: Path) -> list[str]:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    argv = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=vine"]
    subprocess.run([*argv, "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return [str(key), str(cert)]


@pytest.mark.parametrize("ssl", [False, True], ids=["plain", "ssl"])
def test_a_supervised_manager_keeps_its_vine_workers_through_an_ssh_kill(head, remote_port, tmp_path, ssl):
    """supervise(m) on a TaskVine Manager with a password (and SSL): the forward is proved by the manager's
    own status answer; vine_workers given only the head's remote port run every task; ssh SIGKILLed while
    the manager sits in m.wait(5) comes back, and every task's output arrives exactly once."""
    pw = tmp_path / "pw"
    pw.write_text("vine-secret\n")
    pw.chmod(0o600)
    extra = _key_pair(tmp_path) if ssl else []
    argv = [
        sys.executable,
        "-c",
        _MANAGER,
        str(head.ssh_config),
        str(remote_port),
        str(pw),
        str(TASKS),
        *extra,
    ]
    # (cwd: a TaskVine manager writes its vine-run-info directory where it runs.)
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=ndcctools_env(), cwd=tmp_path) as app:
        workers: list[subprocess.Popen[bytes]] = []
        try:
            assert app.stdout is not None
            ready = wait_for(app.stdout.readline, 60, "the manager").split()
            assert ready[0] == "ready", ready
            workers = [
                start_worker(
                    remote_port,
                    program=str(ndcctools_bin() / "vine_worker"),
                    password_file=str(pw),
                    extra=["--ssl"] if ssl else [],
                )
                for _ in range(2)
            ]
            outputs: list[str] = []
            summary: dict[str, Any] = {}
            while not summary:
                line = wait_for(app.stdout.readline, 120, "the tasks")
                if line.startswith("done "):
                    outputs.append(line.split(maxsplit=1)[1].strip())
                    if len(outputs) == 5:
                        os.kill(int(ready[1]), signal.SIGKILL)
                else:
                    summary = json.loads(line)
        finally:
            for w in workers:
                terminate(w, grace=2)
            app.kill()
            app.wait()
    assert sorted(outputs) == sorted(f"vine-{i}" for i in range(TASKS))
    assert summary["master"]["kind"] == "taskvine", summary
    assert summary["tunnel"]["verified_by"] == "status", summary
    assert summary["tunnel"]["restarts"] >= 1, summary


def _script(setup: str, n: int, tag: str) -> str:
    """A manager script: ``setup`` makes ``m``; n echo tasks; prints "ready", then every output, sorted."""
    return (
        textwrap.dedent(
            """
        import sys
        import ndcctools.taskvine as vine
        @SETUP@
        for i in range(@N@):
            m.submit(vine.Task(f"echo @TAG@-{i}"))
        print("ready", flush=True)
        out = []
        while not m.empty():
            t = m.wait(5)
            if t:
                out.append(t.output.strip())
        print(",".join(sorted(out)), flush=True)
        """
        )
        .replace("@SETUP@", setup)
        .replace("@N@", str(n))
        .replace("@TAG@", tag)
    )


def _outputs(n: int, tag: str) -> str:
    return ",".join(sorted(f"{tag}-{i}" for i in range(n)))


def test_run_supervises_the_manager_a_script_creates_and_starts_vine_workers(head, remote_port, tmp_path):
    """python -m wqsupervisor run app.py, the script unchanged: its Manager gets a tunnel, and the local
    workers the supervisor starts are vine_workers (the manager's kind's), which run every task."""
    script = tmp_path / "app.py"
    script.write_text(_script('m = vine.Manager(port=0, name="vine-run")', 12, "run"))
    argv = head_argv("run", head, remote_port, "--allow-no-password", "--workers", "local", str(script))
    done = subprocess.run(
        argv, capture_output=True, text=True, env=ndcctools_env(), timeout=180, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == _outputs(12, "run"), done.stdout
    assert f"tunnel headnode:{remote_port}" in done.stderr, done.stderr


_ATTACHED = _script(
    'm = vine.Manager(port=int(sys.argv[1]), name="vine-attached")\nm.set_password_file(sys.argv[2])',
    20,
    "attached",
)


def test_attach_tells_a_taskvine_manager_by_its_status_and_serves_it(head, remote_port, tmp_path):
    """A manager in its own process, attached by port with its password: status says TaskVine manager,
    vine_workers through the head's port run every task, SIGTERM ends attach with 0."""
    pw = tmp_path / "pw"
    pw.write_text("attached-secret\n")
    pw.chmod(0o600)
    port = free_port()
    manager = subprocess.Popen(
        [sys.executable, "-c", _ATTACHED, str(port), str(pw)],
        stdout=subprocess.PIPE,
        text=True,
        env=ndcctools_env(),
        cwd=tmp_path,
    )
    attach = None
    workers: list[subprocess.Popen[bytes]] = []
    try:
        assert manager.stdout is not None
        assert wait_for(manager.stdout.readline, 60, "the manager").startswith("ready")
        argv = head_argv("attach", head, remote_port, "--master-port", str(port), "--password-file", str(pw))
        attach = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=ndcctools_env())
        wait_for(lambda: listening(remote_port), 30, "the tunnel's remote port")
        status = subprocess.run(
            [sys.executable, "-m", "wqsupervisor", "status", "--pid", str(attach.pid)],
            capture_output=True,
            text=True,
            env=ndcctools_env(),
            timeout=30,
        )
        assert f"TaskVine manager port {port} (vine-attached)" in status.stdout, status.stdout + status.stderr
        workers = [
            start_worker(remote_port, program=str(ndcctools_bin() / "vine_worker"), password_file=str(pw))
            for _ in range(2)
        ]
        line = wait_for(manager.stdout.readline, 120, "the tasks")
        assert line.strip() == _outputs(20, "attached")
        attach.send_signal(signal.SIGTERM)
        _, err = attach.communicate(timeout=60)
        assert attach.returncode == 0, err
    finally:
        for w in workers:
            terminate(w, grace=2)
        if attach is not None:
            attach.kill()
            attach.communicate()
        manager.kill()
        manager.communicate()
    assert not listening(remote_port)


_PEER_MANAGER = textwrap.dedent(
    """
    import json, sys, time
    import ndcctools.taskvine as vine
    from wqsupervisor import Settings, supervise
    cfg, port = sys.argv[1], int(sys.argv[2])
    m = vine.Manager(port=0, name="vine-peers")
    sup = supervise(m, Settings(via="headnode", ssh_config=cfg, remote_port=port, allow_no_password=True),
                    log_events=False)
    assert sup.wait_until_up(60), sup.failure
    print("ready", flush=True)
    temp = m.declare_temp()  # lives on workers only: the manager never holds it
    made = vine.Task("echo made-on-the-node > out")
    made.add_output(temp, "out")
    made.add_feature("node")
    used = vine.Task("cat in")
    used.add_input(temp, "in")
    used.add_feature("head")
    m.submit(made)
    m.submit(used)
    out, deadline = {}, time.monotonic() + 90
    while not m.empty() and time.monotonic() < deadline:
        t = m.wait(1)
        if t:
            out["made" if t is made else "used"] = [t.successful(), (t.output or "").strip()]
    print(json.dumps(out), flush=True)
    sup.close()
    """
)


def test_vine_workers_fetch_each_others_files_across_the_tunnel():
    """A supervised manager on campus; one vine_worker on a compute node (node launcher, hop) and one on
    the head node, both through the tunnel, so the manager sees both come from 127.0.0.1. A temporary
    file made on the node's worker (it exists on workers only) is needed by a task on the head's worker:
    it is fetched peer to peer, at the node's own address that the launcher gave its worker."""
    from wqsupervisor.harness.lab import CAMPUS, HEAD, NODE_IP
    from wqsupervisor.harness.labapps import node_logs, start_node_workers

    from support import root_lab

    remote = 9123
    with root_lab() as lab:
        argv = [sys.executable, "-c", _PEER_MANAGER, str(lab.campus_ssh_config), str(remote)]
        manager = lab.popen(
            CAMPUS, argv, stdout=subprocess.PIPE, text=True, env=ndcctools_env(), cwd=lab.root
        )
        assert manager.stdout is not None
        assert wait_for(manager.stdout.readline, 90, "the manager").startswith("ready")
        vine_worker = str(ndcctools_bin() / "vine_worker")
        start_node_workers(lab, remote, worker=vine_worker, peer_transfers=True, extra=["--feature", "node"])
        head_worker = [vine_worker, "--feature", "head", "--cores", "1", "--memory", "512", "--disk", "1024"]
        lab.popen(
            HEAD,
            [*head_worker, "127.0.0.1", str(remote)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        line = wait_for(manager.stdout.readline, 150, "the two tasks")
        result = json.loads(line)
        assert result == {"made": [True, ""], "used": [True, "made-on-the-node"]}, (result, node_logs(lab))
        assert f"peer transfers at {NODE_IP}:" in node_logs(lab, chars=100_000)


def test_vine_factory_on_the_head_node_feeds_a_manager_through_the_tunnel(head, remote_port, tmp_path):
    """run --workers factory for a TaskVine manager: vine_factory on the (loopback) head node, given by
    --factory-program as a head node's login PATH may not have it, starts vine_workers (through the node
    launcher) against the head's remote port, and they run every task."""
    script = tmp_path / "app.py"
    script.write_text(_script('m = vine.Manager(port=0, name="vine-factory")', 16, "factory"))
    argv = head_argv(
        "run", head, remote_port, "--allow-no-password", "--workers", "factory", "--max-workers", "2",
        "--factory-program", str(ndcctools_bin() / "vine_factory"),
        "--worker-program", str(ndcctools_bin() / "vine_worker"), "--no-view", str(script),
    )  # fmt: skip
    done = subprocess.run(
        argv, capture_output=True, text=True, env=ndcctools_env(), timeout=180, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == _outputs(16, "factory"), done.stdout
    assert "system=factory" in done.stderr and "workers.joined" in done.stderr, done.stderr
