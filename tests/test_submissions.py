"""The drop-in handle tells the engine of submissions, so that workers are asked for before the next sample.

A real master (Debian's ``work_queue`` binding) in a script, supervised with a
minute between samples: after the script submits and calls ``wait()``, the
engine has already seen the backlog, because the handle saw the binding's
task table grow and had the engine ask the master at once (the master answers
inside ``wait()``). Without the handle's word the next sample is a minute away.
"""

from __future__ import annotations

import json
import subprocess
import sys

from support import debian_work_queue_path, python_env

_APP = r"""
import json, sys, time
import work_queue
from wqsupervisor import supervise

ssh_config, remote_port = sys.argv[1], int(sys.argv[2])
q = work_queue.WorkQueue(port=0, name="submissions")
sup = supervise(q, via="headnode", ssh_config=ssh_config, remote_port=remote_port,
                allow_no_password=True, stats_interval=60, log_events=False)
assert sup.wait_until_up(60), "the tunnel did not come up"
deadline = time.monotonic() + 30
while sup.snapshot().masters[0].stats_age is None and time.monotonic() < deadline:
    q.wait(1)  # the first sample, answered inside wait()
before = sup.snapshot().masters[0].tasks.waiting
for i in range(3):
    q.submit(work_queue.Task(f"echo {i}"))
time.sleep(0.5)   # the script's own work between submitting and waiting
q.wait(1)         # the master answers the engine's request in here
time.sleep(0.5)
after = sup.snapshot().masters[0].tasks.waiting
sup.close()
print(json.dumps({"before": before, "after": after}), flush=True)
"""


def test_the_engine_sees_a_new_backlog_before_its_next_sample(head, remote_port):
    """stats_interval 60 s: the 3 tasks submitted are in the engine's view within a second of wait()."""
    argv = [sys.executable, "-c", _APP, str(head.ssh_config), str(remote_port)]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=120, env=python_env(debian_work_queue_path())
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"before": 0, "after": 3}
