"""An ordinary Work Queue master script: no wqsupervisor in it.

Run it supervised, with workers on the far side of a firewall::

    python -m wqsupervisor run --via alice@login.cluster.edu --remote-port 10001 \
        examples/squares.py --tasks 100

It uses Debian's work_queue_server (a real C master) through
wqsupervisor.wqserver; swap in ndcctools' WorkQueue and Task and nothing else
changes. It prints one line per task and exits with --exit-status once all
tasks are back, so a caller can see that the status is passed through.
"""

import argparse
import sys

from wqsupervisor.wqserver import Task, WorkQueueServer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tasks", type=int, default=20)
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--exit-status", type=int, default=0)
args = parser.parse_args()

q = WorkQueueServer(port=args.port, name="squares")
print(f"master listening on port {q.port}", flush=True)
for i in range(args.tasks):
    q.submit(Task(f"echo $(({i} * {i}))", tag=str(i)))

done = 0
while not q.empty():
    t = q.wait(5)
    if t:
        done += 1
        print(f"task {t.tag}: {t.output.strip()}", flush=True)
q.close()
print(f"{done} tasks done", flush=True)
sys.exit(args.exit_status)
