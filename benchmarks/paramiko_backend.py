"""The paramiko backend against the OpenSSH one, and what an in-process forwarder suffers.

    python3 benchmarks/paramiko_backend.py [--bulk-mib 256] [--bulk-rounds 3]
        [--rate-rounds 5] [--tasks 200] [--stall-rounds 3] [--out bench-out]

Three measurements, each with every path interleaved in the same run, on one
loopback sandbox head node (real sshd, real Debian Work Queue master and workers):

* bulk: MiB pushed through the head node's remote port into a sink on the
  master's port, MB/s (median); direct to the sink for reference;
* task rate: empty tasks (``true``), 2 workers that know only the remote port,
  steady rate (first to last completion) as a ratio to direct in the same round;
* stall: Debian's SWIG master (its ``wait()`` holds the GIL, like ndcctools')
  sits in back-to-back ``q.wait(5)``; from outside, a ``queue_status`` goes into
  the head's remote port and we time its answer, with the paramiko session
  running inside the application, and with the supervisor's agent running it.

The tunnels are the engine's own (paramiko's threads run in this process,
whose main thread only waits, as in the agent); the bulk sink and sender and the
masters run in child processes.
"""

import sys

from wqsupervisor.harness.bench import backends

sys.exit(backends.main())
