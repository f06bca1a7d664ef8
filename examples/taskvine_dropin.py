"""The drop-in wrapper around a TaskVine manager: the same two lines as for Work Queue.

The workers the supervisor starts (``workers="slurm"`` here) are ``vine_worker``s,
the manager's own kind; they reach it through the head node's port 10001.
"""

import ndcctools.taskvine as vine

from wqsupervisor import supervise

m = vine.Manager(port=9123)
with supervise(m, via="alice@login.cluster.edu", remote_port=10001, password_file="vine.pw", workers="slurm"):
    for i in range(100):
        m.submit(vine.Task(f"echo {i}"))
    while not m.empty():
        t = m.wait(5)
        if t:
            print(t.id, t.output)
