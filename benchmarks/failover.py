"""The first of two head nodes stops: when the tunnel moved, was up again, and had its workers back.

    python benchmarks/failover.py --reps 3 [--out bench-out]

Needs root (the two-head firewall lab of network namespaces).
"""

import sys

from wqsupervisor.harness.bench import failover

sys.exit(failover.main())
