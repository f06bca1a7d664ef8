"""Bulk data through one ssh connection with N streams, against N ssh connections with one each.

    python benchmarks/connections.py [--streams 2 4 8] [--rounds 5] [--out bench-out]

Plain forwarding, interleaved in every round; the ratio is per round.
"""

import sys

from wqsupervisor.harness.bench import connections

sys.exit(connections.main())
