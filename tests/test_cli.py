"""``python -m wqsupervisor``: help, ``run`` end to end, signals, bad input."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from wqsupervisor.process import pid_alive

from support import (
    REPO,
    debian_work_queue_path,
    free_port,
    head_argv,
    listening,
    processes_matching,
    python_env,
    wait_for,
)

SQUARES = str(REPO / "examples" / "squares.py")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "wqsupervisor", *args]


def test_help_explains_every_required_option_in_one_line():
    """--help lists the commands and run --help every option the brief names."""
    top = subprocess.run(cli("--help"), capture_output=True, text=True, env=python_env(), check=True)
    assert "run" in top.stdout and "demo" in top.stdout
    run = subprocess.run(cli("run", "--help"), capture_output=True, text=True, env=python_env(), check=True)
    for option in ("--via", "--ssh-port", "--identity", "--remote-port", "--ssh-option", "--config"):
        assert option in run.stdout, option


def _run_args(head, remote_port: int, *extra: str) -> list[str]:
    return head_argv("run", head, remote_port, "--allow-no-password", *extra)


def test_run_supervises_an_unmodified_script_and_passes_its_exit_status(head, remote_port, workers):
    """run executes examples/squares.py unchanged; its workers use only the remote port; status passes."""
    argv = _run_args(head, remote_port, SQUARES, "--tasks", "25", "--exit-status", "7")
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=python_env()
    ) as proc:
        try:
            wait_for(lambda: listening(remote_port), 30, "the tunnel's remote port")
            workers(remote_port, n=2)
            out, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
    assert proc.returncode == 7, err
    lines = [line for line in out.splitlines() if line.startswith("task ")]
    assert sorted(lines) == sorted(f"task {i}: {i * i}" for i in range(25))
    assert "25 tasks done" in out
    summary = err.strip().splitlines()[-1]
    assert summary.startswith("wqsupervisor: squares.py exited with status 7"), summary
    assert "tasks done 25/25 at the master's last status" in summary, summary


def test_run_sets_argv_as_if_run_directly(head, remote_port, tmp_path):
    """The script sees its own path as argv[0], its arguments after it, and __name__ == '__main__'."""
    script = tmp_path / "show.py"
    script.write_text("import sys\nprint(repr(sys.argv), __name__, sys.path[0])\n")
    res = subprocess.run(
        _run_args(head, remote_port, str(script), "a", "--b", "c"),
        capture_output=True,
        text=True,
        env=python_env(),
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{[str(script), 'a', '--b', 'c']!r} __main__ {tmp_path}"


def test_sigterm_ends_the_script_then_the_tunnel_with_a_summary(head, remote_port, workers):
    """SIGTERM to run: the script ends, the tunnel closes, no ssh is left, one summary line."""
    argv = _run_args(head, remote_port, SQUARES, "--tasks", "100000")
    with subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=python_env()
    ) as proc:
        try:
            wait_for(lambda: listening(remote_port), 30, "the tunnel's remote port")
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert not listening(remote_port)
    assert not processes_matching(f"{remote_port}:localhost:")
    summary = err.strip().splitlines()[-1]
    assert "after SIGTERM" in summary and "tunnel headnode" in summary, summary


def test_a_sigkilled_run_takes_its_script_with_it(head, remote_port, tmp_path):
    """SIGKILL of run ends the script it started at once, as if run had exec'd it: no orphan keeps running."""
    pidfile = tmp_path / "app.pid"
    app = tmp_path / "app.py"
    app.write_text(
        "import os, sys, time\n"
        "with open(sys.argv[1] + '.tmp', 'w') as f:\n"
        "    f.write(str(os.getpid()))\n"
        "os.rename(sys.argv[1] + '.tmp', sys.argv[1])\n"
        "time.sleep(300)\n"
    )
    with subprocess.Popen(
        _run_args(head, remote_port, str(app), str(pidfile)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=python_env(),
    ) as proc:
        try:
            wait_for(pidfile.exists, 30, "the script to start")
            app_pid = int(pidfile.read_text())
            assert pid_alive(app_pid)
            proc.kill()
            proc.wait(10)
            wait_for(lambda: not pid_alive(app_pid), 10, "the script to die with run")
        finally:
            proc.kill()


def test_ctrl_c_reaches_the_script_and_ends_the_run(head, remote_port):
    """Ctrl-C (SIGINT to the whole process group): the script's KeyboardInterrupt, then a clean exit."""
    argv = _run_args(head, remote_port, SQUARES, "--tasks", "100000")
    with subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=python_env(),
        start_new_session=True,
    ) as proc:
        try:
            wait_for(lambda: listening(remote_port), 30, "the tunnel's remote port")
            os.killpg(proc.pid, signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "KeyboardInterrupt" in err
    assert not processes_matching(f"{remote_port}:localhost:")
    assert "after SIGINT" in err.strip().splitlines()[-1]


def test_missing_head_node_is_a_clear_error():
    """run without --via: exit 2 and a message that says what to pass."""
    res = subprocess.run(
        cli("run", "--remote-port", "10001", SQUARES),
        capture_output=True,
        text=True,
        env={k: v for k, v in python_env().items() if not k.startswith("WQSUPERVISOR_")},
        check=False,
    )
    assert res.returncode == 2
    assert "no head node given" in res.stderr and "--via" in res.stderr
    assert "Traceback" not in res.stderr


def test_missing_script_is_a_clear_error(head):
    """run with a script that does not exist: exit 2, no traceback."""
    res = subprocess.run(
        _run_args(head, 10001, "/nonexistent/app.py"),
        capture_output=True,
        text=True,
        env=python_env(),
        check=False,
    )
    assert res.returncode == 2
    assert "no such script" in res.stderr and "Traceback" not in res.stderr


def test_bad_setting_value_is_a_clear_error(tmp_path):
    """A config file with a wrong type: exit 2, the file and the setting named."""
    cfg = tmp_path / "bad.toml"
    cfg.write_text('via = "headnode"\nremote_port = "lots"\n')
    res = subprocess.run(
        cli("run", "--config", str(cfg), SQUARES),
        capture_output=True,
        text=True,
        env=python_env(),
        check=False,
    )
    assert res.returncode == 2
    assert "remote_port" in res.stderr and str(cfg) in res.stderr


def test_a_tunnel_that_never_comes_up_ends_the_run(head, remote_port, tmp_path):
    """A permanent failure before the tunnel was ever up ends the script: exit 2 and the hint."""
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    argv = _run_args(head, remote_port, "--ssh-option", f"UserKnownHostsFile={empty}", SQUARES)
    started = time.monotonic()
    res = subprocess.run(argv, capture_output=True, text=True, env=python_env(), timeout=120, check=False)
    assert res.returncode == 2, res.stderr
    assert "known_hosts" in res.stderr and "hint:" in res.stderr
    assert time.monotonic() - started < 60
    assert not processes_matching(f"{remote_port}:localhost:")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace")  # CI runs as root
def test_unknown_host_is_a_clear_error(tmp_path):
    """An unresolvable head node, in a namespace with no network at all: exit 2, what to check."""
    ns = f"wqs-dns-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        argv = [
            "ip",
            "netns",
            "exec",
            ns,
            *cli(
                "run", "--via", "nosuchhost.invalid", "--remote-port", "10001", "--allow-no-password", SQUARES
            ),
        ]
        res = subprocess.run(argv, capture_output=True, text=True, env=python_env(), timeout=120, check=False)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    assert res.returncode == 2, res.stderr
    assert "cannot resolve nosuchhost.invalid" in res.stderr
    assert "--via" in res.stderr


def test_run_ends_without_asyncio_noise_while_a_status_reader_is_connected(tmp_path):
    """A status connection still open when run ends is hung up on: the summary is the last line, no asyncio noise."""
    xdg, go = tmp_path / "xdg", tmp_path / "go"
    xdg.mkdir()
    script = tmp_path / "wait_for_go.py"
    script.write_text(f"import os, time\nwhile not os.path.exists({str(go)!r}):\n    time.sleep(0.05)\n")
    env = {k: v for k, v in python_env().items() if not k.startswith("WQSUPERVISOR_")}
    env["XDG_RUNTIME_DIR"] = str(xdg)
    argv = cli("run", "--via", "headnode", "--remote-port", "10001", "--allow-no-password", str(script))
    with subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env) as proc:
        try:
            sock_path = wait_for(
                lambda: next((xdg / "wqsupervisor").glob("*.sock"), None), 30, "the status socket"
            )
            with socket.socket(socket.AF_UNIX) as reader:
                reader.connect(str(sock_path))
                go.write_text("")
                _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 0, err
    assert err.strip().splitlines()[-1].startswith("wqsupervisor: wait_for_go.py exited with status 0"), err
    for noise in ("Task was destroyed", "Event loop is closed", "Exception ignored", "Traceback"):
        assert noise not in err, err


def test_a_metrics_port_in_use_fails_run_and_leaves_nothing(head, remote_port, tmp_path):
    """run with a metrics port that is taken: one error line, exit 2, no run directory or status socket left."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    with (
        socket.create_server(("127.0.0.1", 0)) as taken,
        subprocess.Popen(
            _run_args(head, remote_port, "--metrics-port", str(taken.getsockname()[1]), SQUARES),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(python_env(), XDG_RUNTIME_DIR=str(runtime)),
        ) as proc,
    ):
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "metrics" in err, err
    assert not list((runtime / "wqsupervisor").glob("*.sock")), "the status socket outlived run"
    assert not list(Path(tempfile.gettempdir()).glob(f"wqs-{proc.pid}-*")), "the run directory outlived run"


_SPAWNED_MASTER = """
import multiprocessing, sys

def master(n):
    from wqsupervisor.wqserver import Task, WorkQueueServer
    with WorkQueueServer(name="wqs-spawned") as q:
        for i in range(n):
            q.submit(Task(f"echo child-{i}", tag=str(i)))
        done = []
        while len(done) < n:
            r = q.wait(1)
            if r is not None:
                done.append(r.output.strip())
        print(" ".join(sorted(done)), flush=True)

if __name__ == "__main__":
    # As Parsl's executors do: the master lives in a process started with spawn.
    child = multiprocessing.get_context("spawn").Process(target=master, args=(int(sys.argv[1]),))
    child.start()
    child.join()
    sys.exit(child.exitcode)
"""


def test_run_follows_a_master_created_in_a_spawned_child(head, remote_port, workers, tmp_path):
    """A master made in a multiprocessing-spawn child is supervised like one in the script itself."""
    script = tmp_path / "spawner.py"
    script.write_text(_SPAWNED_MASTER)
    with subprocess.Popen(
        _run_args(head, remote_port, str(script), "12"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=python_env(),
    ) as proc:
        try:
            wait_for(lambda: listening(remote_port), 60, "the tunnel of the child's master")
            workers(remote_port, n=2)
            out, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
    assert proc.returncode == 0, err
    assert out.split() == sorted(f"child-{i}" for i in range(12))
    summary = err.strip().splitlines()[-1]
    assert f"tunnel headnode:{remote_port}" in summary and "tasks done 12" in summary, summary
    # The children's sitecustomize, with no user's sitecustomize after it, leaves site content.
    assert "Error in sitecustomize" not in err, err


_C_MASTER = """
import subprocess, sys, time
# A master in another language, started by the script: run cannot wrap it.
proc = subprocess.Popen(["work_queue_server", "-p", sys.argv[1], "-s", sys.argv[2]])
try:
    time.sleep(float(sys.argv[3]))
finally:
    proc.terminate()
    proc.wait()
"""


def test_run_names_a_master_port_in_a_child_it_cannot_wrap(head, remote_port, tmp_path):
    """A C master started by the script: run says which process listens on which port, and that attach serves it."""
    script = tmp_path / "cmaster.py"
    script.write_text(_C_MASTER)
    port, rpc = free_port(), free_port()
    res = subprocess.run(
        _run_args(head, remote_port, str(script), str(port), str(rpc), "16"),
        capture_output=True,
        text=True,
        env=python_env(),
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    said = [line for line in res.stderr.splitlines() if "processes it started listen" in line]
    assert len(said) == 1, res.stderr
    assert "work_queue_serv (pid " in said[0] and f"on port {port}" in said[0], said[0]
    assert "python -m wqsupervisor attach --master-port" in said[0], said[0]
    assert "no master was created" in res.stderr.strip().splitlines()[-1]


_IMPORTS_WORK_QUEUE = """\
import work_queue
q = work_queue.WorkQueue(0)
for i in range(6):
    q.submit(work_queue.Task(f"echo wq-{i}"))
out = []
while not q.empty():
    t = q.wait(5)
    if t:
        out.append(t.output.strip())
print(",".join(sorted(out)))
"""


def test_run_supervises_a_script_that_imports_the_binding_itself(head, remote_port, tmp_path):
    """A script whose first import is the Work Queue binding (Debian's work_queue): the import hook
    patches it once (two hooks used to call each other without end), local workers run every task."""
    script = tmp_path / "imports.py"
    script.write_text(_IMPORTS_WORK_QUEUE)
    argv = _run_args(head, remote_port, "--workers", "local", "--max-workers", "2", str(script))
    done = subprocess.run(
        argv, capture_output=True, text=True, env=python_env(debian_work_queue_path()), timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == ",".join(sorted(f"wq-{i}" for i in range(6)))
    assert "RecursionError" not in done.stderr
    assert f"tunnel headnode:{remote_port} closed" in done.stderr, done.stderr


def test_the_demo_cuts_the_tunnel_twice_and_no_worker_notices():
    """The README's first command: both cuts (ssh killed, then the head's session) heal with every task
    back once and right, and under resumption (the default) no worker loses its connection."""
    argv = cli("demo", "--tasks", "60", "--cuts", "2", "--log-format", "json")
    done = subprocess.run(argv, capture_output=True, text=True, env=python_env(), timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "demo: 60/60 tasks returned, 0 duplicated, 0 with wrong output, 0 missing" in lines, done.stdout
    cuts = [line for line in lines if line.startswith("demo: cut after")]
    assert len(cuts) == 2 and "ssh client" in cuts[0] and "sshd session" in cuts[1], cuts
    assert all("none of the 2 workers lost its connection" in line for line in cuts), cuts
    # Each worker joined once: the handle's last snapshot as it closes (work_queue_server's
    # status, which has no totals) is not taken for a new master that two workers joined.
    events = [json.loads(line) for line in (done.stdout + done.stderr).splitlines() if line.startswith("{")]
    joined = [e["count"] for e in events if e.get("event") == "workers.joined"]
    assert sum(joined) == 2, joined
