"""Bulk data through one ssh connection with N streams, against N ssh connections with one each.

    python benchmarks/connections.py [--streams 2 4 8] [--rounds 5] [--resume] [--out bench-out]
    python benchmarks/connections.py --workers 2 4 [--input-mb 100] [--tasks 12] [--rounds 5] [--resume]

Plain forwarding unless --resume, interleaved in every round; the ratio is per
round. With --workers: a real master sending large inputs to real workers, all
through one tunnel against one tunnel per worker.
"""

import sys

from wqsupervisor.harness.bench import connections

sys.exit(connections.main())
