"""Parsl's WorkQueueExecutor and TaskVineExecutor behind the tunnel, by `attach` and by `run` (examples/parsl_attach.py).

Parsl starts its master in a process of its own: ``attach`` serves it by port, ``run`` follows the script's spawned child.
Both executors need ndcctools, which CI does not have: these run where
``WQS_NDCCTOOLS_PYTHONPATH`` points at a cctools build (see the README).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from wqsupervisor.children import port_listening

from support import REPO, TunnelCuts, free_port, head_argv, ndcctools_env, need_ndcctools, wait_for

pytestmark = pytest.mark.ndcctools
APPS = 30


@pytest.mark.parametrize("how", ["attach", "run"])
@pytest.mark.parametrize(
    ("kind", "module"),
    [("workqueue", "ndcctools.work_queue"), ("taskvine", "ndcctools.taskvine")],
)
def test_a_parsl_executor_gets_every_result_through_an_ssh_kill(
    head, remote_port, tmp_path, kind, module, how
):
    """The example's Parsl script (its master in Parsl's own spawned process, a password, no workers of its
    own), served by attach (by port) or by run (which follows the script's children); two local workers
    that know only the head's remote port; ssh SIGKILLed after 5 results: every app's result arrives once
    and is right, and Parsl, then the supervisor, exit 0."""
    need_ndcctools(module)
    pw = tmp_path / "pw"
    pw.write_text("parsl-secret\n")
    pw.chmod(0o600)
    port = free_port()
    example = [str(REPO / "examples" / "parsl_attach.py"), kind, str(port), str(pw), str(APPS)]
    workers = ["--password-file", str(pw), "--workers", "local", "--min-workers", "2"]
    # (cwd: Parsl writes runinfo/, a TaskVine manager vine-run-info/, where they run.)
    env, cwd = ndcctools_env(), tmp_path
    app = sup = None
    try:
        if how == "attach":
            app = subprocess.Popen(
                [sys.executable, *example], stdout=subprocess.PIPE, text=True, env=env, cwd=cwd
            )
            wait_for(lambda: port_listening(port), 90, "Parsl's master port")
            argv = head_argv(
                "attach", head, remote_port, "--master-port", str(port), *workers, "--until-master-exits"
            )
            sup = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
            out = app
        else:
            argv = head_argv("run", head, remote_port, *workers, *example)
            sup = out = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd
            )
        results: dict[int, list[int]] = {}
        cuts = TunnelCuts(sup.pid, lambda: len(results), first=5)
        cuts.start()
        assert out.stdout is not None
        while (line := wait_for(out.stdout.readline, 180, "Parsl's results").split() or [""])[0] != "all":
            if line[0] == "done":  # (cctools prints its warnings on stdout too)
                results.setdefault(int(line[1]), []).append(int(line[2]))
        if app is not None:
            assert app.wait(60) == 0
        cuts.join(60)
        _, err = sup.communicate(timeout=60)
    finally:
        for proc in (app, sup):
            if proc is not None:
                proc.kill()
                proc.communicate()
    assert cuts.cuts == ["ssh"]
    assert results == {i: [i * i] for i in range(APPS)}
    assert sup.returncode == 0, err
    assert "Error in sitecustomize" not in err, err
    assert not port_listening(remote_port)
