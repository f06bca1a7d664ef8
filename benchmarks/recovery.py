"""Median time from a killed ssh client to the forward restored and all workers back.

    python benchmarks/recovery.py --kills 10 [--out bench-out]

wqsupervisor and autossh -M 0 (Debian's autossh, AUTOSSH_GATETIME=0) run side
by side on the same loopback head node, each with its own master and workers;
their ssh clients are killed in turn.
"""

import sys

from wqsupervisor.harness.bench import recovery

sys.exit(recovery.main())
