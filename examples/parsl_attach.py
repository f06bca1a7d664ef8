"""Parsl behind a firewall: its executor's master, served by ``wqsupervisor attach``.

Parsl's ``WorkQueueExecutor`` and ``TaskVineExecutor`` create their master in a
process of their own (multiprocessing's spawn), which no ``supervise(q)`` in this
script can reach. Give the executor a fixed port and a password file, let Parsl
start no workers (a provider with no blocks; TaskVine's
``worker_launch_method="manual"``), and let ``attach`` bring the tunnel and the
workers. In one shell::

    python parsl_attach.py workqueue 9123 ~/.wq-password 100

and in another, on the same machine::

    python -m wqsupervisor attach --master-port 9123 --password-file ~/.wq-password \\
        --via user@headnode --remote-port 10001 --workers slurm --max-workers 8 \\
        --until-master-exits

``attach`` tells a Work Queue master from a TaskVine manager by its status
answer and starts ``work_queue_worker`` or ``vine_worker`` accordingly. The
workers run each app with ``python3`` (Parsl's ``exec_parsl_function.py``), so
the workers' Python needs Parsl too. ``--until-master-exits`` ends the tunnel,
the workers and their jobs once Parsl has stopped its master.

Each app's result is printed as it arrives ("done I RESULT"), then "all N".
"""

from __future__ import annotations

import sys
from concurrent.futures import as_completed

import parsl
from parsl.app.app import python_app
from parsl.config import Config
from parsl.providers import LocalProvider


@python_app
def square(x: int) -> int:
    import time

    time.sleep(0.3)
    return x * x


def executor(kind: str, port: int, password_file: str) -> object:
    """The executor, its master on ``port`` with the password, starting no workers of its own."""
    if kind == "workqueue":
        from parsl.executors import WorkQueueExecutor

        no_blocks = LocalProvider(init_blocks=0, min_blocks=0, max_blocks=0)
        return WorkQueueExecutor(port=port, project_password_file=password_file, provider=no_blocks)
    if kind == "taskvine":
        from parsl.executors.taskvine import TaskVineExecutor, TaskVineManagerConfig

        config = TaskVineManagerConfig(port=port, project_password_file=password_file)
        return TaskVineExecutor(worker_launch_method="manual", manager_config=config)
    raise SystemExit(f"parsl_attach.py: unknown executor {kind!r}: give workqueue or taskvine")


def main(kind: str, port: int, password_file: str, n: int) -> None:
    # Parsl's spawned master process imports this file again: everything runs under __main__.
    with parsl.load(Config(executors=[executor(kind, port, password_file)], strategy="none")):
        futures = {square(i): i for i in range(n)}  # Parsl's futures are concurrent.futures'
        for future in as_completed(futures):
            print("done", futures[future], future.result(), flush=True)
    print("all", n, flush=True)


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        raise SystemExit("usage: python parsl_attach.py workqueue|taskvine PORT PASSWORD_FILE [N]")
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]) if len(sys.argv) == 5 else 20)
