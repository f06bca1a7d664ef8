"""Per fault: time to detection, to the forward working again, to all workers back, and
worker connections lost, for wqsupervisor, autossh -M 0 (ServerAlive 15/3) and autossh -M PORT.

    python benchmarks/faults.py [--reps 3] [--only ssh-killed peer-hung ...] [--tools ...] [--out bench-out]

Needs root (it builds the firewall lab). All three run side by side in the
same lab for every fault; see wqsupervisor/harness/bench/faults.py.
"""

import sys

from wqsupervisor.harness.bench import faults

sys.exit(faults.main())
