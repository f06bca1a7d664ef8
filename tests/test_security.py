"""Secure by default: passwords required, made safely, handed to workers; secrets never shown."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from wqsupervisor import Settings, supervise
from wqsupervisor.errors import ConfigError, WQSupervisorError
from wqsupervisor.events import EventBus, TunnelFailed
from wqsupervisor.logs import REDACTED, redact, redact_text, register_secret
from wqsupervisor.passwords import create_password_file, read_password

from support import debian_work_queue_path, python_env, wait_for


def test_a_master_without_a_password_is_refused_unless_the_user_opts_out(master, remote_port, head):
    """No password and no opt-out: a clear refusal that says how to fix it; opting out works."""
    settings = Settings(via="headnode", ssh_config=str(head.ssh_config), remote_port=remote_port)
    with pytest.raises(ConfigError) as info:
        supervise(master, settings)
    assert "without a password" in info.value.message
    assert "password_file" in info.value.hint and "allow_no_password" in info.value.hint
    with supervise(master, settings.replace(allow_no_password=True), log_events=False) as sup:
        assert sup.wait_until_up(30)


def test_password_files_are_made_private_and_never_overwritten(tmp_path):
    """A created file is 0600 and random; an existing one is kept; a readable one is refused."""
    path = create_password_file(tmp_path / "sub" / "pw")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_bytes()
    assert len(first.strip()) >= 32
    with pytest.raises(ConfigError, match="already exists"):
        create_password_file(path)
    assert path.read_bytes() == first
    assert read_password(path) == first
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError) as info:
        read_password(path)
    assert "chmod 600" in info.value.hint
    assert first.decode().strip() not in str(info.value)


_PASSWORD_MASTER = textwrap.dedent(
    """
    import json, sys, time
    from work_queue import Task, WorkQueue
    from wqsupervisor import Settings, supervise
    cfg, port, pw = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    q = WorkQueue(port=0, name="pw-test")
    sup = supervise(q, Settings(via="headnode", ssh_config=cfg, remote_port=port, password_file=pw),
                    log_events=False)
    assert sup.wait_until_up(30), sup.failure
    for i in range(6):
        q.submit(Task(f"echo secret-task-{i}"))
    print("ready", flush=True)
    done = []
    while len(done) < 6:
        t = q.wait(1)
        if t:
            done.append(t.output.strip())
    print(json.dumps({"done": sorted(done), "snapshot": sup.snapshot().to_dict()}), flush=True)
    sup.close()
    """
)


def test_only_workers_with_the_password_join_through_the_tunnel(head, remote_port, workers, tmp_path):
    """The supervisor creates the password and sets it on the master; a worker without it is kept out."""
    pw = tmp_path / "wq.pw"
    argv = [sys.executable, "-c", _PASSWORD_MASTER, str(head.ssh_config), str(remote_port), str(pw)]
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, text=True, env=python_env(debian_work_queue_path())
    ) as app:
        try:
            assert wait_for(app.stdout.readline, 60, "the master").startswith("ready")
            assert stat.S_IMODE(pw.stat().st_mode) == 0o600
            intruder = workers(remote_port)[0]
            allowed = workers(remote_port, password_file=str(pw))[0]
            result = json.loads(wait_for(app.stdout.readline, 120, "the tasks"))
        finally:
            app.kill()
            app.wait()
    assert result["done"] == sorted(f"secret-task-{i}" for i in range(6))
    assert intruder.poll() is None or intruder.returncode != 0
    assert allowed is not None
    secret = pw.read_text().strip()
    assert secret not in json.dumps(result["snapshot"]), "the status output shows the password"


SECRETS_TRIED = [
    "the password file's contents, as read (with its newline)",
    "the same password without the newline",
    "the password embedded in an error message",
    "an OpenSSH private key block",
    "values of fields named password, token, secret, cookie, passphrase, private_key",
]


def test_secrets_never_reach_logs_events_or_status(tmp_path):
    """Every kind of secret in SECRETS_TRIED comes out of the structlog pipeline as [REDACTED]."""
    pw_path = create_password_file(tmp_path / "pw")
    password = pw_path.read_text()
    key = subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True
    )
    key_text = (tmp_path / "k").read_text()
    register_secret(password)
    bus = EventBus()
    with capture_logs() as logs:
        bus.emit(
            TunnelFailed(at=1.0, source="h:1", error=f"master refused {password}", hint=f"key was {key_text}")
        )
        bus.emit(TunnelFailed(at=2.0, source="h:1", error=f"stripped {password.strip()} here", hint=""))
        from wqsupervisor.logs import get_logger

        get_logger().info(
            "custom",
            password="hunter2x",
            token="tok-123456",
            secret="s3cr3t!",
            cookie="c00kie-abc",
            passphrase="open sesame",
            private_key="---",
            note="fine",
        )
    dumped = json.dumps(logs)
    for value in (
        password,
        password.strip(),
        "hunter2x",
        "tok-123456",
        "s3cr3t!",
        "c00kie-abc",
        "open sesame",
        "BEGIN OPENSSH PRIVATE KEY",
    ):
        assert value not in dumped, f"{value[:12]!r}... reached the logs"
    assert REDACTED in dumped and "fine" in dumped
    assert key is not None
    assert redact({"status": f"error: {password}"})["status"] == f"error: {REDACTED}"
    assert password.strip() not in redact_text(f"x {password.strip()} y")


@pytest.mark.parametrize(("bind", "warned"), [("127.0.0.1", False), ("localhost", False), ("0.0.0.0", True)])
def test_a_remote_port_beyond_loopback_is_bound_only_with_a_warning(bind, warned):
    """The head node binds the port on its loopback unless asked; another address is warned about."""
    from wqsupervisor.backends import tunnel_for
    from wqsupervisor.master import MasterInfo
    from wqsupervisor.openssh import tunnel_argv

    async def direct(_timeout: float) -> None:
        return None

    settings = Settings(via="headnode", remote_port=10001, remote_bind=bind, allow_no_password=True)
    with capture_logs() as logs:
        tunnel_for(settings, MasterInfo(port=9123), emit=lambda e: None, rundir="/tmp", direct_probe=direct)
    exposed = [e for e in logs if e["event"] == "tunnel.remote_port_exposed"]
    assert bool(exposed) is warned, logs
    if warned:
        assert exposed[0]["bind"] == bind and exposed[0]["log_level"] == "warning"
    argv = tunnel_argv(settings.ssh_target(), master_port=9123, remote_port=10001, probe_path=None)
    assert f"{bind}:10001:localhost:9123" in argv


_CRASH = textwrap.dedent(
    """
    import sys
    from wqsupervisor.logs import get_logger, register_secret

    CONFIGURE

    register_secret("tb-s3cret-value")

    def connect(password):
        raise ConnectionError(f"login with {password} refused")

    try:
        connect("tb-s3cret-value")
    except ConnectionError:
        get_logger().exception("tunnel.crashed", source="h:1")
    """
)

_PIPELINES = {
    "library fallback": "",
    "cli console": "from wqsupervisor.logs import configure_cli_logging; configure_cli_logging()",
    "cli json": "from wqsupervisor.logs import configure_cli_logging; configure_cli_logging('json')",
    # An application's own structlog with its default renderer (rich tracebacks, locals shown).
    "application's own": "import structlog; structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))",
}


@pytest.mark.parametrize("pipeline", sorted(_PIPELINES))
def test_a_logged_traceback_is_redacted_whoever_renders_it(pipeline):
    """A secret in an exception message (and in the failing frame's locals) never reaches the rendered traceback."""
    done = subprocess.run(
        [sys.executable, "-c", _CRASH.replace("CONFIGURE", _PIPELINES[pipeline])],
        capture_output=True,
        text=True,
        env=python_env(),
        timeout=60,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "tunnel.crashed" in out and "ConnectionError" in out and "Traceback" in out, out
    assert REDACTED in out, out
    assert "tb-s3cret-value" not in out, out


def test_a_module_planted_in_the_bindings_cache_is_never_imported(tmp_path, monkeypatch):
    """A work_queue.py someone put in the cache is replaced by the link to Debian's before anything imports it."""
    from wqsupervisor.harness.sandbox import DEBIAN_DIST, debian_work_queue_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = tmp_path / "wqsupervisor" / "debian-work-queue"
    cache.mkdir(parents=True, mode=0o755)
    marker = tmp_path / "planted-ran"
    (cache / "work_queue.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (cache / "evil.py").write_text("")
    path = debian_work_queue_path()
    assert path == str(cache)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert (cache / "work_queue.py").readlink() == DEBIAN_DIST / "work_queue.py"
    assert not (cache / "evil.py").exists()
    done = subprocess.run(
        [sys.executable, "-c", "import work_queue; print(work_queue.__file__)"],
        capture_output=True,
        text=True,
        env=python_env(path),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert not marker.exists(), "the planted module ran"


def test_a_cache_directory_of_another_user_is_refused(tmp_path, monkeypatch):
    """The bindings cache owned by someone else is an error naming its owner, not something to import from."""
    from wqsupervisor.harness.sandbox import debian_work_queue_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = tmp_path / "wqsupervisor" / "debian-work-queue"
    cache.mkdir(parents=True)
    os.chown(cache, 65534, 65534)
    with pytest.raises(WQSupervisorError, match="belongs to uid 65534"):
        debian_work_queue_path()


def test_a_symlink_is_not_a_private_directory(tmp_path):
    """A symlink where a private directory should be is refused, whatever it points at."""
    from wqsupervisor import privatedir

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(WQSupervisorError, match="is not a directory"):
        privatedir.ensure(tmp_path / "link", "the cache directory", "set XDG_CACHE_HOME")


_AUTO_APP = textwrap.dedent(
    """
    import os, stat, sys
    from work_queue import WorkQueue
    from wqsupervisor import supervise

    q = WorkQueue(port=0)
    options = dict(via="headnode", ssh_config=sys.argv[1], remote_port=int(sys.argv[2]), log_events=False)
    with supervise(q, password_file=sys.argv[3], **options) as sup:
        path = sup.settings.password_file
        print("during", path, oct(stat.S_IMODE(os.stat(path).st_mode)), flush=True)
    print("after", os.path.exists(path), flush=True)
    """
)


@pytest.mark.parametrize("password_file", ["auto", "mine.pw"])
def test_an_auto_password_file_lives_as_long_as_its_supervisor(head, remote_port, tmp_path, password_file):
    """password_file='auto': a private 0600 file while supervised, gone after close(); a named one stays."""
    env = dict(python_env(debian_work_queue_path()), HOME=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-c", _AUTO_APP, str(head.ssh_config), str(remote_port), password_file],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    during, after = done.stdout.splitlines()
    _, path, mode = during.split()
    assert mode == "0o600"
    if password_file == "auto":
        assert Path(path).parent == tmp_path / ".wqsupervisor"
        assert after == "after False", "the auto password file outlived its supervisor"
    else:
        assert path == str(tmp_path / "mine.pw")
        assert after == "after True", "a password file the user named is the user's"


def test_the_next_auto_password_sweeps_the_file_of_a_killed_process(tmp_path):
    """A process that made an auto password file is SIGKILLed: the next auto file removes the orphan."""
    env = dict(python_env(), HOME=str(tmp_path))
    code = (
        "from wqsupervisor.passwords import create_password_file; print(create_password_file(), flush=True)"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    orphan = child.stdout.strip()
    assert child.returncode == 0 and os.path.exists(orphan), child.stderr
    # It exited without removing its file, as a killed process would; its pid is gone.
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert fresh.returncode == 0, fresh.stderr
    assert not os.path.exists(orphan)
    assert os.path.exists(fresh.stdout.strip())
