"""The drop-in wrapper: an ndcctools master script plus two lines."""

from ndcctools.work_queue import Task, WorkQueue

from wqsupervisor import supervise

q = WorkQueue(port=9123)
with supervise(q, via="alice@login.cluster.edu", remote_port=10001, password_file="wq.pw"):
    for i in range(100):
        q.submit(Task(f"echo {i}"))
    while not q.empty():
        t = q.wait(5)
        if t:
            print(t.tag, t.output)
