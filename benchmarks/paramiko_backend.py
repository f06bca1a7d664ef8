"""The paramiko backend against the OpenSSH one (bulk, task rate) and what an in-process
forwarder suffers while the master's wait() holds the GIL.

    python3 benchmarks/paramiko_backend.py [--bulk-mib 256] [--bulk-rounds 3]
        [--rate-rounds 5] [--tasks 200] [--stall-rounds 3] [--out bench-out]

See wqsupervisor/harness/bench/backends.py.
"""

import sys

from wqsupervisor.harness.bench import backends

sys.exit(backends.main())
