"""SSL masters end to end: ndcctools' WorkQueue(ssl=(key, cert)), probes over TLS, workers with --ssl.

Debian's cctools 9.9 has no SSL, so this runs only where ndcctools is importable
(``WQS_NDCCTOOLS_PYTHONPATH``, see the README); its worker is taken from the
same build.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from wqsupervisor.harness.sandbox import start_worker

from support import python_env, wait_for

pytestmark = pytest.mark.ndcctools
NDCCTOOLS = os.environ.get("WQS_NDCCTOOLS_PYTHONPATH", "")

_APP = textwrap.dedent(
    """
    import json, sys
    from ndcctools.work_queue import Task, WorkQueue
    from wqsupervisor import Settings, supervise
    cfg, port, key, cert, pw = sys.argv[1:6]
    q = WorkQueue(port=0, name="ssl-test", ssl=(key, cert))
    sup = supervise(q, Settings(via="headnode", ssh_config=cfg, remote_port=int(port), password_file=pw),
                    log_events=False)
    assert sup.wait_until_up(30), sup.failure
    for i in range(5):
        q.submit(Task(f"echo tls-{i}"))
    print("ready", flush=True)
    out = []
    while len(out) < 5:
        t = q.wait(1)
        if t:
            out.append(t.output.strip())
    print(json.dumps({"out": sorted(out), "tunnel": sup.snapshot().masters[0].tunnel.to_dict()}), flush=True)
    sup.close()
    """
)


def test_an_ssl_master_is_supervised_and_served_over_the_tunnel(head, remote_port, tmp_path):
    """The supervisor notices ssl=(key, cert), verifies the forward over TLS, and --ssl workers run tasks."""
    env = python_env(NDCCTOOLS)
    if (
        subprocess.run(
            [sys.executable, "-c", "import ndcctools.work_queue"], env=env, capture_output=True, check=False
        ).returncode
        != 0
    ):
        pytest.skip("ndcctools is not importable (set WQS_NDCCTOOLS_PYTHONPATH to a cctools build)")
    worker_bin = Path(NDCCTOOLS).parents[2] / "bin" / "work_queue_worker"
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=wq",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    pw = tmp_path / "pw"
    argv = [sys.executable, "-c", _APP, str(head.ssh_config), str(remote_port), str(key), str(cert), str(pw)]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env) as app:
        worker = None
        try:
            assert wait_for(app.stdout.readline, 60, "the master").startswith("ready")
            worker = start_worker(
                remote_port, program=str(worker_bin), password_file=str(pw), extra=["--ssl"]
            )
            result = json.loads(wait_for(app.stdout.readline, 120, "the tasks"))
        finally:
            if worker is not None:
                worker.kill()
                worker.wait()
            app.kill()
            app.wait()
    assert result["out"] == [f"tls-{i}" for i in range(5)]
    assert result["tunnel"]["verified_by"] in ("status", "connect")
